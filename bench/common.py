"""Helpers shared by the benchmark scripts: the machine, versions, medians, synthetic checkpoints of
real shapes, recorded routing for replay, an offline-optimal (Belady) traffic counter, bandwidth.

Nothing here imports torch at module level; torch-only helpers import it when called.

Synthetic checkpoints. Real weights cannot be downloaded here, so a benchmark model is a preset's
Hugging Face config (`jaxmoe.models.PRESETS`, depth optionally cut) with random weights, written as
sharded safetensors in the Hugging Face layout (one shard per layer, per-expert tensor names as on
the Hub) one tensor at a time, then converted with `jaxmoe.convert.convert`. Random values come
from a small pool of normal draws read at a random offset per tensor (the pool's length is prime,
so rows never repeat in step), which makes writing tens of GB cost memory copies, not draws.

Routing traces. `RoutingTrace.read` takes the public JSON-lines format (one line per request, token
and layer, see ../shared/traces/*/SOURCE.md): tokens that lack a layer are skipped and the
requests' tokens are concatenated in file order. A replayed generation maps sequence position p to
trace token p mod T and model layer l to trace layer l mod L_trace.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_POOL_LENGTH = 4_194_301  # prime


# -- machine, versions, statistics ---------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """GPU names as the NVIDIA driver reports them (empty without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(",")[0].strip() for line in out.splitlines() if line.strip()]


def nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def versions() -> dict[str, str | None]:
    """Versions of everything a benchmark result depends on (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "numpy", "torch", "transformers",
                 "accelerate", "safetensors", "orbax-checkpoint", "jaxmoe"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["nvidia_driver"] = nvidia_driver()
    return out


def machine_info(device: str) -> dict[str, Any]:
    """`device` is "gpu" or "cpu"; the name is the GPU's as the driver reports it, else the CPU's."""
    gpus = gpu_names() if device == "gpu" else []
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "device": gpus[0] if gpus else cpu_model(),
        "platform": device,
        "gpus": gpus,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "host_memory_bytes": mem,
        "hostname": platform.node(),
        "os": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_run(runs: Sequence[dict], key: str = "decode_tokens_per_s") -> dict:
    """The run whose `key` is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def write_json(path: str | Path, doc: Any) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# -- synthetic checkpoints -----------------------------------------------------------------------


def hf_config(preset: str | dict, num_layers: int | None = None, **overrides) -> dict[str, Any]:
    """A full Hugging Face config dict for a jaxmoe preset (name or dict), depth cut to `num_layers`."""
    from jaxmoe.models import PRESETS

    base = dict(PRESETS[preset] if isinstance(preset, str) else preset)
    if num_layers is not None:
        base["num_hidden_layers"] = num_layers
        if base.get("mlp_only_layers"):
            base["mlp_only_layers"] = [i for i in base["mlp_only_layers"] if i < num_layers]
    base.update(overrides)
    arch = base["architectures"][0]
    if arch not in MODEL_TYPES:
        raise ValueError(f"no model_type known for {arch}")
    base.setdefault("model_type", MODEL_TYPES[arch])
    return base


def jaxmoe_config(config: dict[str, Any]):
    from jaxmoe.models import config_from_hf

    return config_from_hf(config)


