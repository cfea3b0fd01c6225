"""Hardware profiles: host->device bandwidth and per-layer compute times, measured or estimated.

The simulator and the planner turn bytes and experts into seconds with a profile. A profile is a
JSON file (format `jaxmoe-profile`, version 1):

    {"format": "jaxmoe-profile", "version": 1, "name": "h100", "measured": false,
     "device": "...", "note": "...", "sources": ["..."],
     "h2d": {"bandwidth_Bps": 5.3e10, "latency_s": 1e-05,     # one transfer: latency + bytes / bandwidth
             "points": [[bytes, seconds], ...]},              # measured profiles: the raw timings
     "memory_bandwidth_Bps": 2.68e12,  # effective device memory bandwidth of a decode matvec
     "launch_s": 2e-05,                # one dispatched device call from Python
     "sync_s": 3e-05,                  # one device->host read of the router's choice (once per MoE layer)
     "models": [{"model": {model identity}, "kv_length": 1024, "attention_s": ..., "router_s": ...,
                 "expert_s": ..., "mlp_s": ..., "head_s": ...}]}

`models` holds compute times measured at a model's real shapes (random weights); a model not
listed gets roofline estimates: bytes read / memory_bandwidth_Bps, because decoding one token
is a matrix-vector product and so bound by memory bandwidth, not FLOPs.

Built-in profiles (`schedules/profiles/`, loadable by name): `h100` and `h200` are ESTIMATES
(`"measured": false`) from published figures; `cpu` was measured on the development machine with
`jaxmoe profile`. Measure your own device with `jaxmoe profile --model M --out FILE`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_FORMAT = "jaxmoe-profile"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_SIZES = (2**16, 2**18, 2**20, 2**22, 2**24, 2**26)


class ProfileError(ValueError):
    pass


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(spec: str | Path) -> dict[str, Any]:
    """A built-in profile's name (h100, h200, cpu) or a profile file."""
    path = Path(spec)
    if not path.is_file():
        path = PROFILES_DIR / f"{spec}.json"
        if not path.is_file():
            raise ProfileError(f"no profile {spec!r}: give a file or one of {', '.join(builtin_profiles())}")
    doc = json.loads(path.read_text())
    if doc.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a jaxmoe profile")
    for key in ("h2d", "memory_bandwidth_Bps"):
        if key not in doc:
            raise ProfileError(f"{path}: missing {key!r}")
    return doc


