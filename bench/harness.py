"""What every benchmark shares, once: the platform check and machine/version probe, the timing
loop, the transformers runner, the result writer, recorded routing for replay (read with the
library's own trace reader), random checkpoints of real shapes, and host->device bandwidth.

Nothing here imports torch or starts JAX's backend at module level: a GPU run's driver process
must not hold the device its workers measure.
"""

from __future__ import annotations

import copy
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRACE = ROOT / "tests" / "data" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_POOL_LENGTH = 4_194_301  # prime: windows at random offsets never repeat rows in step


class PlatformError(SystemExit):
    """A benchmark asked for a device JAX (or torch) does not run on: stop before measuring."""

    def __init__(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        super().__init__(2)


_PROBE = """
import json, jax
d = jax.devices()[0]
out = {"jax_platform": d.platform, "jax_device_kind": d.device_kind, "jax_device_count": jax.device_count(),
       "jax_memory_kinds": sorted(m.kind for m in d.addressable_memories())}
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except ImportError:
    out["torch_device"] = None
print(json.dumps(out))
"""


def probe_platform(env: dict | None = None) -> dict[str, Any]:
    """What JAX and torch actually run on, asked in a child process (the caller's JAX stays unstarted)."""
    env = dict(env or os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise PlatformError(f"JAX failed to start: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def require_platform(want: str, found: dict[str, Any], torch_too: bool = False) -> None:
    """Refuse a GPU benchmark whose JAX (or, with `torch_too`, torch) would run on the CPU."""
    if want != "gpu":
        return
    if found["jax_platform"] != "gpu":
        raise PlatformError(f"a GPU run was asked for, but JAX runs on {found['jax_platform']} "
                            f"({found['jax_device_kind']}); install JAX's CUDA build: pip install '.[cuda]'")
    if torch_too and not found.get("torch_device"):
        raise PlatformError("a GPU run was asked for, but torch has no CUDA device: the PyTorch baselines would run "
                            "on the CPU; install a CUDA build of torch")


def _nvidia_smi(fields: str) -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "orbax-checkpoint", "numpy",
                 "torch", "transformers", "accelerate", "safetensors", "jaxmoe"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout that produced a result, '+changes' when the tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def machine(found: dict[str, Any]) -> dict[str, Any]:
    """The machine a result was measured on; `device` names what JAX ran on (the GPU, or the CPU)."""
    gpus = _nvidia_smi("name,driver_version,memory.total") if found["jax_platform"] == "gpu" else []
    try:
        host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host_memory = None
    return {
        "platform": found["jax_platform"],
        "device": found["jax_device_kind"] if found["jax_platform"] == "gpu" else cpu_model(),
        "nvidia_smi": [dict(zip(("name", "driver", "memory"), (f.strip() for f in g.split(",")))) for g in gpus],
        "jax": found, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "host_memory_bytes": host_memory,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median(values) -> float:
    return float(statistics.median(values))


def seconds(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def repeat(fn: Callable[[], dict], repeats: int, key: str = "decode_tokens_per_s") -> dict:
    """One warm-up call (compilation, first-touch) reported apart, then `repeats` timed calls:
    the median call's figures, every call's `key`, and the warm-up's."""
    warm = fn()
    runs = [fn() for _ in range(repeats)]
    out = dict(sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2])
    out[f"{key}_runs"] = [r[key] for r in runs]
    out["warmup"] = {k: v for k, v in warm.items() if k != "token_ids"}
    return out


def write_result(path: str | Path, doc: dict[str, Any]) -> Path:
    """Atomic JSON write (a reader never sees half a file), with the commit that made it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "code": {"commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.ndarray)):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def torch_generate(model, prompt: list[int], n: int, device, before: Callable[[], None] | None = None) -> dict:
    """Greedy decode of exactly n new tokens with transformers' `generate`, no early stop, timed by a
    logits processor after every forward (CUDA synchronised): decode tok/s over the n-1 steps after
    the first token, as jaxmoe reports it. `device`: where inputs go (the model's execution device)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    device = torch.device(device)
    cuda = device.type == "cuda"

    class Stamps(LogitsProcessor):
        times: list[float] = []

        def __call__(self, input_ids, scores):
            if cuda:
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.max_new_tokens, gen.min_new_tokens = None, False, n, None
    gen.temperature = gen.top_p = gen.top_k = None
    gen.pad_token_id = 0
    stamps = Stamps()
    stamps.times = []
    ids = torch.tensor([prompt], device=device)
    if before is not None:
        before()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                             logits_processor=LogitsProcessorList([stamps]))
    ts = stamps.times
    return {"token_ids": out[0, len(prompt):].tolist(), "ttft_s": ts[0] - t,
            "decode_tokens_per_s": (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0,
            "device_bytes_peak": int(torch.cuda.max_memory_allocated(device)) if cuda else None}


def jaxmoe_generate(engine, prompt: list[int], n: int) -> dict:
    """The same measurement on the jaxmoe side (stop tokens emptied, so exactly n tokens)."""
    engine.config = engine.config.replace(eos_token_ids=())
    r = engine.generate(prompt_ids=prompt, max_new_tokens=n)
    return {"token_ids": r.token_ids, "ttft_s": r.ttft_s, "decode_tokens_per_s": r.decode_tokens_per_s,
            "prefill_s": r.prefill_s, "compile_s": r.compile_s, **r.extra}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Replay:
    """Recorded decode routing played back by sequence position: position p takes the trace's
    decode token p mod T (its requests one after another) and model layer l the trace's layer
    l mod L. Read with jaxmoe's own trace reader (jaxmoe.schedules.trace.read_trace)."""

    def __init__(self, path: str | Path = TRACE):
        from jaxmoe.schedules.trace import read_trace

        trace = read_trace(path)
        keep = [r.decode for r in trace.requests]
        self.path = str(path)
        self.ids = np.concatenate([r.experts[m] for r, m in zip(trace.requests, keep)])  # [T, L, k]
        self.weights = np.concatenate([r.weights[m] for r, m in zip(trace.requests, keep)]).astype(np.float32)
        self.top_k, self.num_experts = trace.top_k, trace.num_experts

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def fits(self, config) -> bool:
        return config.top_k == self.top_k and config.num_experts >= self.num_experts

    def rows(self, layer: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n, k], weights [n, k]) of positions start..start+n-1 at model layer `layer`."""
        t = (start + np.arange(n)) % self.num_tokens
        return self.ids[t, layer % self.ids.shape[1]].astype(np.int32), self.weights[t, layer % self.ids.shape[1]]

    def decode_routing(self, layers, start: int, n: int) -> dict[int, list[list[int]]]:
        """{layer: [sorted experts of position start + t]} for t < n: what the oracle replays."""
        return {l: [sorted(row.tolist()) for row in self.rows(l, start, n)[0]] for l in layers}


def oracle(routing: dict[int, list[list[int]]], config, slots: int) -> dict[str, float]:
    """Belady's cache (perfect prediction, optimal eviction) of `slots` whole experts per layer, warm
    with experts 0..slots-1 like every system, over decode routing {layer: [experts of token t]}:
    what any cache of that size must move at least. Replayed by jaxmoe's simulator."""
    from jaxmoe.offload import plan as planning
    from jaxmoe.schedules import simulate
    from jaxmoe.schedules.trace import Request, Trace

    layers = sorted(routing)
    tokens = min(len(routing[l]) for l in layers)
    k = config.top_k
    experts = np.array([[(sorted(set(routing[l][t])) * k)[:k] for l in layers] for t in range(tokens)], np.int64)
    request = Request("decode", np.arange(tokens), np.ones(tokens, bool), experts, np.full(experts.shape, np.nan))
    trace = Trace(tuple(config.moe_layer_ids), config.num_experts, k, [request])
    plan = planning.uniform_plan(config, slots, 1.0, 256, "belady", prefetch=False)
    d = simulate.replay(trace, config, plan, "belady").decode
    return {"hits": d["hits"], "misses": d["misses"], "hit_rate": d["hits"] / max(d["hits"] + d["misses"], 1),
            "tokens": tokens, "bytes_per_token": d["bytes_h2d"] / max(tokens, 1)}


def hf_config(preset: str | dict, num_layers: int | None = None, **overrides) -> dict[str, Any]:
    """A Hugging Face config dict for a jaxmoe preset (name or dict), depth cut to `num_layers`."""
    from jaxmoe.models import PRESETS

    base = dict(PRESETS[preset] if isinstance(preset, str) else preset)
    if num_layers is not None:
        base["num_hidden_layers"] = num_layers
        if base.get("mlp_only_layers"):
            base["mlp_only_layers"] = [i for i in base["mlp_only_layers"] if i < num_layers]
    base.update(overrides)
    base.setdefault("model_type", MODEL_TYPES[base["architectures"][0]])
    return base


def jaxmoe_config(config: dict[str, Any]):
    from jaxmoe.models import config_from_hf

    return config_from_hf(config)


def checkpoint_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(Hugging Face name, shape, kind) of every tensor, kind "norm", "router", "bias" or "linear"."""
    from jaxmoe.convert.convert import expected_shapes
    from jaxmoe.models import tensor_map

    c = jaxmoe_config(config)
    shapes = expected_shapes(c)
    out = []
    for spec in tensor_map(c):
        shape = tuple(shapes[spec.ours][::-1] if spec.transpose else shapes[spec.ours])
        name = spec.theirs
        kind = ("norm" if "norm" in name and name.endswith("weight") else "bias" if name.endswith("bias")
                else "router" if spec.ours.endswith(("router.weight", "shared_gate.weight")) else "linear")
        out.append((name, shape, kind))
    return out


def write_random_hf_checkpoint(config: dict[str, Any], out: str | Path, seed: int = 0, std: float = 0.02,
                               router_std: float | None = None) -> Path:
    """A Hugging Face checkpoint (config, generation config, one safetensors shard per layer and an
    index) with random weights: windows at random offsets of one pool of normal draws, written a
    tensor at a time, so tens of GB cost memory copies, not draws, and memory stays near one tensor."""
    from jaxmoe.config import DTYPES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPES[config["architectures"][0]], **config}
    c = jaxmoe_config(config)
    dtype = np.dtype(DTYPES[c.dtype])
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(_POOL_LENGTH, np.float32)
    router_std = std if router_std is None else router_std
    pools = {"linear": (std * normal).astype(dtype), "bias": (std * normal).astype(dtype),
             "router": (router_std * normal).astype(dtype), "norm": (1.0 + 0.1 * normal).astype(dtype)}

    def fill(kind: str, n: int) -> np.ndarray:  # the pool from a random offset, wrapping around
        return np.resize(np.roll(pools[kind], -int(rng.integers(_POOL_LENGTH))), n)

    shards: dict[str, list] = defaultdict(list)
    for entry in checkpoint_tensors(config):
        parts = entry[0].split(".")
        shards[f"layer{int(parts[2]):04d}" if entry[0].startswith("model.layers.") else "outer"].append(entry)
    weight_map, total = {}, 0
    for i, key in enumerate(sorted(shards)):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shards[key]:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[c.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, kind in shards[key]:
                f.write(fill(kind, int(np.prod(shape))).view(np.uint8).data)
        total += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps({**config, "dtype": c.dtype}, indent=1) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    return out


def build_model(name: str, config: dict[str, Any], workdir: str | Path, seed: int = 0, std: float = 0.02,
                router_std: float | None = None) -> tuple[Path, Path]:
    """(Hugging Face dir, jaxmoe dir) of a random checkpoint and its conversion under
    workdir/<name>-<digest>/, reused when the config, seed, scales and checkpoint format match."""
    from jaxmoe import checkpoint as ckpt
    from jaxmoe.convert import convert

    spec = {"config": config, "seed": seed, "std": std, "router_std": router_std, "format": ckpt.FORMAT_VERSION}
    root = Path(workdir) / f"{name}-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}"
    hf_dir, jm_dir = root / "hf", root / "jaxmoe"
    if not ((jm_dir / ckpt.MANIFEST).is_file() and (root / "spec.json").is_file()):
        shutil.rmtree(root, ignore_errors=True)
        write_random_hf_checkpoint(config, hf_dir, seed, std, router_std)
        convert(hf_dir, jm_dir, progress=False)
        (root / "spec.json").write_text(json.dumps(spec))
    return hf_dir, jm_dir


def h2d_bandwidth_jax(sizes_mb, repeats: int = 5) -> list[dict]:
    """Eager `device_put` of a pinned_host array into device memory, blocked on; medians."""
    import jax
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    host, device = (SingleDeviceSharding(dev, memory_kind=k) for k in ("pinned_host", "device"))
    rows = []
    for mb in sizes_mb:
        x = jax.device_put(np.ones(mb * 2**19, np.uint16), host)
        times = seconds(lambda: jax.device_put(x, device).block_until_ready(), repeats)
        rows.append({"bytes": int(x.nbytes), "seconds": median(times), "gb_per_s": x.nbytes / median(times) / 1e9})
    return rows


def h2d_bandwidth_torch(sizes_mb, repeats: int = 5) -> list[dict]:
    """`copy_` from pinned host memory into a CUDA tensor, timed with CUDA events; medians."""
    import torch

    rows = []
    for mb in sizes_mb:
        src = torch.ones(mb * 2**20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        dst.copy_(src, non_blocking=True)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rows.append({"bytes": src.numel(), "seconds": median(times), "gb_per_s": src.numel() / median(times) / 1e9})
    return rows
