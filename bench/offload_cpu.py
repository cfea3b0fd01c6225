"""The offload runtime on CPU: the machinery's own cost, and exact traffic per policy and budget.

    python -m bench.offload_cpu [--models random100m,demo] [--tokens 48] [--repeats 3]

On a CPU, `device` and `pinned_host` are both host RAM: this measures what the runtime itself
costs (per-layer dispatch, bookkeeping, copies) and counts traffic exactly; it says nothing about
PCIe speed or overlap (bench/offload_gpu.py does). Per model: the resident engine against an
offloaded one whose cache holds every expert; then at 25% and 50% expert budgets each policy with
prefetch (and LRU without). `static` and `lcp` take their hot set and prior from the routing of
another prompt, as a schedule from `jaxmoe plan` would. Writes bench/results/offload_cpu.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from bench import harness

RANDOM_100M = dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=512, intermediate_size=1024,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6,
                   tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
POLICIES = ("lru", "lfu", "lcp", "static")
BUDGETS = (0.25, 0.5)
KV_LENGTH = 512


def prompts(engine, name: str) -> tuple[list[int], list[int]]:
    """(measured prompt, history prompt) token ids."""
    if name == "demo":
        return (engine.encode("def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n"),
                engine.encode("class Parser:\n    def __init__(self, text):\n        self.text = text\n"))
    rng = np.random.default_rng(1)
    return rng.integers(3, engine.config.vocab_size, 32).tolist(), rng.integers(3, engine.config.vocab_size, 96).tolist()


def history_plan(engine, history: list[int], fraction: float, policy: str, prefetch: bool):
    """A uniform plan whose hot sets and priors come from the routing of `history`."""
    from jaxmoe.offload import plan as planning

    c = engine.config
    base = planning.plan_from_budget(c, expert_budget=fraction, kv_length=KV_LENGTH, policy=policy, prefetch=prefetch)
    _, routing = engine.forward(np.array([history], np.int32))
    layers = []
    for p, (_, ids) in zip(base.layers, routing):
        freq = np.bincount(np.asarray(ids).reshape(-1), minlength=c.num_experts) / len(history)
        hot = tuple(int(e) for e in np.argsort(-freq, kind="stable")[: p.slots])
        layers.append(planning.LayerPlan(p.layer, p.slots, p.split_rows, hot, tuple(float(f) for f in freq)))
    return planning.OffloadPlan(tuple(layers), base.kv_length, policy, prefetch)


def run(engine, prompt: list[int], tokens: int, repeats: int) -> dict:
    keep = ("decode_tokens_per_s", "decode_tokens_per_s_runs", "ttft_s", "compile_s", "token_ids", "bytes_h2d_per_token",
            "hit_rate", "prefetch_precision", "prefetch_recall", "cache_hits", "cache_misses", "layer_paths")
    r = harness.repeat(lambda: harness.jaxmoe_generate(engine, prompt, tokens), repeats)
    return {k: r[k] for k in keep if k in r}


def bench_model(name: str, workdir: Path, tokens: int, repeats: int) -> dict:
    import jaxmoe
    from jaxmoe.engine import Engine
    from jaxmoe.offload import plan as planning
    from jaxmoe.offload.runtime import OffloadEngine

    path = (jaxmoe.resolve_model_dir(None) if name == "demo"
            else harness.build_model(name, RANDOM_100M, workdir, router_std=1.0)[1])
    resident = Engine.from_dir(path)
    prompt, history = prompts(resident, name)
    c = resident.config
    out = {"config": {"layers": c.num_layers, "experts": c.num_experts, "top_k": c.top_k, "hidden": c.hidden_size,
                      "expert_intermediate": c.moe_intermediate_size, "dtype": c.dtype, "expert_bytes": c.expert_bytes()},
           "prompt_tokens": len(prompt), "new_tokens": tokens}
    out["resident"] = run(resident, prompt, tokens, repeats)
    reference = out["resident"].pop("token_ids")
    full = OffloadEngine(c, path, planning.plan_from_budget(c, expert_budget=1.0, kv_length=KV_LENGTH))
    out["full_budget"] = run(full, prompt, tokens, repeats)
    out["full_budget_vs_resident"] = out["full_budget"]["decode_tokens_per_s"] / out["resident"]["decode_tokens_per_s"]
    exact = out["full_budget"].pop("token_ids") == reference
    del full
    rows = []
    for fraction in BUDGETS:
        for policy, prefetch in [(p, True) for p in POLICIES] + [("lru", False)]:
            plan = history_plan(resident, history, fraction, policy, prefetch)
            row = run(OffloadEngine(c, path, plan), prompt, tokens, repeats)
            exact &= row.pop("token_ids") == reference
            rows.append({"expert_budget": fraction, "policy": policy, "prefetch": prefetch,
                         "slots_per_layer": plan.layers[0].slots, **row})
    out["budgets"] = rows
    out["tokens_identical_to_resident"] = exact
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random100m,demo")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/jaxmoe-bench")
    ap.add_argument("--out", default=str(harness.RESULTS / "offload_cpu.json"))
    args = ap.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    report = {"benchmark": "offload_cpu", "machine": harness.machine(harness.probe_platform()),
              "versions": harness.versions(),
              "settings": {"tokens": args.tokens, "repeats": args.repeats, "kv_length": KV_LENGTH, "budgets": BUDGETS,
                           "policies": POLICIES, "note": "CPU: device and pinned_host are both host RAM; figures show "
                           "the runtime's overhead and exact traffic, not PCIe speed"},
              "models": {name: bench_model(name, Path(args.workdir), args.tokens, args.repeats)
                         for name in args.models.split(",")}}
    harness.write_result(args.out, report)
    for name, m in report["models"].items():
        print(f"\n{name}: resident {m['resident']['decode_tokens_per_s']:.1f} tok/s, every expert cached "
              f"{m['full_budget']['decode_tokens_per_s']:.1f} tok/s ({m['full_budget_vs_resident']:.2f}x), "
              f"tokens identical: {m['tokens_identical_to_resident']}")
        for r in m["budgets"]:
            print(f"  {r['expert_budget']:.0%} {r['policy']:6} prefetch {'on ' if r['prefetch'] else 'off'} "
                  f"{r['decode_tokens_per_s']:7.1f} tok/s {r['bytes_h2d_per_token'] / 1e6:6.2f} MB/token "
                  f"hit rate {r['hit_rate']:.3f}")
    return report


if __name__ == "__main__":
    main()
