"""Trace-driven cache simulation with the runtime's own controllers.

`replay` feeds a routing trace through `jaxmoe.offload.cache.LayerCache` / `LayerController` and
the policies of `jaxmoe.offload.policies`, built and called exactly as
`jaxmoe.offload.runtime.OffloadEngine` builds and calls them: one controller per MoE layer, warm
with the plan's hot set and then the other experts in id order, truncated to the layer's slots;
one shared `Counters`; a global step counter `now` that runs across requests; per request
`new_request()` on every cache; the prompt as one `step` per layer covering all its tokens (steps
now .. now+n-1); then per decode token and layer, in layer order: `score_prediction` of the
guess made one layer earlier, `step`, and (with prefetch, when the next layer is MoE)
`prefetch` of the next layer's guess. There is no second implementation of any decision, so the
simulator's hits, misses and bytes equal the runtime's counters exactly for the same routing.

Prediction (the guess the runtime prefetches): `router`, the guess recorded in the trace (the next
layer's router on this layer's hidden state, what the runtime computes); `oracle`, the next
layer's actual experts. Public traces carry no guesses, so they simulate without prefetch unless
`oracle` is asked for.

Oracle bound `belady`: Belady's eviction (the cached expert used furthest in the future goes)
with perfect prediction. Before every decision the simulator sets `ExpertStats.next_use` from
the trace; with prefetch on, belady always prefetches the actual next experts.

Seconds per token come from `schedules.costmodel` (its docstring states the model) under a
hardware profile (`schedules.profile`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.offload import policies
from jaxmoe.offload.cache import Counters, build_controllers
from jaxmoe.offload.plan import LayerPlan, OffloadPlan, row_bytes
from jaxmoe.schedules import costmodel
from jaxmoe.schedules.trace import Trace, TraceError

PREDICTORS = ("router", "oracle")
ALL_POLICIES = (*policies.ONLINE, *policies.ORACLE)


@dataclasses.dataclass
class Replay:
    """What a replay moved and computed. Arrays are [L, T]: MoE layers x decode tokens."""

    totals: dict[str, int]  # Counters after the whole trace
    prefill: dict[str, int]  # Counters accumulated over prompt steps
    decode: dict[str, int]  # Counters accumulated over decode steps
    requests: list[dict[str, Any]]  # per request, the runtime's report fields
    needed: np.ndarray  # experts computed
    calls: np.ndarray  # expert device calls (chunks)
    demand_tops: np.ndarray
    demand_bottoms: np.ndarray
    prefetch_tops: np.ndarray  # segments prefetched INTO layer i (issued during layer i-1)
    prefetch_bottoms: np.ndarray
    top_bytes: np.ndarray  # [L]
    bottom_bytes: np.ndarray  # [L]

    @property
    def decode_tokens(self) -> int:
        return self.needed.shape[1]

    def demand_bytes(self) -> np.ndarray:
        return self.demand_tops * self.top_bytes[:, None] + self.demand_bottoms * self.bottom_bytes[:, None]

    def prefetch_bytes(self) -> np.ndarray:
        return self.prefetch_tops * self.top_bytes[:, None] + self.prefetch_bottoms * self.bottom_bytes[:, None]


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b[k] for k in b}


class _Future:
    """Belady's knowledge: per MoE layer, each expert's next use as the replay advances.

    `next_use[i]` [E] holds, for every expert, the first step >= the first step not yet advanced
    past at layer i at which layer i uses it (inf: never). O(N k) memory per layer."""

    def __init__(self, trace: Trace):
        seq = np.concatenate([r.experts for r in trace.requests], axis=0)  # [N, L, k]: token n runs at step n
        n, layers, k = seq.shape
        self.seq = seq
        self.after = np.full((n, layers, k), np.inf)  # next use of seq[t, i, j] after step t
        self.next_use = [np.full(trace.num_experts, np.inf) for _ in range(layers)]
        for t in range(n - 1, -1, -1):
            for i in range(layers):
                self.after[t, i] = self.next_use[i][seq[t, i]]
                self.next_use[i][seq[t, i]] = t

    def advance(self, layer: int, steps: range) -> np.ndarray:
        """Account for layer `layer`'s uses at `steps`; returns its next-use vector after them."""
        nu = self.next_use[layer]
        for t in steps:
            nu[self.seq[t, layer]] = self.after[t, layer]
        return nu


