"""Reading safetensors one tensor at a time, with errors that name the tensor and the file.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then raw little-endian data. Tensors are read with plain file reads
(not memory maps) so that conversion's resident memory holds only the tensors in flight.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if n > size - 8:
                raise SafetensorsError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise SafetensorsError(f"header is a JSON {type(header).__name__}, not an object")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorsError) as e:
        raise SafetensorsError(f"{file}: unreadable safetensors header ({e})") from e
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            info = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{file}: malformed header entry for tensor {name!r}") from e
        if info.dtype not in DTYPES:
            raise SafetensorsError(f"{file}: tensor {name!r} has unsupported dtype {info.dtype}")
        expected = int(np.prod(info.shape)) * np.dtype(DTYPES[info.dtype]).itemsize
        if info.end - info.start != expected or info.end > size:
            raise SafetensorsError(f"{file}: tensor {name!r} data range does not match its shape {info.shape}")
        out[name] = info
    return out


def index_checkpoint(hf_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded checkpoint, by name."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor name -> shard file")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: unreadable index ({type(e).__name__}: {e})") from e
        files = sorted({hf_dir / f for f in weight_map.values()})
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise SafetensorsError(f"{hf_dir}: no .safetensors files (PyTorch .bin checkpoints are not supported)")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise SafetensorsError(f"{index}: lists shard {file.name}, which does not exist")
        for name, info in read_header(file).items():
            if name in tensors:
                raise SafetensorsError(f"tensor {name!r} appears in both {tensors[name].file} and {file}")
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise SafetensorsError(f"{index}: tensor {name!r} is listed in {shard} but that file lacks it")
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    out = np.empty(info.shape, DTYPES[info.dtype])
    with open(info.file, "rb") as f:
        f.seek(info.start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if f.readinto(view) != info.end - info.start:
            raise SafetensorsError(f"{info.file}: tensor {info.name!r} is truncated")
    return out
