"""Cache eviction policies: small pure functions shared by the runtime and the trace simulator.

A policy scores the evictable cached experts of one layer; the lowest score is evicted (ties go to
the lowest expert id). Scores read only `ExpertStats`, the bookkeeping that
`jaxmoe.offload.cache.LayerCache` keeps for every expert of its layer over the current request
(see there why nothing carries over from earlier requests).

LCP (least critical priority). An expert's criticality is the stall its absence would cost on the
next token: probability of use times the cost of a miss,

    lcp(e) = miss_cost * ( (n_req(e) + n0 * prior(e)) / (t_req + n0)  +  2 ** (-age(e) / half_life) )

- `n_req(e) / t_req`: share of this request's tokens that used e at this layer (MoE-Infinity's
  request-level activation), shrunk toward `prior(e)`, the per-token use frequency from offline
  traces, with the weight of `n0` tokens, so a young request leans on the trace;
- `2 ** (-age / half_life)`: recency, age counted in tokens since e's last use. With the
  half-life of a quarter token it is at most 1/16 (age 1) and decays 16-fold per token, so it
  ranks experts whose frequencies are close and otherwise yields to frequency;
- `miss_cost`: seconds a miss stalls this layer (bytes not yet resident over bandwidth, minus the
  compute that can hide it). It is constant within a layer, so it does not change which expert a
  layer evicts (the runtime leaves it at 1); the planner (jaxmoe.schedules.planner) trades cache
  between layers with its full latency model instead.

Constants (n0 = 4 tokens, half-life = 0.25 tokens) were tuned on the public Mixtral-8x7B trace
(`tests/data/mixtral-8x7b-instruct`, 8 experts, cache of 4 and 6, whole experts, no prefetch):
decode hit rate 0.648 (4 slots) and 0.843 (6) with the trace's own frequencies as prior
(in-sample, optimistic), 0.646 and 0.842 with no prior, against LFU's 0.643 and 0.840 and LRU's
0.626 and 0.824 (`python -m bench.trace_policies`, `jaxmoe simulate`). With a leave-one-request-out
prior (a tuning script, not shipped; measured before statistics became per request) it was 0.647
and 0.843. Longer half-lives, where recency
weighs as much as frequency, did worse than LFU there: on that trace, what a request has used
often predicts its next token better than what it used last. Tuned and scored on the same two
requests, the margin over LFU (about 0.004) is small and may not carry over to other workloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class ExpertStats:
    """Per-expert counters of one layer; arrays of length E."""

    last_use: np.ndarray  # step of the last use in the current request, -inf if none
    request_uses: np.ndarray  # uses in the current request
    prior: np.ndarray  # per-token use frequency from traces (sums to top_k); uniform without one
    request_steps: int = 0  # tokens seen in the current request
    next_use: np.ndarray | None = None  # oracle only: step of the next use, +inf if none

    @classmethod
    def fresh(cls, num_experts: int, top_k: int, prior: np.ndarray | None = None) -> ExpertStats:
        if prior is None:
            prior = np.full(num_experts, top_k / num_experts)
        return cls(
            last_use=np.full(num_experts, -np.inf),
            request_uses=np.zeros(num_experts),
            prior=np.asarray(prior, np.float64),
        )


Policy = Callable[[np.ndarray, ExpertStats, int], np.ndarray]

LCP_PRIOR_TOKENS = 4.0  # n0: weight of the trace prior, in tokens
LCP_HALF_LIFE = 0.25  # tokens


def lru(candidates: np.ndarray, s: ExpertStats, now: int) -> np.ndarray:
    return s.last_use[candidates]


def lfu(candidates: np.ndarray, s: ExpertStats, now: int) -> np.ndarray:
    """Uses in the current request, so a request's hit rate does not depend on the requests before
    it; recency breaks ties between equal counts (scaled below one use)."""
    recency = np.where(np.isfinite(s.last_use[candidates]), s.last_use[candidates], -1.0)
    return s.request_uses[candidates] + (recency + 1.0) / (now + 2.0) * 0.5


def lcp(candidates: np.ndarray, s: ExpertStats, now: int, miss_cost: float = 1.0) -> np.ndarray:
    n0 = LCP_PRIOR_TOKENS
    freq = (s.request_uses[candidates] + n0 * s.prior[candidates]) / (s.request_steps + n0)
    age = now - s.last_use[candidates]
    recency = np.exp2(-np.minimum(age, 1e9) / LCP_HALF_LIFE)
    return miss_cost * (freq + recency)


def static(candidates: np.ndarray, s: ExpertStats, now: int) -> np.ndarray:
    """The trace's hot set stays; among the rest, the least frequent in the trace goes first."""
    return s.prior[candidates] + 1e-9 * np.where(np.isfinite(s.last_use[candidates]), s.last_use[candidates], -1.0)


def belady(candidates: np.ndarray, s: ExpertStats, now: int) -> np.ndarray:
    """Offline optimum: evict the expert used furthest in the future. Needs `next_use`."""
    if s.next_use is None:
        raise ValueError("belady needs future knowledge (next_use); it is a simulator-only oracle")
    return -s.next_use[candidates]


ONLINE = {"lru": lru, "lfu": lfu, "lcp": lcp, "static": static}
ORACLE = {"belady": belady}
POLICIES: dict[str, Policy] = {**ONLINE, **ORACLE}


def get(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]
