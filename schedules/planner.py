"""Adaptive cache configuration: per-layer slots and split ratios under a device memory budget.

Why offline: every cache buffer's shape ([slots, 3, split_rows, D] per layer) must be fixed before
jit compilation, so the configuration is chosen from traces before the runtime starts, and
written as a schedule (jaxmoe.offload.plan.write_schedule) that the runtime reads.

Inputs. Per-layer hit curves: the trace is replayed (schedules.simulate, the runtime's own
controllers) once per slot count s of a grid, all layers at s; layers are independent (a layer's
cache sees only its own steps and the prefetches into it), so one replay gives every layer's
per-token demand and prefetch segment counts at s. The split ratio r changes no decision, only
the bytes: a segment count times the top (r) or bottom (1 - r) segment's bytes. Latency of a
configuration comes from schedules.costmodel (compute/transfer pipeline over layers).

Algorithm (after MoEpic's divide-and-conquer with fixed-point iteration). Layers interact only
through the latency model: a layer's prefetch hides behind its predecessor's compute, and all
layers share one copy stream. So:

1. Start from the best uniform configuration that fits.
2. Fixed-point step: with every other layer held at its current option, price each option of
   each layer l by the full latency model (G[l, o] = predicted seconds per token when only layer l
   changes to o). This is each layer's marginal cost curve in its context.
3. Divide and conquer over the separable problem min sum_l G[l, o_l] s.t. sum_l bytes(o_l) <= B:
   split the layer range in halves, solve each half for every budget (its latency-vs-bytes front),
   and allocate the budget between the halves by merging the two fronts (min-plus convolution
   over budget units); a single layer's front is its best option within each budget. The root's
   front at B gives the allocation; backtracking the splits gives each layer's option.
4. Repeat 2-3 until the allocation stops changing (the fixed point) or stops lowering the
   full model's latency (the marginal costs of a changed context can oscillate by a fraction of
   a percent); keep the best allocation.

Budgets are counted in units of the gcd of the option sizes (coarsened to at most MAX_UNITS
units, rounding option sizes up, so a plan never exceeds its budget). `exhaustive` is the brute
force the tests compare against.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.offload import plan as planning
from jaxmoe.offload.plan import BudgetError, LayerPlan, OffloadPlan
from jaxmoe.schedules import costmodel
from jaxmoe.schedules import simulate as sim
from jaxmoe.schedules.trace import Trace

RATIOS = (1.0, 0.75, 0.5, 0.25)
MAX_UNITS = 4096
MAX_ITERATIONS = 12


@dataclasses.dataclass
class Problem:
    """Everything the optimiser needs, as arrays. L layers, O options, T decode tokens."""

    options: list[tuple[int, float]]  # (slots, split ratio) of each option
    option_bytes: np.ndarray  # [O] cache bytes of one layer's option
    a: np.ndarray  # [L, 1] seconds before each layer's experts
    c: np.ndarray  # [L, T] expert compute seconds
    demand_s: np.ndarray  # [L, O, T] demand transfer seconds
    prefetch_s: np.ndarray  # [L, O, T] prefetch transfer seconds (into layer l)
    tail: float

    @property
    def num_layers(self) -> int:
        return self.demand_s.shape[0]

    def latency(self, assign) -> float:
        """Mean predicted seconds per decode token of one allocation (option index per layer)."""
        rows = np.arange(self.num_layers)
        assign = np.asarray(assign)
        t = costmodel.pipeline(self.a, self.c, self.prefetch_s[rows, assign], self.demand_s[rows, assign])
        return float(t.mean() + self.tail)

    def latencies(self, assigns: np.ndarray) -> np.ndarray:
        """[N] latencies of N allocations [N, L] at once."""
        rows = np.arange(self.num_layers)[:, None]
        pre = self.prefetch_s[rows, assigns.T]  # [L, N, T]
        dem = self.demand_s[rows, assigns.T]
        t = costmodel.pipeline(self.a[:, :, None], self.c[:, None, :], pre, dem)
        return t.mean(axis=-1) + self.tail

    def marginal_costs(self, assign) -> np.ndarray:
        """G [L, O]: latency when layer l alone switches to option o, the others as in `assign`.

        Layer l's option first matters at layer l-1 (which issues the prefetch into l), so each
        layer's options are priced by resuming the base run's pipeline state there."""
        rows = np.arange(self.num_layers)
        assign = np.asarray(assign)
        pre, dem = list(self.prefetch_s[rows, assign]), list(self.demand_s[rows, assign])  # L x [T]
        states: list = []
        costmodel.pipeline(self.a, self.c, pre, dem, states=states)
        out = np.empty((self.num_layers, len(self.options)))
        for l in range(self.num_layers):
            p, d = list(pre), list(dem)
            p[l], d[l] = self.prefetch_s[l], self.demand_s[l]  # [O, T]
            start = max(l - 1, 0)
            t = costmodel.pipeline(self.a, self.c, p, d, start=start, state=states[start])
            out[l] = np.broadcast_to(t, (len(self.options), t.shape[-1])).mean(axis=-1) + self.tail
        return out


# -- building the problem from a trace -------------------------------------------------------------


def slot_grid(config: ModelConfig, max_points: int = 24) -> list[int]:
    """Every slot count k..E for small E, else about `max_points` spread geometrically."""
    k, e = config.top_k, config.num_experts
    if e - k + 1 <= max_points:
        return list(range(k, e + 1))
    return sorted({int(round(x)) for x in np.geomspace(k, e, max_points)} | {k, e})


def ratio_grid(config: ModelConfig, ratios=RATIOS) -> list[float]:
    """Ratios whose top segments differ in rows (tiny models collapse some)."""
    out, rows = [], set()
    for r in ratios:
        n = planning.split_rows(config, r)
        if n not in rows:
            rows.add(n)
            out.append(n / config.moe_intermediate_size)
    return out


@dataclasses.dataclass
class Curves:
    """Per slot count s (grid), per layer and decode token: segment counts of a replay at s."""

    slots: list[int]
    demand_tops: np.ndarray  # [S, L, T]
    demand_bottoms: np.ndarray
    prefetch_tops: np.ndarray
    prefetch_bottoms: np.ndarray
    hits: np.ndarray  # [S, L] decode hits
    misses: np.ndarray  # [S, L]
    needed: np.ndarray  # [L, T]
    calls: np.ndarray  # [L, T]


def layer_curves(trace: Trace, config: ModelConfig, policy: str, slots: list[int], prefetch: bool,
                 predictor: str = "router", prior: np.ndarray | None = None, progress=None) -> Curves:
    """Replay the trace once per slot count (every layer at that count); see the module docstring."""
    ratio = 0.5 if config.moe_intermediate_size > 1 else 1.0  # any split: decisions do not depend on it
    reps = []
    for s in slots:
        plan = planning.uniform_plan(config, s, ratio, 0, policy, prefetch)
        if prior is not None:
            plan = sim.with_prior(plan, prior, hot=True)
        reps.append(sim.replay(trace, config, plan, policy, predictor))
        if progress:
            progress(f"replayed the trace at {s} slots per layer ({len(reps)}/{len(slots)})")
    stack = lambda name: np.stack([getattr(r, name) for r in reps])  # noqa: E731
    hits = np.stack([(r.needed - r.demand_tops).sum(axis=1) for r in reps])
    return Curves(slots, stack("demand_tops"), stack("demand_bottoms"), stack("prefetch_tops"),
                  stack("prefetch_bottoms"), hits, stack("demand_tops").sum(axis=2), reps[0].needed, reps[0].calls)


def build_problem(config: ModelConfig, curves: Curves, profile: dict, ratios: list[float], prefetch: bool) -> Problem:
    rows = planning.row_bytes(config)
    options = [(s, r) for s in curves.slots for r in ratios]
    option_bytes = np.array([s * planning.split_rows(config, r) * rows for s, r in options], np.int64)
    times = costmodel.compute_times(config, profile)
    a, c = costmodel.layer_compute(config, times, curves.needed, curves.calls, prefetch)
    layers, tokens = curves.needed.shape
    demand = np.empty((layers, len(options), tokens))
    pre = np.empty_like(demand)
    for o, (s, r) in enumerate(options):
        si = curves.slots.index(s)
        top = planning.split_rows(config, r) * rows
        bottom = (config.moe_intermediate_size - planning.split_rows(config, r)) * rows
        split = bottom > 0
        demand[:, o] = costmodel.transfer_seconds(
            curves.demand_tops[si] * top + curves.demand_bottoms[si] * bottom,
            curves.demand_tops[si] + split * curves.demand_bottoms[si], profile)
        pre[:, o] = costmodel.transfer_seconds(
            curves.prefetch_tops[si] * top + curves.prefetch_bottoms[si] * bottom,
            curves.prefetch_tops[si] + split * curves.prefetch_bottoms[si], profile)
    return Problem(options, option_bytes, a, c, demand, pre, costmodel.tail_seconds(config, times))


# -- optimisation ----------------------------------------------------------------------------------


def budget_units(option_bytes: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """(option sizes in units, budget in units), at most MAX_UNITS units, sizes rounded up."""
    unit = int(np.gcd.reduce(option_bytes.astype(np.int64)))
    if budget // unit > MAX_UNITS:
        unit = math.ceil(budget / MAX_UNITS)
    return -(-option_bytes // unit), int(budget // unit)


def _leaf(costs: np.ndarray, sizes: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's front: best cost and option within each budget 0..units."""
    f = np.full(units + 1, np.inf)
    arg = np.full(units + 1, -1)
    for o in np.argsort(costs):  # cheapest first: the first option that fits a budget is its best
        u = int(sizes[o])
        if u <= units:
            free = (arg[u:] < 0)
            arg[u:][free] = o
            f[u:][free] = costs[o]
    return f, arg


