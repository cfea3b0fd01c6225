"""Cache policies and the layer cache bookkeeping, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.offload import policies
from jaxmoe.offload.cache import CacheFullError, Counters, LayerCache, LayerController
from jaxmoe.offload.policies import ExpertStats


def _stats(last_use, request_uses, prior=None, steps=0):
    n = len(last_use)
    s = ExpertStats.fresh(n, 2, prior)
    s.last_use[:] = last_use
    s.request_uses[:] = request_uses
    s.request_steps = steps
    return s


def _victim(policy, s, candidates, now=10):
    candidates = np.asarray(candidates)
    return int(candidates[np.argmin(policy(candidates, s, now))])


def test_lru_evicts_least_recently_used():
    s = _stats([5, 1, 7, 3], [9, 9, 1, 1])
    assert _victim(policies.lru, s, [0, 1, 2, 3]) == 1


def test_lfu_evicts_least_used_and_breaks_ties_by_recency():
    s = _stats([5, 1, 7, 3], [4, 9, 2, 2])
    assert _victim(policies.lfu, s, [0, 1, 2, 3]) == 3


def test_static_keeps_the_trace_hot_set():
    s = _stats([9, 9, 0, 0], [0, 0, 5, 5], prior=[0.1, 0.2, 0.9, 0.8])
    assert _victim(policies.static, s, [0, 1, 2, 3]) == 0


def test_lcp_weighs_request_frequency_and_recency():
    # Expert 0: used often in this request but long ago; expert 1: rarely, but just now;
    # expert 2: rarely and long ago -> the least critical.
    s = _stats([0, 9, 1], [8, 1, 1], steps=10)
    assert _victim(policies.lcp, s, [0, 1, 2]) == 2
    # Miss cost scales priority but never reorders experts within a layer.
    assert np.argmin(policies.lcp(np.arange(3), s, 10, miss_cost=3.0)) == 2


def test_belady_evicts_the_expert_used_furthest_ahead_and_needs_the_future():
    s = _stats([0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="future"):
        policies.belady(np.arange(3), s, 0)
    s.next_use = np.array([4.0, np.inf, 2.0])
    assert _victim(policies.belady, s, [0, 1, 2]) == 1


def test_unknown_policy_lists_the_choices():
    with pytest.raises(ValueError, match="lru"):
        policies.get("fifo")


def test_layer_cache_never_evicts_protected_experts():
    cache = LayerCache(num_experts=6, top_k=2, slots=2, policy=policies.lru, warm=[0, 1])
    cache.record_use([0], 5)
    slot, victim = cache.insert(3, now=6, protected={0})
    assert victim == 1 and cache.slot_of(3) == slot and not cache.contains(1)
    with pytest.raises(CacheFullError):
        cache.insert(4, now=7, protected={0, 3})


def test_controller_counts_exact_bytes_and_splits_into_k_wide_chunks():
    counters = Counters()
    cache = LayerCache(num_experts=8, top_k=2, slots=3, policy=policies.lru, warm=[0, 1, 2])
    ctl = LayerController(cache, top_k=2, top_bytes=100, bottom_bytes=30, counters=counters)
    chunks = ctl.step([[0, 5], [1, 6]], now=0)  # prefill of two tokens: 4 distinct experts
    assert [len(c.members) for c in chunks] == [2, 2]
    assert counters.hits == 2 and counters.misses == 2
    # Every needed expert moves its bottom; every miss also moves its top.
    assert counters.bytes_h2d == 2 * 100 + 4 * 30
    assert sum(len(c.top_fetches) for c in chunks) == 2


def test_prefetched_experts_count_as_prefetch_hits_and_are_not_fetched_again():
    counters = Counters()
    cache = LayerCache(num_experts=8, top_k=2, slots=2, policy=policies.lru, warm=[0, 1])
    ctl = LayerController(cache, top_k=2, top_bytes=100, bottom_bytes=0, counters=counters)
    tops, bottoms = ctl.prefetch([4, 5], now=0)
    assert [e for e, _ in tops] == [4, 5] and bottoms == []
    ctl.score_prediction([4, 5], [4, 7])
    chunks = ctl.step([[4, 7]], now=1)
    assert counters.prefetch_hits == 1 and counters.misses == 1
    assert counters.predicted == 2 and counters.predicted_used == 1 and counters.predicted_needed == 2
    # The prefetched top of 4 is written by this step's first call; 5 was evicted for 7.
    written = {e for e, _ in chunks[0].top_fetches}
    assert written == {4, 7}
    assert counters.bytes_h2d == 3 * 100


def test_a_new_request_forgets_uses_and_recency_and_ties_go_to_the_lowest_id():
    cache = LayerCache(num_experts=6, top_k=2, slots=3, policy=policies.lfu, warm=[4, 1, 3])
    cache.record_use([1, 1, 1, 4], 5)
    cache.new_request()
    assert not cache.stats.request_uses.any() and np.isneginf(cache.stats.last_use).all()
    assert cache.insert(0, now=6, protected=set()) == (1, 1)  # every score equal: expert 1, in slot 1


def test_a_prompt_step_leaves_the_most_valued_experts_whatever_was_cached():
    """A step of many tokens takes its experts in ascending score, so what it leaves cached does
    not depend on what was cached before it."""
    prompt = [[0, 1], [2, 3], [4, 5], [4, 5]]  # 4 and 5 used last and twice
    left = set()
    for warm in ([0, 1, 2], [5, 3, 4], [2, 4, 5]):
        for policy in (policies.lru, policies.lfu):
            cache = LayerCache(num_experts=6, top_k=2, slots=3, policy=policy, warm=warm)
            LayerController(cache, 2, 100, 0, Counters()).step(prompt, now=0)
            left.add(frozenset(cache.slot_expert.tolist()))
    assert left == {frozenset({3, 4, 5})}
