"""`jaxmoe convert HF_DIR OUT_DIR`: stream a Hugging Face MoE checkpoint into jaxmoe's layout.

Every check that can fail runs on the safetensors headers before a byte is written: the family is
supported, each tensor the family's map names exists exactly once with the expected shape, and no
tensor is left over. Then units (see jaxmoe.checkpoint) are read, transposed, cast and written one
at a time, so resident memory stays near the largest unit (one expert, or the embedding). All of
it goes to a hidden sibling directory that is renamed into place only after the manifest is
written: an interrupted run never leaves something that loads as a checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxmoe import checkpoint as ckpt
from jaxmoe.config import DTYPES, ModelConfig
from jaxmoe.convert.safetensors_reader import SafetensorsError, TensorInfo, index_checkpoint, read_tensor
from jaxmoe.models import config_from_hf, tensor_map
from jaxmoe.models.hf import TensorSpec
from jaxmoe.models.transformer import checkpoint_shapes

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# Non-persistent buffers some older exports still carry; they hold no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    pass


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted checkpoint path -> shape, from the model's own abstract parameters."""
    return checkpoint_shapes(config)


def plan(config: ModelConfig, tensors: dict[str, TensorInfo]) -> list[TensorSpec]:
    """Check the tensor map against the checkpoint's headers; raise naming every problem."""
    specs = tensor_map(config)
    shapes = expected_shapes(config)
    problems = []
    mapped = {s.ours for s in specs}
    if mapped != set(shapes):
        missing, extra = sorted(set(shapes) - mapped), sorted(mapped - set(shapes))
        raise AssertionError(f"tensor map of {config.family} disagrees with the model: {missing[:3]} {extra[:3]}")
    used: dict[str, str] = {}
    for s in specs:
        if s.theirs in used:
            problems.append(f"tensor {s.theirs!r} would be used twice ({used[s.theirs]} and {s.ours})")
        used[s.theirs] = s.ours
        info = tensors.get(s.theirs)
        if info is None:
            problems.append(f"missing tensor {s.theirs!r} (needed for {s.ours})")
            continue
        want = shapes[s.ours][::-1] if s.transpose else shapes[s.ours]
        if info.shape != want:
            problems.append(f"tensor {s.theirs!r} in {info.file.name} has shape {list(info.shape)}, expected {list(want)}")
    for name, info in tensors.items():
        if name not in used and not name.endswith(IGNORED_SUFFIXES):
            problems.append(f"unexpected tensor {name!r} in {info.file.name}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConversionError(f"checkpoint does not match {config.family} config:\n  {shown}{more}")
    return specs


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from e


def read_hf_config(hf_dir: Path, dtype: str | None) -> ModelConfig:
    hf = _read_json(hf_dir / "config.json")
    if hf is None:
        raise ConversionError(f"{hf_dir}: no config.json")
    return config_from_hf(hf, dtype, _read_json(hf_dir / "generation_config.json"))


def _write_units(specs: list[TensorSpec], tensors: dict[str, TensorInfo], dtype, out: Path, progress: bool) -> list[str]:
    by_unit: dict[str, list[TensorSpec]] = defaultdict(list)
    for s in specs:
        by_unit[ckpt.unit_of(s.ours)].append(s)
    total = sum(tensors[s.theirs].end - tensors[s.theirs].start for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        for unit, unit_specs in by_unit.items():
            arrays = {}
            for s in unit_specs:
                info = tensors[s.theirs]
                a = read_tensor(info)
                # One copy at most (transpose and cast together), and the source freed at once rather
                # than kept alive through the next read or the unit's write.
                arrays[s.ours] = (a.T if s.transpose else a).astype(dtype, order="C", copy=False)
                del a
                bar.update(info.end - info.start)
            ckpt.write_unit(out, unit, arrays)
            del arrays
            _release_freed_memory()
    return list(by_unit)


def _release_freed_memory() -> None:
    """Hand memory freed after a unit's write back to the OS. Tensorstore's writer threads allocate
    through glibc arenas that keep freed pages; without this, resident memory after a large unit
    (embedding, LM head) stays near the write's peak for the rest of the run. No-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None, progress: bool = True) -> ModelConfig:
    """Convert `hf_dir` (config.json, safetensors, tokenizer) into a jaxmoe checkpoint at `out_dir`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} already exists and is not empty; choose a new output directory")
    config = read_hf_config(hf_dir, dtype)
    try:
        tensors = index_checkpoint(hf_dir)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from e
    specs = plan(config, tensors)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        units = _write_units(specs, tensors, DTYPES[config.dtype], tmp, progress)
        for name in TOKENIZER_FILES + ("config.json",):
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        ckpt.write_manifest(tmp, config, units)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config
