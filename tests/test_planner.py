"""The planner: exact divide and conquer, near-exhaustive plans, speed, and the schedule it writes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmoe.cli import main
from jaxmoe.models import preset
from jaxmoe.offload import plan as planning
from jaxmoe.schedules import planner
from jaxmoe.schedules import profile as prof
from jaxmoe.schedules import trace as tr

from conftest import MIXTRAL_TRACE as SHARED_TRACE  # noqa: E402


@pytest.fixture(scope="module")
def mixtral_trace():
    if not SHARED_TRACE.is_file():
        pytest.skip(f"shared trace not present at {SHARED_TRACE}")
    return tr.read_trace(SHARED_TRACE)


def test_divide_and_conquer_is_exact_on_separable_costs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        layers, options = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        G = rng.uniform(0, 1, (layers, options))
        sizes = rng.integers(1, 6, options)
        units = int(rng.integers(layers, 5 * layers + 1))
        best = min((sum(G[l, o] for l, o in enumerate(c)), c) for c in itertools.product(range(options), repeat=layers)
                   if sizes[list(c)].sum() <= units) if sizes.min() * layers <= units else None
        got = planner.divide_and_conquer(G, sizes, units)
        if best is None:
            assert got is None
        else:
            assert sizes[got].sum() <= units
            assert sum(G[l, o] for l, o in enumerate(got)) == pytest.approx(best[0])


def _head(trace: tr.Trace, layers: int, config):
    """The first `layers` MoE layers of a trace, with a matching model config."""
    reqs = [dataclasses.replace(r, experts=r.experts[:, :layers], weights=r.weights[:, :layers]) for r in trace.requests]
    small = config.replace(num_layers=layers, moe_layers=(True,) * layers)
    return dataclasses.replace(trace, moe_layers=tuple(range(layers)), requests=reqs), small


@pytest.mark.parametrize("prefetch", [False, True])
def test_planner_is_within_two_percent_of_exhaustive_search(mixtral_trace, prefetch):
    trace, config = _head(mixtral_trace, 3, preset("mixtral-8x7b"))
    curves = planner.layer_curves(trace, config, "lru", [2, 4, 6, 8], prefetch, "oracle", trace.frequencies())
    h100 = prof.load_profile("h100")
    slow_compute = dict(h100, memory_bandwidth_Bps=60e9)  # compute as long as transfers: overlap matters
    for profile in (h100, slow_compute):
        problem = planner.build_problem(config, curves, profile, [1.0, 0.5, 0.25], prefetch)
        for fraction in (0.3, 0.5, 0.7):
            budget = planning.cache_budget(config, 2048, expert_budget=fraction)
            assign, _ = planner.optimise(problem, budget)
            assert problem.option_bytes[assign].sum() <= budget
            _, best = planner.exhaustive(problem, budget)
            assert problem.latency(assign) <= best * 1.02


def _synthetic(layers, tokens=64, seed=0):
    """A planning problem with hit curves that improve with slots and split ratios that trade bytes."""
    rng = np.random.default_rng(seed)
    options = [(s, r) for s in range(2, 17, 2) for r in (1.0, 0.75, 0.5, 0.25)]
    option_bytes = np.array([s * int(r * 4) for s, r in options]) * 1000
    miss = np.array([[(max(0.0, 1 - s / 16) * r + 1 - r) * rng.uniform(0.5, 1.5) for s, r in options]
                     for _ in range(layers)])  # [L, O] bytes that still move
    demand = np.einsum("lo,lt->lot", miss, rng.uniform(0.5, 1.5, (layers, tokens))) * 1e-3
    return planner.Problem(options, option_bytes, np.full((layers, 1), 2e-4), np.full((layers, tokens), 3e-4),
                           demand, demand * 0.5, 1e-3), int(option_bytes.max() * layers * 0.4)


def test_plans_64_layers_in_under_two_seconds():
    problem, budget = _synthetic(64)
    t = time.perf_counter()
    assign, info = planner.optimise(problem, budget)
    assert time.perf_counter() - t < 2.0
    assert problem.option_bytes[assign].sum() <= budget
    assert problem.latency(assign) < problem.latency(planner.best_uniform(problem, budget))
    assert info["latency_per_iteration"][0] > problem.latency(assign)


def test_plan_cli_writes_the_schedule_simulate_predicts(mixtral_trace, tmp_path, capsys):
    out, png = tmp_path / "schedule.json", tmp_path / "plan.png"
    pytest.importorskip("matplotlib")
    assert main(["plan", "mixtral-8x7b", "--trace", str(SHARED_TRACE), "--vram-budget", "60GiB", "--out", str(out),
                 "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = preset("mixtral-8x7b")
    plan = planning.read_schedule(out, config)
    assert planning.footprint(config, plan)["total"] <= planning.parse_size("60GiB")
    assert png.stat().st_size > 0
    assert report["predicted_s_per_token"] <= report["uniform"]["predicted_s_per_token"]
    assert all(len(p.hot) == p.slots and len(p.prior) == config.num_experts for p in plan.layers)
    doc = json.loads(out.read_text())
    assert doc["model"] == planning.model_identity(config) and doc["planner"]["profile"]["name"] == "h100"
    # The schedule replays to exactly the latency the planner predicted for it.
    assert main(["simulate", "--trace", str(SHARED_TRACE), "--model", "mixtral-8x7b", "--schedule", str(out),
                 "--policy", "lcp", "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["prior_source"].startswith("schedule")
    assert sim["results"][0]["predicted_s_per_token"] == pytest.approx(report["predicted_s_per_token"], rel=1e-9)
    # Another model's schedule is refused with the differences named.
    with pytest.raises(planning.BudgetError, match="another model"):
        planning.read_schedule(out, preset("qwen3-30b-a3b"))


def test_budget_below_the_minimum_is_a_clear_error(mixtral_trace, tmp_path, capsys):
    for vram, message in (("2GiB", "fixed footprint"), ("8GiB", "below the minimum")):
        assert main(["plan", "mixtral-8x7b", "--trace", str(SHARED_TRACE), "--vram-budget", vram,
                     "--out", str(tmp_path / "s.json")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    config = preset("mixtral-8x7b")
    with pytest.raises(planning.BudgetError, match="minimum"):
        planner.optimise(_synthetic(4)[0], 1000)
    with pytest.raises(planning.BudgetError, match="exactly one"):
        planning.cache_budget(config, 2048)


def test_one_budget_check_for_the_runtime_and_the_planner():
    """plan.cache_budget alone checks the budget pair and range; plan_from_budget and `jaxmoe plan`
    both refuse through it, with the same minimum."""
    config = preset("mixtral-8x7b")
    fixed = planning.fixed_bytes(config, 2048)
    least = planning.min_cache_bytes(config, 0.5)
    assert planning.cache_budget(config, 2048, vram_budget=fixed + least, split_ratio=0.5) == least
    assert planning.cache_budget(config, 2048, expert_budget=1.0) == planning.routed_expert_bytes(config)
    for bad, message in (({}, "exactly one"), (dict(vram_budget=fixed + least, expert_budget=0.5), "exactly one"),
                         (dict(expert_budget=1.5), r"\(0, 1\]"), (dict(expert_budget=0.0), r"\(0, 1\]")):
        with pytest.raises(planning.BudgetError, match=message):
            planning.cache_budget(config, 2048, **bad)
        with pytest.raises(planning.BudgetError, match=message):
            planning.plan_from_budget(config, kv_length=2048, **bad)
    minimum = f"{fixed + least} bytes"
    with pytest.raises(planning.BudgetError, match=minimum):
        planning.cache_budget(config, 2048, vram_budget=fixed + least - 1, split_ratio=0.5)
    with pytest.raises(planning.BudgetError, match=minimum):
        planning.plan_from_budget(config, vram_budget=fixed + least - 1, split_ratio=0.5)
    with pytest.raises(planning.BudgetError, match="minimum at split ratio 0.5 is 0.1250"):
        planning.plan_from_budget(config, expert_budget=0.12, split_ratio=0.5)
    plan = planning.plan_from_budget(config, vram_budget=fixed + least, split_ratio=0.5)
    assert [p.slots for p in plan.layers] == [config.top_k] * len(plan.layers)
    assert planning.footprint(config, plan)["total"] == fixed + least


def test_plan_cli_names_the_minimum_at_its_smallest_ratio(tmp_path, capsys):
    config = preset("mixtral-8x7b")
    minimum = planning.fixed_bytes(config, 2048) + planning.min_cache_bytes(config, 0.5)
    assert main(["plan", "mixtral-8x7b", "--trace", str(SHARED_TRACE), "--vram-budget", str(minimum - 1),
                 "--ratios", "1,0.5", "--out", str(tmp_path / "s.json")]) == 2
    assert f"{minimum} bytes" in capsys.readouterr().err
    assert main(["plan", "mixtral-8x7b", "--trace", str(SHARED_TRACE), "--vram-budget", "60GiB",
                 "--expert-budget", "0.5", "--out", str(tmp_path / "s.json")]) == 2
    assert "exactly one" in capsys.readouterr().err
