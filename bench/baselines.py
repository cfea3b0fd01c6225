"""jaxmoe against PyTorch offloading at equal expert budgets: batch-1 greedy decode.

    python -m bench.baselines --device gpu    # real shapes, random bf16 weights; ~7 minutes on one H100
    python -m bench.baselines --device cpu    # tiny models: every system's tokens (correctness, not speed)

Systems, each in child processes of its own on a GPU (JAX and PyTorch never share the device):
- jaxmoe, the headline configuration declared before the run (`--headline`, default lru:prefetch)
  and the other `--variants` beside it, one process per budget;
- torch_lru (bench/torch_lru.py): a Mixtral-offloading-style expert cache in PyTorch;
- accelerate: transformers with `device_map="auto"`;
- transformers[resident]: the whole model on the device, the token reference.
Equal work: every system gets the same bytes for caching experts (`equal_budgets`), the same
prompt, the same number of new tokens and the same routing; each one's measured device peak is
reported. Method and fields: bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness

# name: (preset, layers kept, share of the time limit). Depth is cut to fit host memory and time.
GPU_MODELS = {"mixtral-8x7b": ("mixtral-8x7b", 2, 0.45), "qwen3-30b-a3b": ("qwen3-30b-a3b", 4, 0.25),
              "olmoe-1b-7b": ("olmoe-1b-7b", None, 0.30)}
_TINY = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             rope_theta=10000.0, max_position_embeddings=512, torch_dtype="float32")
SMOKE_MODELS = {  # tiny-mixtral has the trace's 8 experts and top-2, so it also replays the trace
    "tiny-mixtral": (harness.hf_config("mixtral-8x7b", 2, intermediate_size=32, **_TINY), None, 0.6),
    "tiny-qwen3-moe": (harness.hf_config("qwen3-30b-a3b", 3, moe_intermediate_size=32, intermediate_size=48,
                                         num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], bos_token_id=1,
                                         eos_token_id=2, **_TINY), None, 0.4),
}
STEPS = {"reference": 0.10, "torch_lru": 0.25, "jaxmoe": 0.45, "accelerate": 0.20}  # shares of a model's time


def equal_budgets(config, fraction: float, kv_length: int) -> dict[str, Any]:
    """What each system may hold at `fraction` of all expert bytes: the same bytes of expert cache.

    jaxmoe's plan caches `slots` whole experts per MoE layer; torch_lru gets the same slots;
    accelerate gets the weights that are not routed experts plus the same expert bytes as its
    `max_memory` (it places whole modules, so it may use less). jaxmoe's own KV cache and transfer
    buffers are not expert cache; they are in its planned footprint, reported beside."""
    from jaxmoe.offload import plan as planning

    plan = planning.plan_from_budget(config, expert_budget=fraction, kv_length=kv_length)
    slots = plan.layers[0].slots
    moe_layers = len(config.moe_layer_ids)
    return {"expert_budget": fraction, "slots": slots,
            "expert_cache_bytes": {"jaxmoe": planning.cache_bytes(config, plan),
                                   "torch_lru": slots * moe_layers * config.expert_bytes(),
                                   "accelerate": slots * moe_layers * config.expert_bytes()},
            "accelerate_max_memory": planning.resident_bytes(config) + slots * moe_layers * config.expert_bytes(),
            "jaxmoe_footprint": planning.footprint(config, plan)}


def parse_variant(text: str) -> tuple[str, bool]:
    policy, _, fetch = text.partition(":")
    if policy not in ("lru", "lfu", "lcp") or fetch not in ("prefetch", "no-prefetch"):
        raise SystemExit(f"variant {text!r}: write POLICY:prefetch or POLICY:no-prefetch, POLICY one of lru, lfu, lcp")
    return policy, fetch == "prefetch"


def variant_name(policy: str, prefetch: bool) -> str:
    return f"jaxmoe[{policy},{'prefetch' if prefetch else 'no-prefetch'}]"


def _modes(task) -> list[tuple[str, harness.Replay | None]]:
    return [(m, harness.Replay(task["replay"]) if m == "replay" else None) for m in task["modes"]]


def _torch_model(task, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[task["dtype"]]
    return AutoModelForCausalLM.from_pretrained(task["hf_dir"], dtype=dtype, **kw).eval()


def _torch_runs(task, model, mode, replay, n, counters=None, record_routing=False) -> dict:
    """Warm-up and repeats of a transformers model in one routing mode, routing replayed or recorded."""
    from bench.torch_lru import install_replay, moe_layers

    undo, clock, hooks, routing = None, None, [], {}
    if replay is not None:
        clock, undo = install_replay(model, replay)
    elif record_routing:
        for l, layer in moe_layers(model).items():
            def hook(_m, args, output, l=l):
                if args[0].reshape(-1, args[0].shape[-1]).shape[0] == 1:  # decode steps only
                    routing.setdefault(l, []).append(sorted(set(output[2][0].tolist())))
            hooks.append(layer.mlp.gate.register_forward_hook(hook))

    def once():
        def before():
            routing.clear()
            if clock is not None:
                clock.reset()
            if counters is not None:
                counters.reset_counters()

        r = harness.torch_generate(model, task["prompt"], n, "cuda" if task["device"] == "gpu" else "cpu", before)
        return {**r, **(counters.report() if counters is not None else {})}

    try:
        out = harness.repeat(once, task["repeats"])
    finally:
        for h in hooks:
            h.remove()
        if undo is not None:
            undo()
    if record_routing and replay is None:
        out["decode_routing"] = {str(l): seq for l, seq in routing.items()}
    return out


def worker_reference(task, emit) -> None:
    model = _torch_model(task).to("cuda" if task["device"] == "gpu" else "cpu")
    for mode, replay in _modes(task):
        emit({"system": "transformers[resident]", "routing": mode, "budget": None,
              **_torch_runs(task, model, mode, replay, task["new_tokens"], record_routing=True)})


def worker_torch_lru(task, emit) -> None:
    from bench.torch_lru import ExpertOffload

    model = _torch_model(task)
    offload = ExpertOffload(model, task["budgets"][0]["slots"], "cuda" if task["device"] == "gpu" else "cpu",
                            prefetch=True)
    for budget in task["budgets"]:
        offload.set_slots(budget["slots"])
        for mode, replay in _modes(task):
            emit({"system": "torch_lru[prefetch]", "routing": mode, "budget": budget["expert_budget"],
                  **_torch_runs(task, model, mode, replay, task["new_tokens"], counters=offload)})


def worker_accelerate(task, emit) -> None:
    gpu = task["device"] == "gpu"
    for budget in task["budgets"]:
        offload_dir = tempfile.mkdtemp(prefix="accelerate-offload-")
        limit = int(budget["accelerate_max_memory"])
        max_memory = {0: limit, "cpu": int(task["host_bytes"])} if gpu else {"cpu": limit}  # CPU: rest to disk
        model = _torch_model(task, device_map="auto", max_memory=max_memory, offload_folder=offload_dir)
        placed = dict(model.hf_device_map)
        main = 0 if gpu else "cpu"
        on_main = {k for k, v in placed.items() if v == main}
        expert_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                           if ".experts." in name and any(k == "" or name.startswith(k + ".") for k in on_main))
        moved = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                    if not any(k == "" or name.startswith(k + ".") for k in on_main))
        extra = {"max_memory": {str(k): v for k, v in max_memory.items()}, "expert_bytes_on_device": expert_bytes,
                 "bytes_h2d_per_token": float(moved), "offloaded_to": "cpu" if gpu else "disk"}
        for mode, replay in _modes(task):
            emit({"system": "accelerate", "routing": mode, "budget": budget["expert_budget"], **extra,
                  **_torch_runs(task, model, mode, replay, task["accelerate_tokens"])})
        del model
        gc.collect()
        shutil.rmtree(offload_dir, ignore_errors=True)


def worker_jaxmoe(task, emit) -> None:
    import jaxmoe

    budget = task["budgets"][0]
    store = None
    for policy, prefetch in task["variants"]:
        engine = jaxmoe.load(task["jaxmoe_dir"], expert_budget=budget["expert_budget"], policy=policy,
                             prefetch=prefetch, kv_length=task["kv_length"], store=store)
        store = engine.store  # the same whole-expert split: reuse the pinned experts
        for mode, replay in _modes(task):
            engine.route_override = replay.rows if replay is not None else None
            r = harness.repeat(lambda: harness.jaxmoe_generate(engine, task["prompt"], task["new_tokens"]),
                               task["repeats"])
            emit({"system": variant_name(policy, prefetch), "routing": mode, "budget": budget["expert_budget"], **r})
        del engine
        gc.collect()


def worker_bandwidth(task, emit) -> None:
    out = {"system": "bandwidth", "jax": harness.h2d_bandwidth_jax(task["sizes_mb"])}
    if task["device"] == "gpu":
        out["torch"] = harness.h2d_bandwidth_torch(task["sizes_mb"])
    emit(out)


def worker_build(task, emit) -> None:
    hf_dir, jm_dir = harness.build_model(task["name"], task["config"], task["workdir"], std=task["std"])
    emit({"system": "build", "hf_dir": str(hf_dir), "jaxmoe_dir": str(jm_dir)})


WORKERS = {"build": worker_build, "bandwidth": worker_bandwidth, "reference": worker_reference,
           "torch_lru": worker_torch_lru, "jaxmoe": worker_jaxmoe, "accelerate": worker_accelerate}


def worker_main(task_path: str) -> None:
    task = json.loads(Path(task_path).read_text())
    with open(task["out"], "a") as f:
        def emit(record):
            f.write(json.dumps({"model": task.get("model"), **record}, default=harness._json_default) + "\n")
            f.flush()

        try:
            WORKERS[task["kind"]](task, emit)
        except Exception as exc:  # recorded, and the run goes on with the next step
            emit({"system": task["kind"], "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:600],
                  "traceback": traceback.format_exc()[-3000:]})


def run_task(task: dict, timeout: float, workdir: Path, log) -> list[dict]:
    """One worker in a child process, stopped at `timeout`; its records."""
    out = workdir / f"{task['kind']}-{time.time_ns()}.jsonl"
    path = out.with_suffix(".json")
    path.write_text(json.dumps({**task, "out": str(out)}, default=harness._json_default))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(harness.ROOT))
    if task["kind"] == "build" or task["device"] == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.baselines", "--worker", str(path)], env=env,
                              cwd=harness.ROOT, capture_output=True, text=True, timeout=max(timeout, 5.0))
        status = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-1500:]}"
    except subprocess.TimeoutExpired:
        status = f"stopped after {timeout:.0f} s (its share of --time-limit)"
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if status:
        log(f"  {task['kind']}: {status.splitlines()[0]}")
        records.append({"model": task.get("model"), "system": task["kind"], "status": "error", "reason": status})
    return records


def run_model(name: str, args, doc: dict, end: float, workdir: Path, log) -> None:
    spec, layers, _ = (SMOKE_MODELS if args.device == "cpu" else GPU_MODELS)[name]
    config_dict = harness.hf_config(spec, layers)
    config = harness.jaxmoe_config(config_dict)
    full_layers = harness.hf_config(spec)["num_hidden_layers"]
    kv_length = max(256, 1 << (args.prompt_tokens + args.new_tokens - 1).bit_length())
    replay = harness.Replay(args.replay) if args.replay else None
    modes = ["router"] + (["replay"] if replay is not None and replay.fits(config) else [])
    budgets = [equal_budgets(config, f, kv_length) for f in args.budgets]
    meta = doc["models"][name] = {"layers": config.num_layers, "full_layers": full_layers, "dtype": config.dtype,
                                  "expert_bytes": config.expert_bytes(), "moe_layers": len(config.moe_layer_ids),
                                  "routing_modes": modes, "budgets": budgets, "hf_config": config_dict}
    log(f"[{name}] building ({config.num_layers} of {full_layers} layers)")
    built = run_task({"kind": "build", "device": args.device, "name": name, "config": config_dict,
                      "workdir": str(workdir / "models"), "std": 0.15 if args.device == "cpu" else 0.02},
                     end - time.time(), workdir, log)
    if "hf_dir" not in built[0]:
        meta["error"] = built[0].get("reason")
        return
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt_tokens).tolist()
    base = {"model": name, "device": args.device, "hf_dir": built[0]["hf_dir"], "jaxmoe_dir": built[0]["jaxmoe_dir"],
            "dtype": config.dtype, "modes": modes, "replay": str(args.replay) if args.replay else None,
            "prompt": prompt, "new_tokens": args.new_tokens, "accelerate_tokens": args.accelerate_tokens,
            "repeats": args.repeats, "kv_length": kv_length, "budgets": budgets, "host_bytes": args.host_bytes}
    steps = [("reference", {}), ("torch_lru", {})]
    steps += [("jaxmoe", {"budgets": [b], "variants": args.variants}) for b in budgets]
    steps += [("accelerate", {})]
    weight = {kind: STEPS[kind] / (len(budgets) if kind == "jaxmoe" else 1) for kind in STEPS}
    for i, (kind, extra) in enumerate(steps):
        share = weight[kind] / sum(weight[k] for k, _ in steps[i:])
        timeout = (end - time.time()) * share
        log(f"[{name}] {kind} {extra.get('budgets', [{}])[0].get('expert_budget', '')} (up to {timeout:.0f} s)")
        doc["records"] += run_task({**base, "kind": kind, **extra}, timeout, workdir, log)
        summarise(doc, args)
    shutil.rmtree(Path(base["hf_dir"]).parent, ignore_errors=True)  # tens of GB at full scale


BASELINES = ("torch_lru[prefetch]", "accelerate")


def _ratio(systems: dict, a: str, b: str) -> float | None:
    x, y = (systems.get(k, {}).get("decode_tokens_per_s") for k in (a, b))
    return x / y if x and y else None


def summarise(doc: dict, args) -> None:
    """One entry per (model, routing, budget): every system's figures, token agreement with the
    resident reference, the oracle's bytes, and the headline's ratios to the baselines."""
    bw = max([r["gb_per_s"] for rec in doc["records"] if rec.get("system") == "bandwidth"
              for r in rec.get("jax", []) + rec.get("torch", [])] or [0.0]) * 1e9
    doc["h2d_peak_gb_per_s"] = bw / 1e9
    headline = variant_name(*args.headline)
    results = []
    for name, meta in doc["models"].items():
        recs = [r for r in doc["records"] if r.get("model") == name and "routing" in r]
        config = harness.jaxmoe_config(meta["hf_config"])
        for mode in meta["routing_modes"]:
            ref = next((r for r in recs if r["routing"] == mode and r["system"] == "transformers[resident]"), None)
            for b in meta["budgets"]:
                systems = {r["system"]: {k: v for k, v in r.items() if k not in ("token_ids", "decode_routing", "model")}
                           for r in recs if r["routing"] == mode and r["budget"] == b["expert_budget"]}
                entry = {"model": name, "routing": mode, "expert_budget": b["expert_budget"], "slots": b["slots"],
                         "expert_cache_bytes": b["expert_cache_bytes"], "systems": systems}
                if ref is not None:
                    for r in recs:
                        if r["routing"] == mode and r["budget"] == b["expert_budget"]:
                            systems[r["system"]]["first_token_mismatch"] = harness.first_mismatch(
                                r["token_ids"], ref["token_ids"][: len(r["token_ids"])])
                    routing = ref.get("decode_routing")
                    if mode == "replay":
                        routing = harness.Replay(args.replay).decode_routing(
                            config.moe_layer_ids, args.prompt_tokens, args.new_tokens - 1)
                    if routing:
                        o = harness.oracle({int(l): s for l, s in routing.items()}, config, b["slots"])
                        o["tokens_per_s_at_peak_bandwidth"] = bw / o["bytes_per_token"] if o["bytes_per_token"] else None
                        entry["oracle"] = o
                entry["headline"] = headline
                entry["ratios"] = {f"{headline}/{b}": _ratio(systems, headline, b) for b in BASELINES}
                entry["variants_over_torch_lru"] = {k: _ratio(systems, k, "torch_lru[prefetch]")
                                                    for k in systems if k.startswith("jaxmoe[")}
                results.append(entry)
    doc["results"] = results
    doc["problems"] = [f"{r.get('model')} {r['system']}: {r['reason']}" for r in doc["records"] if r.get("status") == "error"]
    harness.write_result(args.out, doc)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), required=True)
    ap.add_argument("--models", help="comma-separated (default: all for the device)")
    ap.add_argument("--budgets", default="0.5,0.25,0.75", help="shares of all expert bytes, in the order run")
    ap.add_argument("--headline", default="lru:prefetch", help="the one jaxmoe configuration the ratios compare")
    ap.add_argument("--variants", default="lru:no-prefetch,lfu:prefetch,lcp:prefetch", help="shown beside the headline")
    ap.add_argument("--replay", default=str(harness.TRACE), help="routing trace for replay mode; 'none' turns it off")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--accelerate-tokens", type=int, default=None, help="accelerate moves every offloaded weight "
                    "every token, so its per-token time is flat (gpu default 8)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (gpu 420, cpu 1800)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = args.device == "gpu"
    table = GPU_MODELS if gpu else SMOKE_MODELS
    args.models = args.models.split(",") if args.models else list(table)
    for m in args.models:
        if m not in table:
            raise SystemExit(f"--models: unknown model {m!r}; choose from {', '.join(table)}")
    args.budgets = [float(x) for x in args.budgets.split(",")]
    args.headline = parse_variant(args.headline)
    args.variants = [args.headline] + [v for v in map(parse_variant, filter(None, args.variants.split(",")))
                                       if v != args.headline]
    args.replay = None if args.replay == "none" else Path(args.replay)
    if args.replay is not None and not args.replay.is_file():
        raise SystemExit(f"--replay {args.replay}: no such file")
    args.prompt_tokens = args.prompt_tokens or (128 if gpu else 16)
    args.new_tokens = args.new_tokens or (64 if gpu else 10)
    args.accelerate_tokens = args.accelerate_tokens or (8 if gpu else args.new_tokens)
    args.repeats = args.repeats or (3 if gpu else 1)
    args.time_limit = args.time_limit or (420.0 if gpu else 1800.0)
    args.host_bytes = int(0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    args.out = Path(args.out or harness.RESULTS / f"baselines_{args.device}.json")
    return args


def main(argv=None) -> dict:
    start = time.time()
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    env = dict(os.environ, **({"JAX_PLATFORMS": "cpu"} if args.device == "cpu" else {}))
    found = harness.probe_platform(env)
    harness.require_platform(args.device, found, torch_too=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxmoe-baselines-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "baselines", "correctness_only": args.device == "cpu", "machine": harness.machine(found),
        "versions": harness.versions(),
        "settings": {"device": args.device, "batch": 1, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "accelerate_tokens": args.accelerate_tokens,
                     "repeats": args.repeats, "budgets": args.budgets, "headline": variant_name(*args.headline),
                     "variants": [variant_name(*v) for v in args.variants], "models": args.models,
                     "replay": str(args.replay) if args.replay else None, "time_limit_s": args.time_limit},
        "models": {}, "records": [],
    }
    log(f"{doc['machine']['device']} ({found['jax_platform']}); headline {doc['settings']['headline']}; -> {args.out}")
    sizes = [16, 64, 256, 1024] if args.device == "gpu" else [1, 4]
    doc["records"] += run_task({"kind": "bandwidth", "device": args.device, "sizes_mb": sizes}, 120, workdir, log)
    table = GPU_MODELS if args.device == "gpu" else SMOKE_MODELS
    end = start + args.time_limit
    for i, name in enumerate(args.models):
        shares = [table[m][2] for m in args.models[i:]]
        run_model(name, args, doc, time.time() + (end - time.time()) * shares[0] / sum(shares), workdir, log)
    summarise(doc, args)
    for e in doc["results"]:
        tps = {k: round(v["decode_tokens_per_s"], 2) for k, v in e["systems"].items() if "decode_tokens_per_s" in v}
        log(f"{e['model']} {e['routing']} {e['expert_budget']:.0%}: tok/s {tps}")
    for p in doc["problems"]:
        log(f"problem: {p}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2])
    else:
        main()