def replay(trace: Trace, config: ModelConfig, plan: OffloadPlan, policy: str, predictor: str = "router") -> Replay:
    """Run the trace through the runtime's controllers for `plan` (plan.prefetch decides prefetch)."""
    trace.check_model(config)
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor is one of {', '.join(PREDICTORS)}, not {predictor!r}")
    oracle = policy in policies.ORACLE
    if oracle:
        predictor = "oracle"
    if plan.prefetch and predictor == "router" and not trace.has_predictions:
        raise TraceError("this trace records no next-layer guesses: simulate without prefetch, or with the oracle predictor")
    counters = Counters()
    ctls = build_controllers(config, plan, policies.get(policy), counters)
    ids = config.moe_layer_ids
    next_moe = {l: l + 1 for l in ids if l + 1 in ctls} if plan.prefetch else {}
    future = _Future(trace) if oracle else None
    layers, tokens = len(ids), trace.num_tokens("decode")
    rec = {k: np.zeros((layers, tokens), np.int64) for k in
           ("needed", "calls", "demand_tops", "demand_bottoms", "prefetch_tops", "prefetch_bottoms")}
    prefill, decode, reports = Counters().snapshot(), Counters().snapshot(), []
    now, col = 0, 0
    for r in trace.requests:
        for ctl in ctls.values():
            ctl.cache.new_request()
        predicted: dict[int, list[int]] = {}
        start = counters.snapshot()
        n = r.num_prefill
        if n:
            for i, layer in enumerate(ids):
                if oracle:
                    ctls[layer].cache.stats.next_use = future.advance(i, range(now, now + n))
                ctls[layer].step([row.tolist() for row in r.experts[:n, i]], now)
            now += n
        after_prefill = counters.snapshot()
        for t in range(n, len(r.decode)):
            for i, layer in enumerate(ids):
                ctl, actual = ctls[layer], r.experts[t, i].tolist()
                if layer in predicted:
                    ctl.score_prediction(predicted.pop(layer), actual)
                if oracle:
                    ctl.cache.stats.next_use = future.advance(i, range(now, now + 1))
                misses = counters.misses
                chunks = ctl.step([actual], now)
                rec["needed"][i, col] = len(set(actual))
                rec["calls"][i, col] = len(chunks)
                rec["demand_tops"][i, col] = counters.misses - misses
                rec["demand_bottoms"][i, col] = sum(len(ch.bottom_fetches) for ch in chunks)
                nl = next_moe.get(layer)
                if nl is not None:
                    guess = (r.experts[t, i + 1] if predictor == "oracle" else r.predicted[t, i]).tolist()
                    predicted[nl] = guess
                    if oracle:
                        ctls[nl].cache.stats.next_use = future.next_use[i + 1]  # uses before `now` accounted
                    tops, bottoms = ctls[nl].prefetch(guess, now)
                    rec["prefetch_tops"][i + 1, col] = len(tops)
                    rec["prefetch_bottoms"][i + 1, col] = len(bottoms)
            now += 1
            col += 1
        end = counters.snapshot()
        pre, dec = _delta(start, after_prefill), _delta(after_prefill, end)
        prefill, decode = _add(prefill, pre), _add(decode, dec)
        reports.append({"request": r.id, "cache_hits": dec["hits"], "cache_misses": dec["misses"],
                        "bytes_h2d": dec["bytes_h2d"] + pre["bytes_h2d"], "prefill_bytes_h2d": pre["bytes_h2d"],
                        "prefill_cache_hits": pre["hits"], "prefill_cache_misses": pre["misses"],
                        "prefetch_bytes": dec["prefetch_bytes"], "prefetch_hits": dec["prefetch_hits"]})
    rows = row_bytes(config)
    top = np.array([p.split_rows * rows for p in plan.layers], np.int64)
    bottom = np.array([(config.moe_intermediate_size - p.split_rows) * rows for p in plan.layers], np.int64)
    return Replay(counters.snapshot(), prefill, decode, reports, top_bytes=top, bottom_bytes=bottom, **rec)