def fit_transfer(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (latency s, bandwidth B/s) of seconds = latency + bytes / bandwidth."""
    x = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    slope = max(slope, 1e-15)
    return max(float(intercept), 0.0), float(1.0 / slope)


# -- measuring ------------------------------------------------------------------------------------


def _time(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of fn(*args) with the result blocked on, after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure_h2d(sizes=DEFAULT_SIZES, repeats: int = 5) -> list[tuple[int, float]]:
    """Seconds to move `size` bytes from a pinned_host array to device memory (eager device_put)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    dev = jax.devices()[0]
    host, device = (SingleDeviceSharding(dev, memory_kind=k) for k in ("pinned_host", "device"))
    points = []
    for size in sizes:
        x = jax.device_put(np.ones(size // 2, np.uint16), host)
        jax.block_until_ready(x)
        points.append((int(size), _time(lambda a: jax.device_put(a, device), x, repeats=repeats)))
    return points


def measure_compute(config, kv_length: int = 1024, repeats: int = 5) -> dict[str, Any]:
    """Decode-step compute times of one layer at the model's real shapes, random weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmoe.models import moe as moe_ops
    from jaxmoe.models.transformer import Attention, DenseMLP, KVCache
    from jaxmoe.offload.plan import model_identity

    c = config.replace(sliding_window=None)
    dt, d, e, i = c.jnp_dtype, c.hidden_size, c.num_experts, c.moe_intermediate_size
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, 1, d), dt)
    attn = Attention(c, nnx.Rngs(0))
    graphdef, state = nnx.split(attn)
    kc = jnp.zeros(KVCache.key_shape(c, 1, kv_length), dt)
    vc = jnp.zeros(KVCache.value_shape(c, 1, kv_length), dt)
    attention = jax.jit(lambda s, x, k, v: nnx.merge(graphdef, s)(x, kv_length - 1, k, v)[0])
    router_w = (jax.random.normal(key, (e, d), jnp.float32) * 0.02).astype(dt)  # [out, in], as the model's
    router = jax.jit(lambda x, w: moe_ops.route(x[0] @ w.T, c.top_k, c.norm_topk_prob))

    # One whole expert: the cost model charges a split expert's top and bottom segments together
    # the same as the whole (the same rows are read), so segments are not timed apart.
    gate_up = (jax.random.normal(key, (2 * i, d), jnp.float32) * 0.02).astype(dt)
    down = (jax.random.normal(key, (d, i), jnp.float32) * 0.02).astype(dt)
    expert = jax.jit(lambda x, gate_up, down: moe_ops.expert_ffn(x[0], gate_up, down, c.hidden_act))
    out = {
        "model": model_identity(c), "kv_length": kv_length,
        "attention_s": _time(attention, state, x, kc, vc, repeats=repeats),
        "router_s": _time(router, x, router_w, repeats=repeats),
        "expert_s": _time(expert, x, gate_up, down, repeats=repeats),
    }
    dense = c.intermediate_size if not all(c.moe_layers) else c.shared_expert_intermediate_size
    if dense:
        mlp = DenseMLP(d, dense, c.hidden_act, dt, nnx.Rngs(0))
        mdef, mstate = nnx.split(mlp)
        out["mlp_s"] = _time(jax.jit(lambda s, x: nnx.merge(mdef, s)(x)), mstate, x, repeats=repeats)
    head = (jax.random.normal(key, (c.vocab_size, d), jnp.float32) * 0.02).astype(dt)
    out["head_s"] = _time(jax.jit(lambda x, w: x[0] @ w.T), x, head, repeats=repeats)
    return out


def measure_overheads(repeats: int = 20) -> tuple[float, float]:
    """(launch_s, sync_s): one tiny jitted call, and one device->host read of a small array."""
    import jax
    import jax.numpy as jnp

    tiny = jax.jit(lambda a: a + 1)
    a = jnp.zeros((8,), jnp.int32)
    launch = _time(tiny, a, repeats=repeats)
    sync = []
    for _ in range(repeats):
        b = tiny(a)
        jax.block_until_ready(b)
        t = time.perf_counter()
        np.asarray(b)
        sync.append(time.perf_counter() - t)
    return launch, float(np.median(sync))


def measure_profile(configs, name: str, kv_length: int = 1024, sizes=DEFAULT_SIZES, repeats: int = 5) -> dict[str, Any]:
    """A measured profile of the current default device for `configs` (one layer each)."""
    import jax

    points = measure_h2d(sizes, repeats)
    latency, bandwidth = fit_transfer(points)
    models = [measure_compute(c, kv_length, repeats) for c in configs]
    # Effective memory bandwidth of a whole expert's matvec: the roofline for unmeasured models.
    mem_bw = max(c.expert_bytes() / m["expert_s"] for c, m in zip(configs, models))
    launch, sync = measure_overheads(max(repeats, 5))
    dev = jax.devices()[0]
    return {
        "format": PROFILE_FORMAT, "version": 1, "name": name, "measured": True,
        "device": f"{dev.platform}: {dev.device_kind} ({platform.processor() or platform.machine()})",
        "note": f"measured by `jaxmoe profile` with jax {jax.__version__}; medians of {repeats} runs after a warm-up",
        "sources": ["measured"],
        "h2d": {"bandwidth_Bps": bandwidth, "latency_s": latency, "points": [list(p) for p in points]},
        "memory_bandwidth_Bps": mem_bw, "launch_s": launch, "sync_s": sync, "models": models,
    }


def write_profile(path: str | Path, profile: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(profile, indent=1) + "\n")
