"""The trace simulator: reference hit rates, the cost model, and exact agreement with the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxmoe
from jaxmoe.cli import main
from jaxmoe.engine import Engine
from jaxmoe.models import preset
from jaxmoe.offload import plan as planning
from jaxmoe.offload import policies
from jaxmoe.schedules import costmodel, planner
from jaxmoe.schedules import profile as prof
from jaxmoe.schedules import simulate as sim
from jaxmoe.schedules import trace as tr

from conftest import MIXTRAL_TRACE as SHARED_TRACE  # noqa: E402


@pytest.fixture(scope="module")
def mixtral_trace():
    if not SHARED_TRACE.is_file():
        pytest.skip(f"shared trace not present at {SHARED_TRACE}")
    return tr.read_trace(SHARED_TRACE)


def _reference(trace, policy, slots=4, prior=None):
    """SOURCE.md's conventions: whole experts, no prefetch, experts 0..C-1 warm."""
    config = preset("mixtral-8x7b")
    plan = planning.uniform_plan(config, slots, 1.0, 2048, policy, prefetch=False)
    return sim.simulate_all(trace, config, plan, [policy], prof.load_profile("h100"), prior=prior)[0]


def test_reproduces_reference_lru_and_belady_hit_rates(mixtral_trace):
    assert abs(_reference(mixtral_trace, "lru")["hit_rate"] - 0.623) < 0.01
    assert abs(_reference(mixtral_trace, "belady")["hit_rate"] - 0.754) < 0.01
    assert abs(_reference(mixtral_trace, "lfu")["hit_rate"] - 0.643) < 0.01
    assert abs(_reference(mixtral_trace, "lru", slots=6)["hit_rate"] - 0.823) < 0.01
    assert abs(_reference(mixtral_trace, "belady", slots=6)["hit_rate"] - 0.913) < 0.01


def test_lcp_beats_lfu_on_the_mixtral_trace(mixtral_trace):
    lfu = _reference(mixtral_trace, "lfu")
    without_prior = _reference(mixtral_trace, "lcp")
    with_prior = _reference(mixtral_trace, "lcp", prior=mixtral_trace.frequencies())  # optimistic: in-sample
    assert without_prior["hit_rate"] > lfu["hit_rate"]
    assert with_prior["hit_rate"] > lfu["hit_rate"]
    assert with_prior["predicted_s_per_token"] < lfu["predicted_s_per_token"]


def test_belady_bounds_every_online_policy(mixtral_trace):
    config = preset("mixtral-8x7b")
    plan = planning.plan_from_budget(config, expert_budget=0.25, split_ratio=0.5, prefetch=True)
    res = {r["policy"]: r for r in sim.simulate_all(mixtral_trace, config, plan, sim.ALL_POLICIES,
                                                       prof.load_profile("h100"), predictor="oracle")}
    assert not res["belady"]["online"] and all(res[p]["online"] for p in ("lru", "lfu", "lcp", "static"))
    for p in ("lru", "lfu", "lcp", "static"):
        assert res["belady"]["bytes_per_token"] <= res[p]["bytes_per_token"]
        assert res["belady"]["predicted_s_per_token"] <= res[p]["predicted_s_per_token"]
    assert res["lru"]["prefetch_precision"] == 1.0  # the oracle predictor guesses right


@pytest.mark.parametrize("prefetch", [False, True])
def test_repeated_requests_count_the_same_from_the_second_run(mixtral_trace, prefetch):
    """Each request of the public trace (its first 20 tokens as the prompt) three times in a row,
    at every online policy and a cache that evicts: runs two and three count the same."""
    import dataclasses

    config = preset("mixtral-8x7b")
    for request in mixtral_trace.requests:
        decode = request.decode.copy()
        decode[:20] = False
        r = dataclasses.replace(request, decode=decode)
        trace = dataclasses.replace(mixtral_trace, requests=[dataclasses.replace(r, id=str(i)) for i in range(3)])
        for policy in policies.ONLINE:
            plan = sim.with_prior(planning.uniform_plan(config, 5, 0.5, 2048, policy, prefetch),
                                  mixtral_trace.frequencies(), hot=policy == "static")
            runs = [{k: v for k, v in q.items() if k != "request"}
                    for q in sim.replay(trace, config, plan, policy, "oracle").requests]
            assert runs[1] == runs[2], (request.id, policy)


