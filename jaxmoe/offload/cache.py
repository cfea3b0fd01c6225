"""Host-side bookkeeping of one layer's device expert cache: which expert sits in which slot,
usage statistics for the policies, and the counters reported to users. No JAX here: the runtime
mirrors these decisions into device buffers, and the trace simulator replays traces through the
very same object."""

from __future__ import annotations

import numpy as np

from jaxmoe.config import ModelConfig
from jaxmoe.offload.plan import OffloadPlan, row_bytes
from jaxmoe.offload.policies import ExpertStats, Policy


class CacheFullError(RuntimeError):
    pass


class LayerCache:
    """Which expert sits in which of a layer's slots, and the statistics its policy reads.

    Requests. The cache's contents carry over from one request to the next (no transfers between
    requests); its statistics do not: `new_request` clears uses and recency, so a request's
    decisions depend only on its own routing and the contents it starts with, never on how those
    came to be (ties go to the lowest expert id, not to a slot order that history set). With the
    order in which `LayerController.step` takes a step's experts, what a request leaves cached
    follows from the request itself, so a request repeated back to back starts each run from the
    contents its last run left, and from the second run on its hit, miss and byte counters repeat
    exactly (tested for every online policy; a prior that values an expert the request never uses
    above one it does can keep LCP or static from settling in one run).
    """

    def __init__(self, num_experts: int, top_k: int, slots: int, policy: Policy,
                 prior: np.ndarray | None = None, warm: list[int] | None = None):
        self.slots = slots
        self.policy = policy
        self.slot_expert = np.full(slots, -1, np.int64)  # [C]
        self.expert_slot = np.full(num_experts, -1, np.int64)  # [E]
        self.stats = ExpertStats.fresh(num_experts, top_k, prior)
        for slot, e in enumerate((warm if warm is not None else range(num_experts))[:slots]):
            self.slot_expert[slot] = e
            self.expert_slot[e] = slot

    def slot_of(self, expert: int) -> int:
        return int(self.expert_slot[expert])

    def contains(self, expert: int) -> bool:
        return self.expert_slot[expert] >= 0

    def insert(self, expert: int, now: int, protected: set[int]) -> tuple[int, int]:
        """Give `expert` a slot; evict by policy among experts not in `protected`.

        Returns (slot, evicted expert or -1)."""
        assert not self.contains(expert)
        free = np.flatnonzero(self.slot_expert < 0)
        if free.size:
            slot, victim = int(free[0]), -1
        else:
            candidates = np.sort(self.slot_expert[~np.isin(self.slot_expert, list(protected))])  # in id order: ties go to the lowest id
            if candidates.size == 0:
                raise CacheFullError(f"all {self.slots} slots hold experts needed now")
            victim = int(candidates[int(np.argmin(self.policy(candidates, self.stats, now)))])
            slot = int(self.expert_slot[victim])
            self.expert_slot[victim] = -1
        self.slot_expert[slot] = expert
        self.expert_slot[expert] = slot
        return slot, victim

    def record_use(self, experts, now: int) -> None:
        """Experts used by one token at step `now`."""
        for e in experts:
            self.stats.last_use[e] = now
            self.stats.request_uses[e] += 1

    def record_token(self) -> None:
        self.stats.request_steps += 1

    def new_request(self) -> None:
        """Forget the previous request's uses and recency (see the class docstring)."""
        self.stats.last_use[:] = -np.inf
        self.stats.request_uses[:] = 0
        self.stats.request_steps = 0


class Counters:
    """Traffic and hit counters, exact: bytes are the sum of the segments moved."""

    FIELDS = ("hits", "misses", "prefetch_hits", "bytes_h2d", "demand_bytes", "prefetch_bytes",
              "predicted", "predicted_used", "predicted_needed", "needed", "tokens")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def snapshot(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}


class Chunk:
    """Up to k experts computed together in one device call, with the transfers it waits for."""

    def __init__(self, members: list[int], slots: list[int], top_fetches: list[tuple[int, int]],
                 bottom_fetches: list[int]):
        self.members = members  # expert ids
        self.slots = slots  # cache slot of each member's top segment
        self.top_fetches = top_fetches  # (expert, slot) moved host->device and written to the cache
        self.bottom_fetches = bottom_fetches  # experts whose bottom segment is moved (demand)