def _steps(front: np.ndarray) -> int:
    return int(np.count_nonzero(front[1:] != front[:-1]))


def _merge(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min-plus convolution of two non-increasing fronts; returns (front, budget given to left)."""
    units = len(left) - 1
    if _steps(left) > _steps(right):
        f, take = _merge(right, left)
        return f, np.where(take >= 0, np.arange(units + 1) - take, -1)
    f = np.full(units + 1, np.inf)
    take = np.full(units + 1, -1)
    with np.errstate(invalid="ignore"):  # inf - inf where neither budget fits
        breaks = np.flatnonzero(np.r_[np.isfinite(left[0]), np.diff(left) < 0])  # where left improves
    for j in breaks:
        cand = np.full(units + 1, np.inf)
        cand[j:] = left[j] + right[: units + 1 - j]
        better = cand < f
        f[better], take[better] = cand[better], j
    return f, take


def divide_and_conquer(G: np.ndarray, sizes: np.ndarray, units: int) -> list[int] | None:
    """min sum_l G[l, o_l] s.t. sum_l sizes[o_l] <= units, exactly; None if nothing fits."""

    def solve(lo: int, hi: int):
        if hi - lo == 1:
            f, arg = _leaf(G[lo], sizes, units)
            return f, ("leaf", lo, arg)
        mid = (lo + hi) // 2
        (fl, tl), (fr, tr) = solve(lo, mid), solve(mid, hi)
        f, take = _merge(fl, fr)
        return f, ("node", take, tl, tr)

    def backtrack(tree, budget: int, out: dict[int, int]) -> None:
        if tree[0] == "leaf":
            out[tree[1]] = int(tree[2][budget])
            return
        _, take, tl, tr = tree
        j = int(take[budget])
        backtrack(tl, j, out)
        backtrack(tr, budget - j, out)

    f, tree = solve(0, G.shape[0])
    if not np.isfinite(f[units]):
        return None
    out: dict[int, int] = {}
    backtrack(tree, units, out)
    return [out[l] for l in range(G.shape[0])]


def best_uniform(problem: Problem, budget: int) -> list[int] | None:
    fits = [o for o in range(len(problem.options)) if problem.option_bytes[o] * problem.num_layers <= budget]
    if not fits:
        return None
    lat = problem.latencies(np.array([[o] * problem.num_layers for o in fits]))
    return [fits[int(np.argmin(lat))]] * problem.num_layers


def optimise(problem: Problem, budget: int) -> tuple[list[int], dict[str, Any]]:
    """The planner's allocation (option per layer) for `budget` cache bytes, and how it got there."""
    start = best_uniform(problem, budget)
    if start is None:
        raise BudgetError(f"a cache budget of {planning.format_size(budget)} does not give every layer its minimum "
                          f"({planning.format_size(int(problem.option_bytes.min()) * problem.num_layers)})")
    sizes, units = budget_units(problem.option_bytes, budget)
    assign, latency = start, problem.latency(start)
    history, stop = [latency], "iteration limit"
    for _ in range(MAX_ITERATIONS):
        new = divide_and_conquer(problem.marginal_costs(assign), sizes, units)
        if new is None or new == assign:
            stop = "fixed point"
            break
        new_latency = problem.latency(new)
        history.append(new_latency)
        if new_latency >= latency:
            stop = "no further improvement"
            break
        assign, latency = new, new_latency
    return assign, {"iterations": len(history) - 1, "latency_per_iteration": history, "stopped_at": stop}


def exhaustive(problem: Problem, budget: int, batch: int = 4096) -> tuple[list[int], float]:
    """Brute force over every allocation that fits (small problems only)."""
    best = (None, np.inf)
    combos = itertools.product(range(len(problem.options)), repeat=problem.num_layers)
    while True:
        chunk = np.array(list(itertools.islice(combos, batch)))
        if chunk.size == 0:
            return best
        chunk = chunk[problem.option_bytes[chunk].sum(axis=1) <= budget]
        if len(chunk):
            lat = problem.latencies(chunk)
            i = int(np.argmin(lat))
            if lat[i] < best[1]:
                best = (chunk[i].tolist(), float(lat[i]))


# -- the whole planning step -----------------------------------------------------------------------


def make_plan(config: ModelConfig, problem: Problem, assign: list[int], freqs: np.ndarray, kv_length: int,
              policy: str, prefetch: bool) -> OffloadPlan:
    layers = []
    for layer, o, f in zip(config.moe_layer_ids, assign, freqs):
        s, r = problem.options[o]
        hot = tuple(int(e) for e in np.argsort(-f, kind="stable")[:s])
        layers.append(LayerPlan(layer, s, planning.split_rows(config, r), hot, tuple(float(x) for x in f)))
    return OffloadPlan(tuple(layers), kv_length, policy, prefetch)


def plan(trace: Trace, config: ModelConfig, profile: dict, cache_bytes: int, *, policy: str = "lcp",
         prefetch: bool = True, predictor: str = "router", kv_length: int = 2048, ratios=RATIOS,
         slots: list[int] | None = None, progress=None) -> tuple[OffloadPlan, dict[str, Any]]:
    """Plan per-layer slots and split ratios for `cache_bytes` of expert cache; returns the plan and a report."""
    trace.check_model(config)
    freqs = trace.frequencies()
    grid_r = ratio_grid(config, ratios)
    smallest = planning.min_cache_bytes(config, min(grid_r))
    if cache_bytes < smallest:
        raise BudgetError(f"an expert cache of {planning.format_size(cache_bytes)} is below the minimum "
                          f"{planning.format_size(smallest)}: {config.top_k} slots per layer at split ratio {min(grid_r):g}")
    curves = layer_curves(trace, config, policy, slots or slot_grid(config), prefetch, predictor, freqs, progress)
    problem = build_problem(config, curves, profile, grid_r, prefetch)
    assign, info = optimise(problem, cache_bytes)
    result = make_plan(config, problem, assign, freqs, kv_length, policy, prefetch)
    report = {
        "policy": policy, "prefetch": prefetch, "cache_budget_bytes": cache_bytes,
        "cache_bytes": int(problem.option_bytes[assign].sum()),
        "predicted_s_per_token": problem.latency(assign),
        "uniform": _uniform_report(config, problem, cache_bytes),
        "best_uniform": _describe(problem, best_uniform(problem, cache_bytes)),
        "layers": [{"layer": l, "slots": problem.options[o][0], "split_ratio": problem.options[o][1],
                    "decode_hit_rate": _hit_rate(curves, problem.options[o][0], i)}
                   for i, (l, o) in enumerate(zip(config.moe_layer_ids, assign))],
        **info,
    }
    return result, report


def _hit_rate(curves: Curves, slots: int, layer: int) -> float:
    si = curves.slots.index(slots)
    total = curves.hits[si, layer] + curves.misses[si, layer]
    return float(curves.hits[si, layer] / max(total, 1))


def _describe(problem: Problem, assign) -> dict[str, Any] | None:
    if assign is None:
        return None
    s, r = problem.options[assign[0]]
    return {"slots": s, "split_ratio": r, "predicted_s_per_token": problem.latency(assign)}


def _uniform_report(config: ModelConfig, problem: Problem, cache_bytes: int) -> dict[str, Any] | None:
    """What a plain budget gives: whole experts, the same slots in every layer (plan_from_budget)."""
    whole = [o for o, (s, r) in enumerate(problem.options) if r == 1.0
             and problem.option_bytes[o] * problem.num_layers <= cache_bytes]
    if not whole:
        return None
    o = max(whole, key=lambda o: problem.options[o][0])
    return _describe(problem, [o] * problem.num_layers)
