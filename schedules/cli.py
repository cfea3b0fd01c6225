"""Subcommands for traces, hardware profiles, simulation and planning (registered into `jaxmoe`).

    jaxmoe trace MODEL_DIR --prompts FILE --out TRACE.jsonl [--max-new-tokens N]
    jaxmoe trace-stats TRACE [--png FILE] [--json]
    jaxmoe profile --model MODEL_DIR|PRESET --out PROFILE.json
    jaxmoe simulate --trace TRACE --model MODEL_DIR|PRESET (--expert-budget F | --vram-budget SIZE | --schedule FILE)
                    [--policy P|all] [--split-ratio R] [--profile FILE] [--history TRACE ...] [--json]
    jaxmoe plan MODEL_DIR|PRESET --trace TRACE (--vram-budget SIZE | --expert-budget F) --out SCHEDULE.json
                [--profile FILE] [--policy P] [--plot PNG]

Errors are ValueError subclasses with a message; `jaxmoe.cli.main` prints them and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_PROFILE = "h100"


def register(sub) -> None:
    """Add this package's subcommands to the `jaxmoe` argument parser's subparsers."""
    from jaxmoe.schedules.simulate import ALL_POLICIES, PREDICTORS

    p = sub.add_parser("trace", help="record the routing of prompts on the resident model")
    p.add_argument("model_dir", nargs="?", help="model directory or `demo` (default: demo)")
    p.add_argument("--prompts", required=True, help="one prompt a line, or JSON lines with a \"prompt\" field")
    p.add_argument("--out", required=True, help="trace file to write (JSON lines)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.set_defaults(run=_trace)

    p = sub.add_parser("trace-stats", help="expert popularity, reuse, cross-layer predictability, EAMs")
    p.add_argument("trace")
    p.add_argument("--png", help="write a heat map of expert popularity per layer")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(run=_trace_stats)

    p = sub.add_parser("profile", help="measure host->device bandwidth and layer compute times on this device")
    p.add_argument("--model", required=True, action="append", help="preset or model directory (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--kv-length", type=int, default=1024, help="KV cache length of the attention timing")
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(run=_profile)

    p = sub.add_parser("simulate", help="replay a trace through the runtime's cache policies and cost model")
    p.add_argument("--trace", required=True)
    p.add_argument("--model", required=True, help="preset, `demo` or model directory")
    _budget_args(p)
    p.add_argument("--schedule", help="a planner schedule instead of a uniform budget")
    p.add_argument("--split-ratio", type=float, help="cached top share of each expert (default 1: whole experts)")
    p.add_argument("--policy", default="all", help=f"one of {', '.join(ALL_POLICIES)}, or all (default)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="built-in profile name or profile file (default h100, an estimate)")
    p.add_argument("--history", nargs="+", help="traces whose frequencies form the prior (default: this trace, optimistic)")
    p.add_argument("--no-prior", action="store_true", help="no prior, as the runtime without a schedule")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--predictor", choices=PREDICTORS, default="router",
                   help="prefetch guess: the trace's recorded router guess (default) or the actual next experts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_simulate)

    p = sub.add_parser("plan", help="choose per-layer cache slots and split ratios for a budget; write a schedule")
    p.add_argument("model", help="preset, `demo` or model directory")
    p.add_argument("--trace", required=True)
    _budget_args(p)
    p.add_argument("--profile", default=DEFAULT_PROFILE)
    p.add_argument("--policy", default="lcp", help="cache policy the runtime will use (default lcp)")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--predictor", choices=PREDICTORS, default="router")
    p.add_argument("--ratios", default="1,0.75,0.5,0.25", help="split ratios to choose from")
    p.add_argument("--out", required=True, help="schedule file to write")
    p.add_argument("--plot", help="PNG of the planned slots and split ratios per layer")
    p.add_argument("--json", action="store_true", help="print the planner's report as JSON")
    p.set_defaults(run=_plan)


def _budget_args(p) -> None:
    p.add_argument("--vram-budget", metavar="SIZE", help="whole device footprint, e.g. 24GiB")
    p.add_argument("--expert-budget", metavar="FRACTION", type=float, help="share of all expert bytes to cache")
    p.add_argument("--kv-length", type=int, default=2048, help="tokens of KV cache the VRAM budget reserves")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- trace ----------------------------------------------------------------------------------------


def _trace(args) -> None:
    import jaxmoe
    from jaxmoe.schedules import models
    from jaxmoe.schedules import trace as tr

    prompts = tr.read_prompts(args.prompts)
    engine = jaxmoe.load(models.model_source(args.model_dir))
    trace = tr.record(engine, prompts, args.max_new_tokens, chat=args.chat, progress=_progress)
    tr.write_trace(args.out, trace)
    print(f"traced {len(trace.requests)} requests, {trace.num_tokens('prefill')} prefill + "
          f"{trace.num_tokens('decode')} decode tokens -> {args.out}")


def _trace_stats(args) -> None:
    from jaxmoe.schedules import stats
    from jaxmoe.schedules.trace import read_trace

    trace = read_trace(args.trace)
    s = stats.trace_stats(trace)
    if args.png:
        stats.plot_popularity(s, args.png, f"expert popularity: {Path(args.trace).name}")
    print(json.dumps(s) if args.json else stats.format_stats(s))


# -- profile ---------------------------------------------------------------------------------------


def _profile(args) -> None:
    from jaxmoe.schedules import profile as prof
    from jaxmoe.schedules.models import resolve_config

    configs = [resolve_config(m) for m in args.model]
    doc = prof.measure_profile(configs, args.name or Path(args.out).stem, args.kv_length, repeats=args.repeats)
    prof.write_profile(args.out, doc)
    h2d = doc["h2d"]
    print(f"{doc['device']}: host->device {h2d['bandwidth_Bps'] / 1e9:.1f} GB/s + {h2d['latency_s'] * 1e6:.0f} us; "
          f"matvec memory bandwidth {doc['memory_bandwidth_Bps'] / 1e9:.1f} GB/s -> {args.out}")
    for m in doc["models"]:
        print(f"  {m['model']['family']} D={m['model']['hidden_size']}: attention {m['attention_s'] * 1e3:.3f} ms, "
              f"router {m['router_s'] * 1e3:.3f} ms, expert {m['expert_s'] * 1e3:.3f} ms")


# -- simulate --------------------------------------------------------------------------------------


def _uniform_or_schedule(args, config):
    from jaxmoe.offload import plan as planning

    if args.schedule:
        if args.vram_budget or args.expert_budget is not None or args.split_ratio is not None:
            raise ValueError("a schedule fixes budgets and split ratios; drop --vram-budget/--expert-budget/--split-ratio")
        return planning.read_schedule(args.schedule, config, prefetch=False if args.no_prefetch else None,
                                      kv_length=args.kv_length)
    if not args.vram_budget and args.expert_budget is None:
        raise ValueError("give --expert-budget, --vram-budget or --schedule")
    return planning.plan_from_budget(
        config, vram_budget=planning.parse_size(args.vram_budget) if args.vram_budget else None,
        expert_budget=args.expert_budget, split_ratio=args.split_ratio or 1.0, kv_length=args.kv_length,
        prefetch=not args.no_prefetch)


def _simulate(args) -> None:
    import dataclasses

    from jaxmoe.offload import plan as planning
    from jaxmoe.schedules import simulate as sim
    from jaxmoe.schedules.models import resolve_config
    from jaxmoe.schedules.profile import load_profile
    from jaxmoe.schedules.trace import read_trace, read_traces

    config = resolve_config(args.model)
    trace = read_trace(args.trace)
    trace.check_model(config)
    profile = load_profile(args.profile)
    names = list(sim.ALL_POLICIES) if args.policy == "all" else [args.policy]
    for n in names:
        if n not in sim.ALL_POLICIES:
            raise ValueError(f"unknown policy {n!r}; choose from {', '.join(sim.ALL_POLICIES)} or all")
    plan = _uniform_or_schedule(args, config)
    notes = []
    if plan.prefetch and args.predictor == "router" and not trace.has_predictions:
        plan = dataclasses.replace(plan, prefetch=False)
        notes.append("the trace records no next-layer guesses: simulated without prefetch (--predictor oracle prefetches "
                     "the actual next experts)")
    prior, source = None, "none (uniform)"
    if args.history:
        prior = sim.history_frequencies(read_traces(args.history), config)
        source = f"history: {', '.join(args.history)}"
    elif args.no_prior:
        plan = dataclasses.replace(plan, layers=tuple(dataclasses.replace(p, prior=None) for p in plan.layers))
    elif any(p.prior is not None for p in plan.layers):
        source = f"schedule {args.schedule}"
    else:
        prior = trace.frequencies()
        source = "this trace itself (optimistic: the prior has seen the requests it is scored on)"
    results = sim.simulate_all(trace, config, plan, names, profile, args.predictor, prior)
    doc = {
        "model": planning.model_identity(config), "trace": args.trace, "decode_tokens": trace.num_tokens("decode"),
        "profile": {"name": profile["name"], "measured": bool(profile.get("measured"))},
        "plan": plan.to_json(config), "footprint": planning.footprint(config, plan),
        "prior_source": source, "notes": notes, "results": results,
    }
    if args.json:
        print(json.dumps(doc))
        return
    print(_format_simulation(doc, config))


def _format_simulation(doc: dict, config) -> str:
    from jaxmoe.offload.plan import format_size

    slots = sorted({layer["slots"] for layer in doc["plan"]["layers"]})
    ratios = sorted({round(layer["split_ratio"], 4) for layer in doc["plan"]["layers"]})
    prof = doc["profile"]
    lines = [f"{config.family}: {len(config.moe_layer_ids)} MoE layers x {config.num_experts} experts, top-{config.top_k}; "
             f"{doc['decode_tokens']} decode tokens",
             f"cache: slots per layer {slots}, split ratio {ratios}, prefetch {'on' if doc['plan']['prefetch'] else 'off'}; "
             f"device footprint {format_size(doc['footprint']['total'])}",
             f"profile: {prof['name']} ({'measured' if prof['measured'] else 'ESTIMATE, not measured'}); prior: {doc['prior_source']}"]
    lines += [f"note: {n}" for n in doc["notes"]]
    lines.append(f"{'policy':<8} {'kind':<7} {'hit rate':>8} {'MB/token':>10} {'ms/token':>9} {'tokens/s':>9}")
    for r in doc["results"]:
        ms = r["predicted_s_per_token"] * 1e3
        lines.append(f"{r['policy']:<8} {'online' if r['online'] else 'oracle':<7} {r['hit_rate']:>8.3f} "
                     f"{r['bytes_per_token'] / 1e6:>10.1f} {ms:>9.2f} {1e3 / ms if ms else float('inf'):>9.2f}")
    return "\n".join(lines)


# -- plan ------------------------------------------------------------------------------------------


def _plan(args) -> None:
    from jaxmoe.offload import plan as planning
    from jaxmoe.offload import policies
    from jaxmoe.schedules import planner
    from jaxmoe.schedules.models import resolve_config
    from jaxmoe.schedules.profile import load_profile
    from jaxmoe.schedules.trace import read_trace

    config = resolve_config(args.model)
    trace = read_trace(args.trace)
    trace.check_model(config)
    profile = load_profile(args.profile)
    policies.get(args.policy)
    if args.policy in policies.ORACLE:
        raise ValueError(f"policy {args.policy!r} needs the future; plan for an online policy")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise ValueError(f"--ratios takes comma-separated numbers, got {args.ratios!r}") from None
    prefetch = not args.no_prefetch
    if prefetch and args.predictor == "router" and not trace.has_predictions:
        prefetch = False
        _progress("note: the trace records no next-layer guesses; planning without prefetch")
    vram = planning.parse_size(args.vram_budget) if args.vram_budget else None
    budget = planning.cache_budget(config, args.kv_length, vram, args.expert_budget, split_ratio=min(ratios))
    result, report = planner.plan(trace, config, profile, budget, policy=args.policy, prefetch=prefetch,
                                  predictor=args.predictor, kv_length=args.kv_length, ratios=ratios,
                                  progress=_progress)
    footprint = planning.footprint(config, result)
    if vram is not None and footprint["total"] > vram:
        raise planning.BudgetError(f"internal: plan needs {footprint['total']} bytes, over the budget {vram}")
    report.update(trace=args.trace, profile={"name": profile["name"], "measured": bool(profile.get("measured"))},
                  footprint=footprint)
    planning.write_schedule(args.out, config, result, extra={"planner": report})
    if args.plot:
        plot_plan(report, args.plot, f"{config.family}: plan for {planning.format_size(budget)} of expert cache")
    if args.json:
        print(json.dumps(report))
        return
    u, ub = report["uniform"], report["best_uniform"]
    lines = [f"planned {len(result.layers)} MoE layers, expert cache {planning.format_size(report['cache_bytes'])} of "
             f"{planning.format_size(budget)} (device footprint {planning.format_size(footprint['total'])}); "
             f"profile {profile['name']}{'' if profile.get('measured') else ' (ESTIMATE)'}",
             f"predicted: plan {report['predicted_s_per_token'] * 1e3:.2f} ms/token"]
    if u:
        lines.append(f"           uniform whole experts ({u['slots']} slots) {u['predicted_s_per_token'] * 1e3:.2f} ms/token")
    if ub:
        lines.append(f"           best uniform ({ub['slots']} slots, split {ub['split_ratio']:g}) "
                     f"{ub['predicted_s_per_token'] * 1e3:.2f} ms/token")
    lines.append(f"planner: {report['iterations']} fixed-point iterations, stopped at {report['stopped_at']}")
    lines.append("layer slots split hit-rate")
    lines += [f"{layer['layer']:>5} {layer['slots']:>5} {layer['split_ratio']:>5.2f} {layer['decode_hit_rate']:>8.3f}"
              for layer in report["layers"]]
    lines.append(f"-> {args.out}")
    print("\n".join(lines))


def plot_plan(report: dict, path: str, title: str) -> None:
    """Two panels: planned cache slots and split ratio per MoE layer."""
    from jaxmoe.schedules.stats import _pyplot

    plt = _pyplot()
    layers = [entry["layer"] for entry in report["layers"]]
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(6, 0.22 * len(layers) + 2), 5), sharex=True)
    a.bar(layers, [entry["slots"] for entry in report["layers"]], color="tab:blue")
    if report.get("uniform"):
        a.axhline(report["uniform"]["slots"], color="gray", ls="--", label="uniform (whole experts)")
        a.legend(loc="upper right", fontsize=8)
    a.set_ylabel("cache slots")
    b.bar(layers, [entry["split_ratio"] for entry in report["layers"]], color="tab:orange")
    b.set_ylabel("split ratio")
    b.set_ylim(0, 1.05)
    b.set_xlabel("MoE layer")
    a.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