def predicted_seconds(replay: Replay, config: ModelConfig, plan: OffloadPlan, profile: dict) -> dict[str, float]:
    """Mean decode seconds per token under the cost model, and its compute and transfer parts."""
    if replay.decode_tokens == 0:
        return {"predicted_s_per_token": float("nan"), "compute_s_per_token": float("nan"),
                "transfer_s_per_token": float("nan")}
    times = costmodel.compute_times(config, profile)
    a, c = costmodel.layer_compute(config, times, replay.needed, replay.calls, plan.prefetch)
    demand = costmodel.transfer_seconds(replay.demand_bytes(), replay.demand_tops + replay.demand_bottoms, profile)
    prefetch = costmodel.transfer_seconds(replay.prefetch_bytes(), replay.prefetch_tops + replay.prefetch_bottoms, profile)
    tail = costmodel.tail_seconds(config, times)
    per_token = costmodel.pipeline(a, c, prefetch, demand) + tail
    return {
        "predicted_s_per_token": float(per_token.mean()),
        "compute_s_per_token": float((a + c).sum(axis=0).mean() + tail),
        "transfer_s_per_token": float((demand + prefetch).sum(axis=0).mean()),
    }


def simulate(trace: Trace, config: ModelConfig, plan: OffloadPlan, policy: str, profile: dict,
             predictor: str = "router") -> dict[str, Any]:
    """One policy's report: hit rates, bytes and predicted seconds per decode token."""
    plan = dataclasses.replace(plan, policy=policy)
    rep = replay(trace, config, plan, policy, predictor)
    d, p = rep.decode, rep.prefill
    tokens = max(rep.decode_tokens, 1)
    return {
        "policy": policy,
        "online": policy in policies.ONLINE,
        "prefetch": plan.prefetch,
        "predictor": ("oracle" if policy in policies.ORACLE else predictor) if plan.prefetch else None,
        "hit_rate": d["hits"] / max(d["hits"] + d["misses"], 1),
        "hits": d["hits"], "misses": d["misses"], "prefetch_hits": d["prefetch_hits"],
        "bytes_per_token": d["bytes_h2d"] / tokens,
        "demand_bytes_per_token": d["demand_bytes"] / tokens,
        "prefetch_bytes_per_token": d["prefetch_bytes"] / tokens,
        "prefetch_precision": d["predicted_used"] / max(d["predicted"], 1),
        "prefetch_recall": d["predicted_used"] / max(d["predicted_needed"], 1),
        "decode_tokens": rep.decode_tokens,
        "prefill_tokens": trace.num_tokens("prefill"),
        "prefill_hits": p["hits"], "prefill_misses": p["misses"], "prefill_bytes": p["bytes_h2d"],
        "bytes_h2d": rep.totals["bytes_h2d"],
        **predicted_seconds(rep, config, plan, profile),
    }


# -- priors and hot sets ---------------------------------------------------------------------------


def with_prior(plan: OffloadPlan, freqs: np.ndarray, hot: bool) -> OffloadPlan:
    """The plan with per-layer `prior` = freqs [L, E] and, with `hot`, the top-slots experts as hot set."""
    layers = []
    for p, f in zip(plan.layers, freqs):
        hot_set = tuple(int(e) for e in np.argsort(-f, kind="stable")[: p.slots]) if hot else p.hot
        layers.append(LayerPlan(p.layer, p.slots, p.split_rows, hot_set, tuple(float(x) for x in f)))
    return dataclasses.replace(plan, layers=tuple(layers))


def history_frequencies(traces: list[Trace], config: ModelConfig) -> np.ndarray:
    """[L, E] per-token use frequencies over several traces (token-weighted)."""
    counts, tokens = np.zeros((len(config.moe_layer_ids), config.num_experts)), 0
    for t in traces:
        t.check_model(config)
        n = t.num_tokens()
        counts += t.frequencies() * n
        tokens += n
    if tokens == 0:
        raise TraceError("the history traces hold no tokens")
    return counts / tokens


def simulate_all(trace: Trace, config: ModelConfig, plan: OffloadPlan, policy_names, profile: dict,
                 predictor: str = "router", prior: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Every policy on one budget. With `prior` [L, E]: lcp and static use it; static also pins
    its top experts (the hot set)."""
    out = []
    for name in policy_names:
        p = plan
        if prior is not None and name != "belady":
            p = with_prior(plan, prior, hot=name == "static")
        out.append(simulate(trace, config, p, name, profile, predictor))
    return out
