"""Offload configuration: per-layer cache slots and split ratios, fixed before compilation.

A plan comes from a schedule file (written by the planner), or from a budget on the command line
split uniformly over layers. Device footprint accounting, the same everywhere:

    resident (all weights but routed experts) + KV cache + sum_l slots_l * top_bytes_l + reserve

where top_bytes_l is one expert's cached (top) segment at layer l and `reserve` holds the
segments in flight: a token's k demand fetches, k prefetches for the next layer and k bottom
segments, at most 3 k whole experts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jaxmoe.config import ModelConfig

SCHEDULE_FORMAT = "jaxmoe-schedule"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetError(ValueError):
    pass


def parse_size(text: str) -> int:
    """'6GiB', '800MiB', '1.5GB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise BudgetError(f"cannot read memory size {text!r}; write e.g. 6GiB, 800MiB or 1.5GB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    layer: int  # model layer index (MoE layers only)
    slots: int  # cached experts (their top segments)
    split_rows: int  # rows of the intermediate dimension in the top segment; I means no split
    hot: tuple[int, ...] = ()  # experts placed in the cache first (static policy's hot set)
    prior: tuple[float, ...] | None = None  # per-token use frequency from traces


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    layers: tuple[LayerPlan, ...]
    kv_length: int
    policy: str = "lru"
    prefetch: bool = True

    def to_json(self, config: ModelConfig) -> dict:
        return {
            "kv_length": self.kv_length, "policy": self.policy, "prefetch": self.prefetch,
            "layers": [{"layer": p.layer, "slots": p.slots, "split_ratio": p.split_rows / config.moe_intermediate_size}
                       for p in self.layers],
        }


def check_policy(plan: OffloadPlan) -> None:
    """Refuse a plan its policy cannot run as asked: `static` keeps each layer's hot set, which only
    a schedule from `jaxmoe plan` gives; without one it would silently evict as LRU does."""
    if plan.policy == "static" and not all(p.hot for p in plan.layers):
        raise ValueError("policy 'static' needs a schedule from `jaxmoe plan` (each layer's hot set, from a trace), "
                         "and this plan has none: give --schedule FILE, or choose lru, lfu or lcp")


def row_bytes(config: ModelConfig) -> int:
    """Bytes of one intermediate row of an expert (its gate, up and down rows)."""
    return 3 * config.hidden_size * np.dtype(config.jnp_dtype).itemsize


def split_rows(config: ModelConfig, ratio: float) -> int:
    if not 0.0 < ratio <= 1.0:
        raise BudgetError(f"split ratio must be in (0, 1], got {ratio}")
    return max(1, min(config.moe_intermediate_size, round(ratio * config.moe_intermediate_size)))


def routed_expert_bytes(config: ModelConfig) -> int:
    """Bytes of every routed expert of the model: what host memory holds when they are offloaded."""
    return len(config.moe_layer_ids) * config.num_experts * config.expert_bytes()


def resident_bytes(config: ModelConfig) -> int:
    from jaxmoe.models.transformer import param_count

    return param_count(config) * np.dtype(config.jnp_dtype).itemsize - routed_expert_bytes(config)


def kv_bytes(config: ModelConfig, length: int) -> int:
    return 2 * config.num_layers * length * config.num_kv_heads * config.head_dim * np.dtype(config.jnp_dtype).itemsize


def reserve_bytes(config: ModelConfig) -> int:
    return 3 * config.top_k * config.expert_bytes()


def cache_bytes(config: ModelConfig, plan: OffloadPlan) -> int:
    return sum(p.slots * p.split_rows * row_bytes(config) for p in plan.layers)


def fixed_bytes(config: ModelConfig, kv_length: int) -> int:
    """Device bytes of any plan whatever its caches: resident weights, KV cache and transfer reserve."""
    return resident_bytes(config) + kv_bytes(config, kv_length) + reserve_bytes(config)


def footprint(config: ModelConfig, plan: OffloadPlan) -> dict[str, int]:
    expert_cache = cache_bytes(config, plan)
    return {
        "resident": resident_bytes(config),
        "kv_cache": kv_bytes(config, plan.kv_length),
        "expert_cache": expert_cache,
        "transfer_reserve": reserve_bytes(config),
        "total": fixed_bytes(config, plan.kv_length) + expert_cache,
    }


def min_cache_bytes(config: ModelConfig, split_ratio: float) -> int:
    """The smallest expert cache: in every MoE layer, a token's top_k experts as top segments at
    `split_ratio`."""
    return len(config.moe_layer_ids) * config.top_k * split_rows(config, split_ratio) * row_bytes(config)


