"""Predicted decode latency against expert-cache budget, per cache policy, on the public Mixtral trace.

    python bench/plan_plots.py [--trace T] [--profile h100] [--out-dir bench/results]

Writes bench/results/simulate_mixtral_trace.json (every policy at 25/50/75% of all expert bytes,
whole experts, no prefetch: the trace records no next-layer guesses) and
bench/results/plan_latency_vs_budget.png (the same, at every cache size from the minimum of 2
experts per layer to all 8, plus the planner's per-layer plan for lcp at each budget).

Everything here is a prediction: the trace is replayed through the runtime's cache code, and
seconds come from the cost model (schedules.costmodel) under the h100 profile, which is an
ESTIMATE from published bandwidths, not a measurement. The prior that lcp and static use is the
trace's own frequencies (optimistic, in-sample) unless stated; lcp without any prior is shown too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxmoe.models import preset
from jaxmoe.offload import plan as planning
from jaxmoe.schedules import planner
from jaxmoe.schedules import simulate as sim
from jaxmoe.schedules.profile import load_profile
from jaxmoe.schedules.stats import _pyplot
from jaxmoe.schedules.trace import read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
POLICIES = ("lru", "lfu", "lcp", "static", "belady")


def _row(r: dict) -> dict:
    keys = ("policy", "online", "hit_rate", "bytes_per_token", "predicted_s_per_token", "compute_s_per_token",
            "transfer_s_per_token", "decode_tokens")
    return {k: r[k] for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, trace, profile = preset("mixtral-8x7b"), read_trace(args.trace), load_profile(args.profile)
    freqs = trace.frequencies()
    t0 = time.perf_counter()

    def run(fraction: float) -> list[dict]:
        plan = planning.plan_from_budget(config, expert_budget=fraction, prefetch=False)
        rows = [_row(r) for r in sim.simulate_all(trace, config, plan, POLICIES, profile, prior=freqs)]
        no_prior = _row(sim.simulate(trace, config, plan, "lcp", profile))
        return rows + [{**no_prior, "policy": "lcp (no prior)"}]

    table = {f"{f:g}": run(f) for f in (0.25, 0.5, 0.75)}
    doc = {
        "what": "every cache policy replayed on the public Mixtral-8x7B routing trace at 25/50/75% of all expert "
                "bytes (uniform slots per layer, whole experts, no prefetch); seconds predicted by the cost model",
        "trace": str(Path(args.trace).name), "decode_tokens": trace.num_tokens("decode"),
        "model": planning.model_identity(config),
        "profile": {"name": profile["name"], "measured": bool(profile.get("measured")), "note": profile.get("note")},
        "prior_source": "the trace's own frequencies (optimistic, in-sample) for lcp and static; "
                        "'lcp (no prior)' uses none",
        "command": "python bench/plan_plots.py",
        "results": table,
    }

    slots = list(range(config.top_k, config.num_experts + 1))
    curves: dict[str, list[float]] = {p: [] for p in (*POLICIES, "lcp (no prior)")}
    for s in slots:
        for row in run(s / config.num_experts):
            curves[row["policy"]].append(row["predicted_s_per_token"])
    planned = []
    for s in slots:
        budget = planner.cache_budget(config, 2048, expert_budget=s / config.num_experts)
        _, report = planner.plan(trace, config, profile, budget, policy="lcp", prefetch=False)
        planned.append(report["predicted_s_per_token"])
    doc["curve"] = {"expert_budget": [s / config.num_experts for s in slots], "predicted_s_per_token": curves,
                    "planned_lcp_s_per_token": planned}
    doc["seconds_to_compute"] = round(time.perf_counter() - t0, 1)
    (out / "simulate_mixtral_trace.json").write_text(json.dumps(doc, indent=1) + "\n")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [100 * s / config.num_experts for s in slots]
    for name, ys in curves.items():
        ax.plot(x, [1e3 * y for y in ys], marker="o", ls="--" if name in ("belady", "lcp (no prior)") else "-",
                label=name + (" (oracle)" if name == "belady" else ""))
    ax.plot(x, [1e3 * y for y in planned], marker="s", color="black", label="planner (lcp, per-layer slots/split)")
    ax.set_xlabel("expert cache, % of all expert bytes (uniform: 2..8 of 8 experts per layer)")
    ax.set_ylabel("predicted ms / decode token")
    ax.set_title(f"Mixtral-8x7B, public HumanEval trace, {profile['name']} profile"
                 f"{'' if profile.get('measured') else ' (ESTIMATE)'}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "plan_latency_vs_budget.png", dpi=120)
    plt.close(fig)
    for f, rows in table.items():
        print(f"expert budget {f}: " + ", ".join(f"{r['policy']} {r['hit_rate']:.3f} / {1e3 * r['predicted_s_per_token']:.1f} ms"
                                                for r in rows))
    print(f"-> {out / 'simulate_mixtral_trace.json'}, {out / 'plan_latency_vs_budget.png'}")


if __name__ == "__main__":
    main()