def checkpoint_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(Hugging Face tensor name, shape, kind) of every tensor the checkpoint holds, in jaxmoe's
    tensor-map order; kind is "norm", "router", "bias" or "linear" (it sets the random values)."""
    from jaxmoe.convert.convert import expected_shapes
    from jaxmoe.models import tensor_map

    c = jaxmoe_config(config)
    shapes = expected_shapes(c)
    out = []
    for spec in tensor_map(c):
        shape = shapes[spec.ours]
        shape = tuple(shape[::-1]) if spec.transpose else tuple(shape)
        name = spec.theirs
        if "norm" in name and name.endswith("weight"):
            kind = "norm"
        elif name.endswith("bias"):
            kind = "bias"
        elif spec.ours.endswith(("router.weight", "shared_gate.weight")):
            kind = "router"
        else:
            kind = "linear"
        out.append((name, shape, kind))
    return out


def _shard_key(name: str) -> str:
    parts = name.split(".")
    return f"layer{int(parts[2]):04d}" if name.startswith("model.layers.") else "outer"


class _RandomPool:
    """Values for any tensor: a window of a fixed pool of draws at a random offset."""

    def __init__(self, dtype, seed: int, std: float, router_std: float):
        rng = np.random.default_rng(seed)
        normal = rng.standard_normal(_POOL_LENGTH, np.float32)
        self.pools = {
            "linear": (std * normal).astype(dtype),
            "bias": (std * normal).astype(dtype),
            "router": (router_std * normal).astype(dtype),
            "norm": (1.0 + 0.1 * normal).astype(dtype),
        }
        self.rng = rng

    def fill(self, kind: str, n: int) -> np.ndarray:
        pool = self.pools[kind]
        out = np.empty(n, pool.dtype)
        start, pos = int(self.rng.integers(_POOL_LENGTH)), 0
        while pos < n:
            take = min(_POOL_LENGTH - start, n - pos)
            out[pos : pos + take] = pool[start : start + take]
            pos += take
            start = 0
        return out


def write_random_hf_checkpoint(config: dict[str, Any], out: str | Path, seed: int = 0, std: float = 0.02,
                               router_std: float | None = None) -> Path:
    """A Hugging Face checkpoint directory (config.json, generation_config.json, sharded safetensors
    with an index) with random weights. Memory stays near one tensor: each shard's header is
    written first, then its tensors one by one."""
    from jaxmoe.config import DTYPES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = jaxmoe_config(config)
    dtype = np.dtype(DTYPES[c.dtype])
    pool = _RandomPool(dtype, seed, std, router_std if router_std is not None else std)
    shards: dict[str, list[tuple[str, tuple[int, ...], str]]] = defaultdict(list)
    for entry in checkpoint_tensors(config):
        shards[_shard_key(entry[0])].append(entry)
    names = sorted(shards)
    weight_map, total = {}, 0
    for i, key in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shards[key]:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[c.dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, kind in shards[key]:
                f.write(pool.fill(kind, int(np.prod(shape))).view(np.uint8).data)
        total += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    doc = dict(config)
    doc.setdefault("dtype", c.dtype)
    (out / "config.json").write_text(json.dumps(doc, indent=1) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    return out


@dataclasses.dataclass(frozen=True)
class SyntheticModel:
    name: str
    hf_dir: Path
    jaxmoe_dir: Path
    hf_config: dict
    build_s: float  # writing and converting; 0 when reused

    @property
    def config(self):
        return jaxmoe_config(self.hf_config)


def build_model(name: str, config: dict[str, Any], workdir: str | Path, seed: int = 0, std: float = 0.02,
                router_std: float | None = None) -> SyntheticModel:
    """Random Hugging Face checkpoint and its jaxmoe conversion under `workdir/<name>-<digest>/`;
    reused when one with the same config, seed, scales and checkpoint format version exists."""
    from jaxmoe import checkpoint as ckpt
    from jaxmoe.convert import convert

    spec = {"config": config, "seed": seed, "std": std, "router_std": router_std, "format": ckpt.FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(workdir) / f"{name}-{digest}"
    hf_dir, jm_dir = root / "hf", root / "jaxmoe"
    t = time.perf_counter()
    if (jm_dir / ckpt.MANIFEST).is_file() and (root / "spec.json").is_file():
        return SyntheticModel(name, hf_dir, jm_dir, config, 0.0)
    shutil.rmtree(root, ignore_errors=True)
    write_random_hf_checkpoint(config, hf_dir, seed, std, router_std)
    convert(hf_dir, jm_dir, progress=False)
    write_json(root / "spec.json", spec)
    return SyntheticModel(name, hf_dir, jm_dir, config, time.perf_counter() - t)


# -- recorded routing ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    ids: np.ndarray  # [T, L, k] expert ids
    weights: np.ndarray  # [T, L, k] gating probabilities
    source: str
    skipped_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    @property
    def num_experts(self) -> int:
        return int(self.ids.max()) + 1

    @classmethod
    def read(cls, path: str | Path) -> RoutingTrace:
        """The public JSON-lines format: {dataset, problem_id, layer, experts, gating_probs, token_idx}."""
        path = Path(path)
        tokens: dict[tuple, dict[int, dict]] = {}
        order: list[tuple] = []
        with open(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                rid = (row.get("dataset", ""), row.get("problem_id", row.get("request", 0)))
                if rid not in order:
                    order.append(rid)
                pos = int(row["token_idx"] if "token_idx" in row else row["token_pos"])
                tokens.setdefault((rid, pos), {})[int(row["layer"])] = row
        if not tokens:
            raise ValueError(f"{path}: no routing rows")
        num_layers = 1 + max(layer for per in tokens.values() for layer in per)
        ids, weights, skipped = [], [], 0
        for rid in order:
            for pos in sorted(p for (r, p) in tokens if r == rid):
                per = tokens[(rid, pos)]
                if len(per) != num_layers:
                    skipped += 1
                    continue
                ids.append([per[layer]["experts"] for layer in range(num_layers)])
                weights.append([per[layer]["gating_probs"] for layer in range(num_layers)])
        return cls(np.asarray(ids, np.int64), np.asarray(weights, np.float32), str(path), skipped)

    def rows(self, layer: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, k], weights [n, k]) of positions start..start+n-1 at model layer `layer`."""
        t = (start + np.arange(n)) % self.num_tokens
        return self.ids[t, layer % self.num_layers], self.weights[t, layer % self.num_layers]

    def layer_sequence(self, layer: int, start: int, n: int) -> list[list[int]]:
        ids, _ = self.rows(layer, start, n)
        return [sorted(set(row.tolist())) for row in ids]


