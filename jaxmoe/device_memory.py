"""Device memory settings jaxmoe applies for an offloaded model, so the budget is the budget.

XLA reads three environment variables once, when JAX's backend starts:

- `XLA_PYTHON_CLIENT_PREALLOCATE`: by default JAX takes 75% of the GPU at start-up whatever the
  model needs; jaxmoe turns that off, so memory is allocated as used.
- `XLA_PYTHON_CLIENT_MEM_FRACTION`: the share of the GPU JAX's allocator may ever hold; jaxmoe sets
  it to the budget plus a workspace (`device_limit`), so an offloaded model cannot quietly grow
  past what the user allowed: it fails with an out-of-memory error instead. jaxlib also reads the
  newer name `XLA_CLIENT_MEM_FRACTION` and refuses to start with both set, so a user's setting of
  either one stands.
- `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`: XLA caps pinned host memory at 64 GiB by default (it reads
  the value in GiB); models whose experts need more get the cap raised (never lowered).

`jaxmoe.load` calls `configure` before anything can start the backend. A variable the user
exported is left as it is, and once JAX has started nothing is changed; the report says which.
On a CPU there is no GPU allocator to cap, and the fraction is not set.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

from jaxmoe.config import ModelConfig
from jaxmoe.offload import plan as planning
from jaxmoe.offload.plan import OffloadPlan

GiB = 2**30
XLA_HOST_LIMIT_GB = 64  # XLA's default cap on pinned host memory
SCRATCH_BYTES = 256 * 2**20  # compiled-code scratch, cuBLAS/cuDNN workspaces


# Names under which a user may have set each variable `settings` writes.
USER_NAMES = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")}


def workspace_bytes(config: ModelConfig, kv_length: int) -> int:
    """Memory a forward pass needs beyond the planned footprint (weights, caches, transfer
    buffers): the activations of the longest prompt (kv_length tokens, float32) -- one layer's
    attention scores (a row of kv_length per head and token), its logits, a few hidden-state
    buffers and the routed experts' intermediate products -- plus fixed scratch."""
    rows = kv_length
    per_token = (config.num_heads * kv_length + config.vocab_size + 4 * config.hidden_size
                 + 2 * config.top_k * config.moe_intermediate_size)
    return SCRATCH_BYTES + 4 * rows * per_token


def device_limit(config: ModelConfig, plan: OffloadPlan, vram_budget: int | None = None,
                 fast_path: bool = True) -> int:
    """The cap for JAX's allocator: the user's budget (else the planned footprint) plus
    `workspace_bytes`, plus, when a layer caches every expert whole and runs as the resident model
    does (`fast_path`), one layer's experts: the resident prefill stacks them for a grouped
    matmul on GPU."""
    limit = max(vram_budget or 0, planning.footprint(config, plan)["total"]) + workspace_bytes(config, plan.kv_length)
    whole = any(p.slots == config.num_experts and p.split_rows == config.moe_intermediate_size for p in plan.layers)
    return limit + (config.num_experts * config.expert_bytes() if fast_path and whole else 0)


def settings(device_limit_bytes: int, pinned_host_bytes: int, device_total_bytes: int | None) -> dict[str, str]:
    """The environment that caps JAX at `device_limit_bytes` of a device holding
    `device_total_bytes` (None: unknown, no GPU) and lets it pin `pinned_host_bytes` of host memory."""
    out = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if device_total_bytes:
        out["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(1.0, device_limit_bytes / device_total_bytes):.4f}"
    host_gb = math.ceil(pinned_host_bytes / GiB) + 1
    out["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = str(max(XLA_HOST_LIMIT_GB, host_gb))
    return out


def gpu_total_bytes() -> int | None:
    """Memory of the first GPU as the NVIDIA driver reports it, without starting JAX; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[0]) * 2**20 if out else None


def backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def configure(device_limit_bytes: int, pinned_host_bytes: int) -> dict:
    """Apply `settings` to this process's environment if JAX has not started; what happened."""
    report = {"device_limit_bytes": int(device_limit_bytes), "pinned_host_bytes": int(pinned_host_bytes),
              "applied": {}, "user_set": {}, "backend_already_started": backend_started()}
    if report["backend_already_started"]:
        return report
    total = gpu_total_bytes()
    report["device_total_bytes"] = total
    for name, value in settings(device_limit_bytes, pinned_host_bytes, total).items():
        users = {n: os.environ[n] for n in USER_NAMES.get(name, (name,)) if n in os.environ}
        if users:
            report["user_set"].update(users)
        else:
            os.environ[name] = report["applied"][name] = value
    return report