def test_public_trace_without_guesses_refuses_router_prefetch(mixtral_trace):
    config = preset("mixtral-8x7b")
    plan = planning.plan_from_budget(config, expert_budget=0.5, prefetch=True)
    with pytest.raises(tr.TraceError, match="no next-layer guesses"):
        sim.replay(mixtral_trace, config, plan, "lru", "router")
    with pytest.raises(tr.TraceError, match="MoE layers"):
        sim.replay(mixtral_trace, preset("qwen3-30b-a3b"), plan, "lru")


def test_simulate_cli_json(mixtral_trace, capsys):
    assert main(["simulate", "--trace", str(SHARED_TRACE), "--model", "mixtral-8x7b", "--expert-budget", "0.5",
                 "--policy", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in doc["results"]] == ["lru", "lfu", "lcp", "static", "belady"]
    for r in doc["results"]:
        for key in ("policy", "online", "hit_rate", "bytes_per_token", "predicted_s_per_token"):
            assert key in r
    assert "optimistic" in doc["prior_source"] and doc["profile"] == {"name": "h100", "measured": False}
    assert main(["simulate", "--trace", str(SHARED_TRACE), "--model", "olmoe-1b-7b", "--expert-budget", "0.5"]) == 2
    assert "MoE layers" in capsys.readouterr().err


# -- cost model ------------------------------------------------------------------------------------


def test_pipeline_without_transfers_is_the_sum_of_compute():
    a, c = np.array([1.0, 2.0, 3.0])[:, None], np.array([[0.5], [0.5], [0.5]])
    zero = np.zeros((3, 1))
    assert costmodel.pipeline(a, c, zero, zero)[0] == pytest.approx(7.5)


def test_pipeline_demand_stalls_and_prefetch_hides_behind_compute():
    a, c = np.ones((2, 1)), np.ones((2, 1))
    zero = np.zeros((2, 1))
    demand = np.array([[0.0], [3.0]])
    assert costmodel.pipeline(a, c, zero, demand)[0] == pytest.approx(1 + 1 + 1 + 3 + 1)
    # The same bytes prefetched into layer 1 during layer 0: they overlap layer 0's experts and
    # layer 1's attention (2 s), so 1 s of the 3 stays exposed.
    pre = np.array([[0.0], [3.0]])
    assert costmodel.pipeline(a, c, pre, zero)[0] == pytest.approx(1 + 3 + 1)
    # Layer 0's demand fetch goes first on the copy stream (runtime order); the prefetch into
    # layer 1 queues behind it: router 1, demand 2, prefetch 3, then layer 1's experts 1.
    both = costmodel.pipeline(a, c, pre, np.array([[2.0], [0.0]]))[0]
    assert both == pytest.approx(1 + 2 + 3 + 1)


def test_builtin_profiles_are_marked():
    for name in ("h100", "h200"):
        p = prof.load_profile(name)
        assert p["measured"] is False and "ESTIMATE" in p["note"] and p["sources"]
        assert 50e9 <= p["h2d"]["bandwidth_Bps"] <= 55e9
    assert prof.load_profile("h200")["memory_bandwidth_Bps"] > prof.load_profile("h100")["memory_bandwidth_Bps"]
    cpu = prof.load_profile("cpu")
    assert cpu["measured"] is True and cpu["models"]
    with pytest.raises(prof.ProfileError, match="h100"):
        prof.load_profile("tpu-v9")


# What costmodel.compute_times reads of a profile's per-model entry: nothing else is measured.
COST_MODEL_FIELDS = {"model", "kv_length", "attention_s", "router_s", "expert_s", "mlp_s", "head_s"}


def test_builtin_profiles_hold_only_compute_times_the_cost_model_reads():
    for name in prof.builtin_profiles():
        for m in prof.load_profile(name)["models"]:
            assert set(m) <= COST_MODEL_FIELDS, name


def test_measured_compute_times_are_used_for_their_model_only():
    cpu = prof.load_profile("cpu")
    measured = next(m for m in cpu["models"])
    config = preset(next(name for name in ("olmoe-1b-7b", "mixtral-8x7b", "qwen3-30b-a3b")
                         if planning.model_identity(preset(name)) == measured["model"]))
    assert costmodel.compute_times(config, cpu).expert_s == measured["expert_s"]
    other = preset("qwen3-30b-a3b") if config.family != "qwen3_moe" else preset("mixtral-8x7b")
    t = costmodel.compute_times(other, cpu)
    assert not t.measured and t.expert_s == pytest.approx(other.expert_bytes() / cpu["memory_bandwidth_Bps"])


def test_profile_measurement_on_this_device(tmp_path):
    config = preset("olmoe-1b-7b").replace(hidden_size=64, moe_intermediate_size=32, num_experts=4, top_k=2,
                                           vocab_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    doc = prof.measure_profile([config], "test", kv_length=16, sizes=(2**12, 2**18), repeats=1)  # small: compiles dominate
    assert doc["measured"] and doc["h2d"]["bandwidth_Bps"] > 0 and len(doc["h2d"]["points"]) == 2
    m = doc["models"][0]
    assert m["model"] == planning.model_identity(config)
    assert set(m) <= COST_MODEL_FIELDS
    prof.write_profile(tmp_path / "p.json", doc)
    assert prof.load_profile(tmp_path / "p.json")["name"] == "test"


# -- closing the loop: simulator == runtime ----------------------------------------------------------

PROMPTS = [np.random.default_rng(s).integers(3, 96, 8).tolist() for s in (1, 2, 3)]  # one length: one compile
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def olmoe(converted):
    model_dir = converted["olmoe"]
    engine = Engine.from_dir(model_dir)
    trace = tr.record(engine, PROMPTS, NEW_TOKENS)
    assert all(r.meta["stop_reason"] == "length" for r in trace.requests)
    return model_dir, trace, engine


def test_trace_holds_the_full_forward_routing(olmoe):
    _, trace, engine = olmoe
    for r in trace.requests:
        _, routing = engine.forward(np.array([r.tokens]), predict_next=True)
        for i, (weights, ids, guess) in enumerate(routing):
            np.testing.assert_array_equal(r.experts[:, i], ids)
            np.testing.assert_allclose(r.weights[:, i], weights, atol=1e-6)
        np.testing.assert_array_equal(r.predicted[:, 0], routing[0][2])  # layer 0 guesses layer 1
        assert (r.predicted[:, 1] == -1).all()


RUNTIME_FIELDS = ("cache_hits", "cache_misses", "bytes_h2d", "prefill_cache_hits", "prefill_cache_misses",
                  "prefill_bytes_h2d", "prefetch_bytes", "prefetch_hits")


def _assert_runtime_equals_simulation(engine, plan, trace, config, policy):
    outs = [engine.generate(prompt_ids=p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    rep = sim.replay(trace, config, plan, policy)
    for out, request, expected in zip(outs, trace.requests, rep.requests):
        assert out.token_ids[:-1] == request.tokens[request.num_prefill :].tolist()  # offloaded == resident
        assert {k: out.extra[k] for k in RUNTIME_FIELDS} == {k: expected[k] for k in RUNTIME_FIELDS}
    counters = engine.counters.snapshot()
    counters.pop("tokens")
    assert counters == {k: rep.totals[k] for k in counters}
    assert counters["misses"] > 0 and counters["bytes_h2d"] > 0  # the budget really forces traffic
    assert rep.demand_bytes().sum() + rep.prefetch_bytes().sum() == rep.decode["bytes_h2d"]


@pytest.mark.parametrize("policy,fraction,ratio,prefetch", [
    ("lru", 0.25, 0.5, False), ("lru", 0.25, 0.5, True), ("lcp", 0.25, 0.5, True), ("lcp", 0.25, 0.5, False),
    ("lfu", 0.25, 0.5, True)])  # one cache shape, one compilation; whole experts: the planned schedule below
def test_simulator_counts_equal_runtime_counters(olmoe, policy, fraction, ratio, prefetch):
    model_dir, trace, _ = olmoe
    engine = jaxmoe.load(model_dir, expert_budget=fraction, policy=policy, split_ratio=ratio, prefetch=prefetch,
                         kv_length=256)
    plan = planning.plan_from_budget(engine.config, expert_budget=fraction, split_ratio=ratio, policy=policy,
                                     prefetch=prefetch, kv_length=256)
    assert plan == engine.plan
    _assert_runtime_equals_simulation(engine, plan, trace, engine.config, policy)


def test_planned_schedule_runs_as_simulated(olmoe, tmp_path):
    """Non-uniform slots, hot sets and priors from the planner: the runtime still matches exactly."""
    model_dir, trace, _ = olmoe
    config = jaxmoe.checkpoint.load_config(model_dir)
    budget = planning.cache_budget(config, 256, expert_budget=0.2, split_ratio=0.5)  # split and whole layers side by side
    plan, _ = planner.plan(trace, config, prof.load_profile("h100"), budget, policy="lcp", kv_length=256,
                           ratios=(1.0, 0.5))
    path = tmp_path / "schedule.json"
    planning.write_schedule(path, config, plan)
    engine = jaxmoe.load(model_dir, schedule=path, kv_length=256)
    assert engine.plan == plan
    _assert_runtime_equals_simulation(engine, plan, trace, config, "lcp")
