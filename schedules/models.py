"""Which model a schedule command is about: a preset name, `demo`, or a model directory.

Simulation and planning need only the model's shapes, so a Hugging Face directory is read for
its config.json and never converted here; tracing needs weights and goes through `jaxmoe.load`.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxmoe.config import ModelConfig


class ModelSpecError(ValueError):
    pass


def demo_dir() -> Path:
    """The bundled demo model's directory (a Hugging Face checkpoint)."""
    from jaxmoe.demo import MODEL_DIR

    return Path(MODEL_DIR)


def model_source(spec: str | None) -> str | Path:
    """`demo` or None -> the demo directory; anything else unchanged (jaxmoe.load resolves it)."""
    if spec in (None, "demo"):
        path = demo_dir()
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"the demo model is not installed ({path} has no checkpoint)")
        return path
    return spec


def resolve_config(spec: str | None) -> ModelConfig:
    """Preset name, `demo`, converted checkpoint or Hugging Face directory -> its ModelConfig."""
    from jaxmoe import checkpoint
    from jaxmoe.models import PRESETS, config_from_hf, preset

    if spec in PRESETS:
        return preset(spec)
    path = Path(model_source(spec))
    if (path / checkpoint.MANIFEST).is_file():
        return checkpoint.load_config(path)
    if (path / "config.json").is_file():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    raise ModelSpecError(f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}, demo) nor a model directory")