def cache_budget(config: ModelConfig, kv_length: int, vram_budget: int | None = None,
                 expert_budget: float | None = None, *, split_ratio: float = 1.0) -> int:
    """Bytes the expert caches may use, from exactly one of `vram_budget` (the whole device
    footprint, of which `fixed_bytes` are not cache) and `expert_budget` (a share in (0, 1] of all
    routed expert bytes).

    The one place budgets are checked: a budget that leaves less than `min_cache_bytes` at
    `split_ratio` (the smallest ratio the caller will cache at) is refused, naming the minimum."""
    if (vram_budget is None) == (expert_budget is None):
        raise BudgetError("give exactly one of a VRAM budget and an expert budget")
    least = min_cache_bytes(config, split_ratio)
    if expert_budget is not None:
        if not 0.0 < expert_budget <= 1.0:
            raise BudgetError(f"expert budget is a fraction in (0, 1], got {expert_budget}")
        total = routed_expert_bytes(config)
        budget = round(expert_budget * total)
        if budget < least:
            raise BudgetError(
                f"expert budget {expert_budget:g} leaves {budget // (least // config.top_k)} cache slots per layer; "
                f"a token needs {config.top_k}: the minimum at split ratio {split_ratio:g} is {least / total:.4f}")
        return budget
    fixed = fixed_bytes(config, kv_length)
    if vram_budget - fixed < least:
        minimum = fixed + least
        raise BudgetError(
            f"VRAM budget {format_size(vram_budget)} is below the minimum this model needs: {format_size(minimum)} "
            f"({minimum} bytes: the fixed footprint {format_size(fixed)} of resident weights "
            f"{format_size(resident_bytes(config))}, KV cache for {kv_length} tokens {format_size(kv_bytes(config, kv_length))} "
            f"and transfer buffers {format_size(reserve_bytes(config))}, plus {config.top_k} cached experts per layer "
            f"at split ratio {split_ratio:g})")
    return vram_budget - fixed


def uniform_plan(config: ModelConfig, slots: int, ratio: float, kv_length: int, policy: str, prefetch: bool) -> OffloadPlan:
    rows = split_rows(config, ratio)
    layers = tuple(LayerPlan(l, slots, rows) for l in config.moe_layer_ids)
    return OffloadPlan(layers, kv_length, policy, prefetch)


def plan_from_budget(
    config: ModelConfig,
    *,
    vram_budget: int | None = None,
    expert_budget: float | None = None,
    split_ratio: float = 1.0,
    kv_length: int = 2048,
    policy: str = "lru",
    prefetch: bool = True,
) -> OffloadPlan:
    """Uniform slots per layer for a whole-device byte budget or a share of all expert bytes."""
    budget = cache_budget(config, kv_length, vram_budget, expert_budget, split_ratio=split_ratio)
    slot_bytes = len(config.moe_layer_ids) * split_rows(config, split_ratio) * row_bytes(config)  # a slot per layer
    slots = min(config.num_experts, budget // slot_bytes)
    return uniform_plan(config, slots, split_ratio, kv_length, policy, prefetch)


def model_identity(config: ModelConfig) -> dict:
    """What a schedule must match: the shapes that decide every cache buffer."""
    return {k: getattr(config, k) for k in (
        "family", "num_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size", "dtype")}


def write_schedule(path: str | Path, config: ModelConfig, plan: OffloadPlan, extra: dict | None = None) -> None:
    layers = []
    for p in plan.layers:
        entry = {"layer": p.layer, "slots": p.slots, "split_ratio": p.split_rows / config.moe_intermediate_size,
                 "hot": list(p.hot)}
        if p.prior is not None:
            entry["prior"] = list(p.prior)
        layers.append(entry)
    doc = {"format": SCHEDULE_FORMAT, "version": 1, "model": model_identity(config), "kv_length": plan.kv_length,
           "policy": plan.policy, "prefetch": plan.prefetch, "layers": layers, **(extra or {})}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read_schedule(path: str | Path, config: ModelConfig, policy: str | None = None,
                  prefetch: bool | None = None, kv_length: int | None = None) -> OffloadPlan:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != SCHEDULE_FORMAT:
        raise BudgetError(f"{path} is not a jaxmoe schedule")
    want = model_identity(config)
    if doc.get("model") != want:
        diff = {k: (doc.get("model", {}).get(k), v) for k, v in want.items() if doc.get("model", {}).get(k) != v}
        raise BudgetError(f"{path} was planned for another model; differing (schedule, this model): {diff}")
    layers = []
    for entry in doc["layers"]:
        slots = int(entry["slots"])
        if not config.top_k <= slots <= config.num_experts:
            raise BudgetError(f"{path}: layer {entry['layer']} has {slots} slots; need {config.top_k}..{config.num_experts}")
        prior = tuple(entry["prior"]) if entry.get("prior") is not None else None
        layers.append(LayerPlan(int(entry["layer"]), slots, split_rows(config, float(entry["split_ratio"])),
                                tuple(entry.get("hot", ())), prior))
    if tuple(p.layer for p in layers) != config.moe_layer_ids:
        raise BudgetError(f"{path}: schedule covers layers {[p.layer for p in layers]}, the model's MoE layers are {list(config.moe_layer_ids)}")
    return OffloadPlan(tuple(layers), kv_length or int(doc.get("kv_length", 2048)),
                       policy or doc.get("policy", "lru"), doc.get("prefetch", True) if prefetch is None else prefetch)
