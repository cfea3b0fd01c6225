"""The on-disk layout of a converted jaxmoe checkpoint, and reading it back.

    MODEL_DIR/
      jaxmoe.json        manifest: format version, ModelConfig, the list of weight units
      weights/<unit>/    one Orbax checkpoint per unit
      tokenizer files, generation_config.json, config.json (copied from the source)

A *unit* is the group of tensors written and read together: `embed`, `head` (final norm and
LM head), `layers.{l}` (everything in a layer but its routed experts) and
`layers.{l}.experts.{e}` (one routed expert: gate, up, down, each [I, D]). One expert per unit
lets the offload runtime read any expert without touching the others, and bounds conversion's
memory by the largest unit. The manifest is written last and the directory appears by an atomic
rename, so a directory without a valid manifest is never a checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe.config import ModelConfig

FORMAT = "jaxmoe-checkpoint"
FORMAT_VERSION = 2  # 2: linear weights [out, in] named `weight` (1: Flax kernels [in, out])
MANIFEST = "jaxmoe.json"
WEIGHTS = "weights"
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)$")  # a tensor path
_EXPERT_UNIT = re.compile(r"^layers\.(\d+)\.experts\.(\d+)$")  # a unit name, see expert_unit


class CheckpointError(ValueError):
    pass


def unit_of(path: str) -> str:
    """The unit a dotted parameter path is stored in."""
    m = _EXPERT.match(path)
    if m:
        return f"layers.{m[1]}.experts.{m[2]}"
    if path.startswith("layers."):
        return ".".join(path.split(".")[:2])
    return "embed" if path.startswith("embed.") else "head"


def expert_unit(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} is not a jaxmoe checkpoint (no {MANIFEST}); convert a Hugging Face model with `jaxmoe convert`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}")
    version = manifest.get("version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise CheckpointError(f"{model_dir} was converted by an older jaxmoe (checkpoint format {version}, this "
                              f"version reads {FORMAT_VERSION}); convert the Hugging Face model again with `jaxmoe convert`")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version!r} (this jaxmoe reads {FORMAT_VERSION})")
    return manifest


def load_config(model_dir: str | Path) -> ModelConfig:
    return ModelConfig.from_json(read_manifest(model_dir)["config"])


def _checkpointer():
    import orbax.checkpoint as ocp

    # One directory per array (no OCDBT): a unit's save then holds each array once, not twice.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))


def read_unit(model_dir: str | Path, unit: str) -> dict[str, np.ndarray]:
    """One unit as {dotted path: numpy array}."""
    path = Path(model_dir).absolute() / WEIGHTS / unit
    if not path.is_dir():
        raise CheckpointError(f"{model_dir}: weight unit {unit!r} is missing ({path})")
    tree = _checkpointer().restore(path)
    return {k: np.asarray(v) for k, v in tree.items()}


def write_manifest(model_dir: Path, config: ModelConfig, units: list[str]) -> None:
    """The last file of a checkpoint: its presence is what makes the directory loadable."""
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_json(), "units": units}
    (Path(model_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def write_unit(model_dir: Path, unit: str, tensors: dict[str, np.ndarray]) -> None:
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns on every non-OCDBT save that it has nothing to merge
    try:
        _checkpointer().save((model_dir / WEIGHTS / unit).absolute(), tensors)
    finally:
        absl.setLevel(level)


def _nest(flat: dict[str, Any]) -> dict:
    """{'a.0.b': x} -> {'a': {0: {'b': x}}}, integer keys where NNX uses list indices."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        keys = [int(p) if p.isdigit() else p for p in path.split(".")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root


def load_params(
    model_dir: str | Path,
    config: ModelConfig | None = None,
    place: Callable[[np.ndarray], Any] | None = None,
    experts: bool = True,
) -> dict:
    """Read every unit into the model's pure-dict parameter tree, translated from the checkpoint's
    layout by `transformer.params_from_checkpoint` one unit at a time. `place` puts each array
    where it belongs (default: the default device). `experts=False` skips routed experts.
    """
    import jax

    from jaxmoe.models.transformer import abstract_model, fused_linears, params_from_checkpoint

    manifest = read_manifest(model_dir)
    config = config or ModelConfig.from_json(manifest["config"])
    place = place or jax.device_put
    fused = fused_linears(abstract_model(config))
    flat: dict[str, Any] = {}
    for unit in manifest["units"]:
        if _EXPERT_UNIT.match(unit) and not experts:
            continue  # not even read: the offload runtime's store reads experts itself
        tensors = params_from_checkpoint(read_unit(model_dir, unit), fused)
        flat.update({k: place(v) for k, v in tensors.items()})
    return _nest(flat)
