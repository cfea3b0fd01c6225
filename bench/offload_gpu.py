"""The offload runtime on a GPU: decode at an expert budget against the bandwidth floor, prefetch on
and off, the overlap ablation, a split-ratio sweep, and two transfer designs side by side.

    python -m bench.offload_gpu            # Mixtral-8x7B shapes, random bf16, 4 layers, 50% budget
    python -m bench.offload_gpu --smoke    # tiny shapes on whatever JAX runs on (CPU: correctness only)

Every run decodes the same prompt to the same number of tokens, and its tokens are checked
against the resident model's. Runs go in order of growing device footprint, because JAX's device
peak is a process-lifetime figure: each run's `device_bytes_peak` is the peak up to its end.
The overlap ablation (method in bench/README.md) times three runs on the same per-layer path:
- both: the budget run with prefetch (transfers and compute);
- compute only: every expert cached, the per-layer path forced (`fast_path=False`): the same
  calls and host round trips, nothing to move;
- copy only: the very segments the `both` run moved, step by step, with nothing else running.
Writes bench/results/offload_gpu_<platform>[_smoke].json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import harness

SPLIT_RATIOS = (0.25, 0.5, 0.75, 1.0)
_SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              vocab_size=512, torch_dtype="float32")


def decode(engine, prompt: list[int], tokens: int, repeats: int) -> dict:
    """Warm-up (compile, fill the cache), then the median of `repeats` requests."""
    return harness.repeat(lambda: harness.jaxmoe_generate(engine, prompt, tokens), repeats)


def copy_only(log: list, steps: int, repeats: int) -> dict:
    """Seconds per token to move the logged segments again, a step's copies at a time, nothing else
    running: (decode step, layer, pinned-host segment) entries from an engine's `transfer_log`."""
    import jax

    from jaxmoe.offload.runtime import memory

    by_step = defaultdict(list)
    for step, _layer, segment in log:
        by_step[step].append(segment)
    device = memory("device")

    def once() -> None:
        for segments in by_step.values():
            jax.block_until_ready(jax.device_put(segments, device))

    times = harness.seconds(once, repeats)
    moved = sum(a.nbytes for segments in by_step.values() for a in jax.tree.leaves(segments))
    return {"s_per_token": statistics.median(times) / steps, "bytes_per_token": moved / steps, "steps": steps,
            "runs_s": times}


def overlap(both_s: float, compute_s: float, copy_s: float) -> dict:
    """How much of the copying the `both` run hid behind compute: 1 when it costs max(copy,
    compute), 0 when it costs their sum; negative when the combination costs more than the sum."""
    hidden = compute_s + copy_s - both_s
    return {"both_s_per_token": both_s, "compute_only_s_per_token": compute_s, "copy_only_s_per_token": copy_s,
            "hidden_s_per_token": hidden, "hidden_share_of_copy": hidden / min(copy_s, compute_s) if copy_s else None}


