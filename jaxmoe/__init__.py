"""jaxmoe: mixture-of-experts inference on JAX for GPUs too small to hold the model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    return Path(os.environ.get("JAXMOE_CACHE", Path.home() / ".cache" / "jaxmoe"))


def resolve_model_dir(path: str | Path | None = None, progress: bool = False) -> Path:
    """A converted checkpoint directory for `path`.

    `None` means the bundled demo model. A Hugging Face directory (config.json and safetensors) is
    converted once into the cache (`$JAXMOE_CACHE`, default ~/.cache/jaxmoe), keyed by the
    source files' names, sizes and modification times.
    """
    from jaxmoe import checkpoint

    if path is None:
        from jaxmoe.demo import MODEL_DIR

        path = MODEL_DIR
    path = Path(path)
    if (path / checkpoint.MANIFEST).is_file():
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a jaxmoe checkpoint ({checkpoint.MANIFEST}) nor a Hugging Face model (config.json)")
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    target = cache_dir() / f"{path.name}-{digest.hexdigest()[:12]}"
    if not (target / checkpoint.MANIFEST).is_file():
        from jaxmoe.convert import convert

        convert(path, target, progress=progress)
    return target


def load(path: str | Path | None = None):
    """Load a converted (or Hugging Face, converted on first use) model; `None` loads the demo."""
    from jaxmoe.engine import Engine

    return Engine.from_dir(resolve_model_dir(path))


__all__ = ["load", "resolve_model_dir", "__version__"]
