"""Every cache policy, and the planner, replayed on the public Mixtral-8x7B routing trace.

    python -m bench.trace_policies [--trace T] [--profile h100]

At 25/50/75% of all expert bytes (uniform slots, whole experts, no prefetch: the trace records no
next-layer guesses): hit rate, bytes and predicted seconds per decode token of each policy, the
Belady oracle, and the planner's per-layer plan (lcp). The trace is replayed through the
runtime's own cache code, so hits and bytes are what the runtime would count; seconds come from
the cost model under the h100 profile, an ESTIMATE from published bandwidths, not a measurement.
lcp and static take the trace's own frequencies as prior (in-sample, optimistic); lcp without a
prior is shown too. Writes bench/results/simulate_mixtral_trace.json.
"""

from __future__ import annotations

import argparse

from bench import harness

POLICIES = ("lru", "lfu", "lcp", "static", "belady")
KEYS = ("policy", "online", "hit_rate", "bytes_per_token", "predicted_s_per_token", "compute_s_per_token",
        "transfer_s_per_token", "decode_tokens")


def main(argv=None) -> dict:
    from jaxmoe.models import preset
    from jaxmoe.offload import plan as planning
    from jaxmoe.schedules import planner
    from jaxmoe.schedules import simulate as sim
    from jaxmoe.schedules.profile import load_profile
    from jaxmoe.schedules.trace import read_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(harness.TRACE))
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--out", default=str(harness.RESULTS / "simulate_mixtral_trace.json"))
    args = ap.parse_args(argv)
    config, trace, profile = preset("mixtral-8x7b"), read_trace(args.trace), load_profile(args.profile)
    freqs = trace.frequencies()
    results, plans = {}, {}
    for fraction in (0.25, 0.5, 0.75):
        plan = planning.plan_from_budget(config, expert_budget=fraction, prefetch=False)
        rows = [{k: r[k] for k in KEYS} for r in sim.simulate_all(trace, config, plan, POLICIES, profile, prior=freqs)]
        no_prior = sim.simulate(trace, config, plan, "lcp", profile)
        results[f"{fraction:g}"] = rows + [{**{k: no_prior[k] for k in KEYS}, "policy": "lcp (no prior)"}]
        budget = planning.cache_budget(config, 2048, expert_budget=fraction)
        _, report = planner.plan(trace, config, profile, budget, policy="lcp", prefetch=False)
        plans[f"{fraction:g}"] = {k: report[k] for k in ("predicted_s_per_token", "best_uniform", "layers")}
    doc = {"benchmark": "trace_policies", "versions": harness.versions(), "trace": args.trace,
           "decode_tokens": trace.num_tokens("decode"), "model": planning.model_identity(config),
           "profile": {"name": profile["name"], "measured": bool(profile.get("measured"))},
           "results": results, "planner_lcp": plans}
    harness.write_result(args.out, doc)
    for fraction, rows in results.items():
        print(f"expert budget {fraction}: " + ", ".join(f"{r['policy']} {r['hit_rate']:.3f}" for r in rows)
              + f"; planner {1e3 * plans[fraction]['predicted_s_per_token']:.1f} ms/token predicted")
    return doc


if __name__ == "__main__":
    main()