def transfer_designs(config, experts_per_step: int, steps: int) -> dict:
    """Eager per-expert `device_put` (the runtime's design) against one jit that slices a stacked
    pinned_host array with traced expert ids and moves the slices to device memory inside the jit."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmoe.offload.runtime import memory

    host, device = memory("pinned_host"), memory("device")
    shape = (3, config.moe_intermediate_size, config.hidden_size)
    one = np.ones(shape, config.jnp_dtype)
    per_expert = [jax.device_put(one, host) for _ in range(config.num_experts)]
    stacked = jax.device_put(np.ones((config.num_experts, *shape), config.jnp_dtype), host)
    ids = np.random.default_rng(0).integers(0, config.num_experts, (steps, experts_per_step))
    nbytes = ids.size * one.nbytes

    def eager():
        jax.block_until_ready([jax.device_put(per_expert[i], device) for row in ids for i in row])

    def timed(fn) -> float:
        return statistics.median(harness.seconds(fn, 3))

    out = {"bytes_per_run": nbytes, "eager_gb_per_s": nbytes / timed(eager) / 1e9}
    try:
        @jax.jit
        def in_jit(store, idx):
            rows = [jax.lax.dynamic_index_in_dim(store, idx[j], keepdims=False) for j in range(experts_per_step)]
            return [jax.device_put(r, jax.memory.Space.Device) for r in rows]

        id_arrays = [jnp.asarray(r, jnp.int32) for r in ids]
        out["in_jit_gb_per_s"] = nbytes / timed(lambda: jax.block_until_ready([in_jit(stacked, r) for r in id_arrays])) / 1e9
    except Exception as exc:  # whether XLA takes the design on this platform is itself the result
        out["in_jit_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default=None, help="default: gpu, or cpu with --smoke")
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=4, help="depth cut (host memory and time); per-layer figures scale")
    ap.add_argument("--budget", type=float, default=0.5, help="expert budget (share of all expert bytes)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for a quick check anywhere")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "gpu")
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    found = harness.probe_platform()
    harness.require_platform(args.device, found)

    import jaxmoe
    from jaxmoe import device_memory
    from jaxmoe.engine import Engine
    from jaxmoe.offload import plan as planning

    hf_cfg = harness.hf_config(args.preset, args.layers, **(_SMOKE if args.smoke else {}))
    config = harness.jaxmoe_config(hf_cfg)
    kv = 256
    full = planning.plan_from_budget(config, expert_budget=1.0, kv_length=kv)
    # Before anything starts JAX (conversion does): the largest run, every expert cached, sets the
    # process's device limit, which XLA reads once.
    memory_settings = device_memory.configure(device_memory.device_limit(config, full),
                                              planning.routed_expert_bytes(config))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxmoe-offload-gpu-"))
    t = time.perf_counter()
    _, model_dir = harness.build_model(f"{args.preset}-L{args.layers}{'-smoke' if args.smoke else ''}", hf_cfg,
                                       workdir, router_std=1.0)
    build_s = time.perf_counter() - t
    prompt = list(range(3, 3 + (16 if args.smoke else 128)))

    bandwidth = harness.h2d_bandwidth_jax([1, 4] if args.smoke else [1, 16, 64, 256])
    peak_bw = max(r["gb_per_s"] for r in bandwidth) * 1e9
    runs, common = {}, dict(expert_budget=args.budget, kv_length=kv)

    def run(name, **load) -> dict:
        print(f"{name} ...", flush=True)
        engine = jaxmoe.load(model_dir, **load)
        r = runs[name] = decode(engine, prompt, args.tokens, args.repeats)
        r["footprint"] = planning.footprint(config, engine.plan)
        if name == "both":  # one more request, its copies logged for the copy-only replay
            engine.transfer_log = []
            harness.jaxmoe_generate(engine, prompt, args.tokens)
            r["_log"] = engine.transfer_log
        return r

    run("both", prefetch=True, **common)
    run("no_prefetch", prefetch=False, **common)
    for ratio in SPLIT_RATIOS[:-1]:  # 1.0 is the `both` run
        run(f"split_{ratio:g}", prefetch=True, split_ratio=ratio, **common)
    runs[f"split_{SPLIT_RATIOS[-1]:g}"] = runs["both"]
    run("compute_only", prefetch=True, expert_budget=1.0, kv_length=kv, fast_path=False)
    print("resident ...", flush=True)
    resident = Engine.from_dir(model_dir)
    runs["resident"] = decode(resident, prompt, args.tokens, args.repeats)
    del resident

    copy = copy_only(runs["both"].pop("_log"), args.tokens - 1, args.repeats)
    s = {name: 1.0 / r["decode_tokens_per_s"] for name, r in runs.items()}
    reference = runs["resident"]["token_ids"]
    report = {
        "benchmark": "offload_gpu", "machine": harness.machine(found), "versions": harness.versions(),
        "settings": {"preset": args.preset, "layers": args.layers, "full_layers": harness.hf_config(args.preset)[
            "num_hidden_layers"], "expert_budget": args.budget, "new_tokens": args.tokens, "prompt_tokens": len(prompt),
            "repeats": args.repeats, "dtype": config.dtype, "smoke": args.smoke, "weights": "random",
            "kv_length": kv, "xla_flags": os.environ.get("XLA_FLAGS")},
        "device_memory": memory_settings, "checkpoint_build_s": build_s,
        "h2d_bandwidth": bandwidth, "peak_h2d_gb_per_s": peak_bw / 1e9,
        "transfer_designs": transfer_designs(config, config.top_k, args.layers * 4),
        "decode": {name: {k: v for k, v in r.items() if k != "token_ids"} for name, r in runs.items()},
        "tokens_match_resident": {name: harness.first_mismatch(r["token_ids"], reference) is None
                                  for name, r in runs.items()},
        "bandwidth_floor_s_per_token": runs["both"]["bytes_h2d_per_token"] / peak_bw,
        "overlap": overlap(s["both"], s["compute_only"], copy["s_per_token"]),
        "copy_only": copy,
        "paths": {name: runs[name]["layer_paths"] for name in ("both", "compute_only")},
        "split_sweep": {f"{r:g}": {"decode_tokens_per_s": runs[f"split_{r:g}"]["decode_tokens_per_s"],
                                   "bytes_h2d_per_token": runs[f"split_{r:g}"]["bytes_h2d_per_token"],
                                   "hit_rate": runs[f"split_{r:g}"]["hit_rate"],
                                   "slots": runs[f"split_{r:g}"]["offload"]["layers"][0]["slots"]}
                        for r in SPLIT_RATIOS},
        "offloaded_vs_resident": runs["both"]["decode_tokens_per_s"] / runs["resident"]["decode_tokens_per_s"],
    }
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out or harness.RESULTS / f"offload_gpu_{found['jax_platform']}{'_smoke' if args.smoke else ''}.json")
    harness.write_result(out, report)
    print({k: report[k] for k in ("offloaded_vs_resident", "overlap", "tokens_match_resident", "split_sweep")})
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