class LayerController:
    """Every caching decision of one layer, shared by the runtime and the trace simulator.

    The runtime turns the returned fetches into `device_put`s; the simulator only counts them.
    """

    def __init__(self, cache: LayerCache, top_k: int, top_bytes: int, bottom_bytes: int, counters: Counters):
        self.cache, self.top_k, self.counters = cache, top_k, counters
        self.top_bytes, self.bottom_bytes = top_bytes, bottom_bytes
        self.pending_tops: dict[int, int] = {}  # prefetched expert -> slot, written with the next chunk
        self.pending_bottoms: set[int] = set()  # experts whose bottom segment was prefetched

    def _insert(self, expert: int, now: int, protected: set[int]) -> int:
        slot, victim = self.cache.insert(expert, now, protected)
        self.pending_tops.pop(victim, None)  # an evicted prefetch is never written
        return slot

    def step(self, token_experts: list[list[int]], now: int) -> list[Chunk]:
        """Tokens' chosen experts (in token order, token t at step now + t) -> chunks to compute.

        A step's experts are taken k at a time in ascending policy score (ties by id), so the ones
        the policy values most come last and are what a step of many tokens (a prompt) leaves
        cached, whichever of them were cached before."""
        c = self.counters
        for t, experts in enumerate(token_experts):
            self.cache.record_token()
            self.cache.record_use(experts, now + t)
        last = now + len(token_experts) - 1
        needed = sorted({e for experts in token_experts for e in experts})
        scores = self.cache.policy(np.array(needed, np.int64), self.cache.stats, last) if needed else []
        ordered = [e for _, e in sorted(zip(scores, needed))]
        chunks = []
        for i in range(0, len(ordered), self.top_k):
            members = ordered[i : i + self.top_k]
            tops, bottoms, slots = [], [], []
            for e in members:
                if self.cache.contains(e):
                    c.hits += 1
                    if e in self.pending_tops:
                        c.prefetch_hits += 1
                else:
                    c.misses += 1
                    slot = self._insert(e, last, set(members))
                    tops.append((e, slot))
                    c.bytes_h2d += self.top_bytes
                    c.demand_bytes += self.top_bytes
                slots.append(self.cache.slot_of(e))
                if self.bottom_bytes:
                    if e in self.pending_bottoms:
                        self.pending_bottoms.discard(e)
                    else:
                        bottoms.append(e)
                        c.bytes_h2d += self.bottom_bytes
                        c.demand_bytes += self.bottom_bytes
            if i == 0:  # prefetched tops are written by the layer's first call
                tops = [(e, s) for e, s in self.pending_tops.items()] + tops
                self.pending_tops = {}
            chunks.append(Chunk(members, slots, tops, bottoms))
        c.needed += len(needed)
        self.pending_bottoms.clear()  # unused prefetched bottoms are dropped
        return chunks

    def prefetch(self, predicted: list[int], now: int) -> tuple[list[tuple[int, int]], list[int]]:
        """Start moving a predicted next step's experts; returns (top fetches, bottom fetches)."""
        c = self.counters
        predicted = sorted(set(predicted))
        tops, bottoms = [], []
        for e in predicted:
            if not self.cache.contains(e):
                slot = self._insert(e, now, set(predicted))
                self.pending_tops[e] = slot
                tops.append((e, slot))
                c.bytes_h2d += self.top_bytes
                c.prefetch_bytes += self.top_bytes
            if self.bottom_bytes:
                self.pending_bottoms.add(e)
                bottoms.append(e)
                c.bytes_h2d += self.bottom_bytes
                c.prefetch_bytes += self.bottom_bytes
        return tops, bottoms

    def score_prediction(self, predicted: list[int], actual: list[int]) -> None:
        """Precision: predicted experts used / predicted. Recall: used / needed, both over predicted steps."""
        self.counters.predicted += len(set(predicted))
        self.counters.predicted_used += len(set(predicted) & set(actual))
        self.counters.predicted_needed += len(set(actual))


def build_controllers(config: ModelConfig, plan: OffloadPlan, policy: Policy,
                      counters: Counters) -> dict[int, LayerController]:
    """Per MoE layer, the controller of `plan`: caches warm with the layer's hot set first, then
    the other experts in id order, up to its slots. The runtime and the simulator both use this."""
    rows = row_bytes(config)
    out = {}
    for p in plan.layers:
        prior = np.asarray(p.prior) if p.prior is not None else None
        warm = list(p.hot) + [e for e in range(config.num_experts) if e not in p.hot]
        cache = LayerCache(config.num_experts, config.top_k, p.slots, policy, prior, warm[: p.slots])
        bottom_rows = config.moe_intermediate_size - p.split_rows
        out[p.layer] = LayerController(cache, config.top_k, p.split_rows * rows, bottom_rows * rows, counters)
    return out
