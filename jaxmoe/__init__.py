"""jaxmoe: mixture-of-experts inference on JAX for GPUs too small to hold the model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def cache_dir() -> Path:
    return Path(os.environ.get("JAXMOE_CACHE", Path.home() / ".cache" / "jaxmoe"))


def _source_dir(path: str | Path | None) -> Path:
    if path is None:
        from jaxmoe.demo import MODEL_DIR

        return MODEL_DIR
    return Path(path)


def resolve_model_dir(path: str | Path | None = None, progress: bool = False) -> Path:
    """A converted checkpoint directory for `path`.

    `None` means the bundled demo model. A Hugging Face directory (config.json and safetensors) is
    converted once into the cache (`$JAXMOE_CACHE`, default ~/.cache/jaxmoe), keyed by the
    checkpoint format version and the source files' names, sizes and modification times.
    """
    from jaxmoe import checkpoint

    path = _source_dir(path)
    if (path / checkpoint.MANIFEST).is_file():
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a jaxmoe checkpoint ({checkpoint.MANIFEST}) nor a Hugging Face model (config.json)")
    digest = hashlib.sha256(f"format {checkpoint.FORMAT_VERSION};".encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    target = cache_dir() / f"{path.name}-{digest.hexdigest()[:12]}"
    if not (target / checkpoint.MANIFEST).is_file():
        from jaxmoe.convert import convert

        convert(path, target, progress=progress)
    return target


def load(
    path: str | Path | None = None,
    *,
    vram_budget: int | None = None,
    expert_budget: float | None = None,
    schedule: str | Path | None = None,
    policy: str | None = None,
    split_ratio: float | None = None,
    prefetch: bool = True,
    kv_length: int = 2048,
    store=None,
    fast_path: bool = True,
    progress: bool = False,
):
    """Load a converted (or Hugging Face, converted on first use) model; `None` loads the demo.

    With none of `vram_budget` (bytes of the whole device footprint), `expert_budget` (share of
    all expert bytes the device cache may hold) and `schedule` (a planner's JSON), the model is
    fully resident. Otherwise routed experts stay in host memory behind per-layer device caches;
    `store` (an engine's `.store`) reuses experts already in host memory when only the policy,
    prefetch or cache sizes change. An offloaded load sets JAX's device memory limits first
    (jaxmoe.device_memory). `fast_path=False` makes every MoE layer take the host round trip
    even when its cache cannot miss (for benchmarks that compare paths). `progress` shows a
    conversion's progress bar.
    """
    from jaxmoe.engine import Engine

    if vram_budget is None and expert_budget is None and schedule is None:
        return Engine.from_dir(resolve_model_dir(path, progress))
    from jaxmoe import device_memory
    from jaxmoe.offload import plan as planning
    from jaxmoe.offload.runtime import OffloadEngine

    config = _config_of(path)  # the plan is checked before any conversion or weight reading
    if schedule is not None:
        if split_ratio is not None:
            raise ValueError("a schedule fixes the split ratios; drop --split-ratio")
        plan = planning.read_schedule(schedule, config, policy=policy, prefetch=prefetch, kv_length=kv_length)
        minimum = planning.footprint(config, plan)["total"]
        if vram_budget is not None and minimum > vram_budget:
            raise planning.BudgetError(f"schedule {schedule} needs {planning.format_size(minimum)}, over the budget")
    else:
        plan = planning.plan_from_budget(config, vram_budget=vram_budget, expert_budget=expert_budget,
                                         split_ratio=split_ratio or 1.0, kv_length=kv_length,
                                         policy=policy or "lru", prefetch=prefetch)
    planning.check_policy(plan)
    # Before conversion or loading can start JAX: XLA reads its memory settings once.
    memory = device_memory.configure(device_memory.device_limit(config, plan, vram_budget, fast_path),
                                     planning.routed_expert_bytes(config))
    engine = OffloadEngine.from_dir(resolve_model_dir(path, progress), plan, store, fast_path=fast_path)
    engine.device_memory = memory
    return engine


def _config_of(path: str | Path | None):
    from jaxmoe import checkpoint

    path = _source_dir(path)
    if (path / checkpoint.MANIFEST).is_file():
        return checkpoint.load_config(path)
    from jaxmoe.convert.convert import read_hf_config

    return read_hf_config(path, None)


__all__ = ["load", "resolve_model_dir", "__version__"]