# -- the offline optimum -------------------------------------------------------------------------


def belady(tokens: Sequence[Sequence[int]], slots: int, warm: Sequence[int] | None = None) -> tuple[int, int]:
    """(hits, misses) of one layer's cache of `slots` experts under Belady's eviction (evict the
    cached expert used furthest in the future, never one the current token needs).

    `tokens`: each token's experts. `warm`: the cache's initial content; None means the best
    possible start (the first `slots` distinct experts the sequence uses), which makes the miss
    count a lower bound for any cache of this size that is warm when the sequence begins."""
    seq = [sorted(set(t)) for t in tokens]
    if warm is None:
        warm = []
        for t in seq:
            for e in t:
                if e not in warm and len(warm) < slots:
                    warm.append(e)
    cache = set(list(warm)[:slots])
    uses: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(seq):
        for e in t:
            uses[e].append(i)
    nxt = {e: 0 for e in uses}
    hits = misses = 0
    for i, t in enumerate(seq):
        for e in t:
            while nxt[e] < len(uses[e]) and uses[e][nxt[e]] <= i:
                nxt[e] += 1
        need = set(t)
        for e in t:
            if e in cache:
                hits += 1
                continue
            misses += 1
            if len(cache) >= slots:
                candidates = [c for c in cache if c not in need]
                if not candidates:
                    raise ValueError(f"a token needs {len(need)} experts; the cache holds {slots}")

                def next_use(c):
                    return uses[c][nxt[c]] if c in uses and nxt[c] < len(uses[c]) else float("inf")

                cache.remove(max(candidates, key=lambda c: (next_use(c), c)))
            cache.add(e)
    return hits, misses


def oracle_traffic(layers: dict[int, Sequence[Sequence[int]]], slots: int | dict[int, int], expert_bytes: int,
                   warm: str = "best") -> dict[str, float]:
    """Bytes per token that a Belady cache with perfect prediction must move, over the per-layer
    expert sequences `layers` {layer: [experts of token t, ...]} (decode tokens). warm: "best"
    (lower bound, see `belady`) or "first" (experts 0..C-1 cached at the start)."""
    hits = misses = 0
    tokens = 0
    for layer, seq in layers.items():
        c = slots[layer] if isinstance(slots, dict) else slots
        h, m = belady(seq, c, None if warm == "best" else list(range(c)))
        hits, misses, tokens = hits + h, misses + m, max(tokens, len(seq))
    return {"hits": hits, "misses": misses, "hit_rate": hits / max(hits + misses, 1), "tokens": tokens,
            "bytes_per_token": misses * expert_bytes / max(tokens, 1)}


# -- host->device bandwidth ----------------------------------------------------------------------


def h2d_bandwidth_jax(sizes_mb: Sequence[int], repeats: int = 5) -> list[dict]:
    """Eager `device_put` of a pinned_host array to device memory, block_until_ready; medians."""
    import jax
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    host = SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = SingleDeviceSharding(dev, memory_kind="device")
    rows = []
    for mb in sizes_mb:
        x = jax.device_put(np.ones(mb * 2**20 // 2, np.uint16), host)
        jax.device_put(x, device).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.device_put(x, device).block_until_ready()
            times.append(time.perf_counter() - t)
        rows.append({"bytes": int(x.nbytes), "seconds": median(times), "gb_per_s": x.nbytes / median(times) / 1e9})
        del x
    return rows


def h2d_bandwidth_torch(sizes_mb: Sequence[int], repeats: int = 5) -> list[dict]:
    """`copy_` from a pinned host tensor into a CUDA tensor, timed with CUDA events; medians.
    Empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    rows = []
    for mb in sizes_mb:
        src = torch.ones(mb * 2**20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rows.append({"bytes": src.numel(), "seconds": median(times), "gb_per_s": src.numel() / median(times) / 1e9})
        del src, dst
    torch.cuda.empty_cache()
    return rows
