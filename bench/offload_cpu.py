"""Offload runtime on CPU: the machinery's own overhead, and traffic per policy and budget.

    python bench/offload_cpu.py [--models random100m demo] [--tokens 48] [--repeats 3]

On a CPU, `device` and `pinned_host` are both host RAM, so this measures what the runtime itself
costs (per-layer dispatch, bookkeeping, copies) and counts traffic exactly; it says nothing about
PCIe speed or overlap (bench/offload_gpu.py does, on a GPU). For each model:
- resident decode against offloaded decode at a budget that holds every expert (goal >= 0.8x);
- at 25% and 50% expert budgets, for each policy with prefetch on (and LRU with prefetch off):
  tokens/s, bytes moved per token, hit rate, prefetch precision/recall.
`static` and `lcp` get their hot set and prior from the routing of a different prompt (a history),
as the planner would. Writes bench/results/offload_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import jaxmoe  # noqa: E402
from jaxmoe.engine import Engine  # noqa: E402
from jaxmoe.offload import plan as planning  # noqa: E402
from jaxmoe.offload.runtime import OffloadEngine  # noqa: E402

RANDOM_100M = dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=512, intermediate_size=1024,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6,
                   tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
POLICIES = ("lru", "lfu", "lcp", "static")
BUDGETS = (0.25, 0.5)
KV_LENGTH = 512


def model_dir(name: str, workdir: Path) -> Path:
    if name == "demo":
        return jaxmoe.resolve_model_dir(None)
    if name == "random100m":
        return common.build_model(name, RANDOM_100M, workdir, router_std=1.0).jaxmoe_dir
    raise ValueError(f"unknown model {name!r}")


def prompts(engine: Engine, name: str) -> tuple[list[int], list[int]]:
    """(measured prompt, history prompt) token ids."""
    if name == "demo":
        return (engine.encode("def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n"),
                engine.encode("class Parser:\n    def __init__(self, text):\n        self.text = text\n"))
    rng = np.random.default_rng(1)
    return rng.integers(3, engine.config.vocab_size, 32).tolist(), rng.integers(3, engine.config.vocab_size, 96).tolist()


def history_plan(engine: Engine, history: list[int], fraction: float, policy: str, prefetch: bool) -> planning.OffloadPlan:
    """A uniform plan whose hot sets and priors come from the routing of `history`."""
    c = engine.config
    base = planning.plan_from_budget(c, expert_budget=fraction, kv_length=KV_LENGTH, policy=policy, prefetch=prefetch)
    _, routing = engine.forward(np.array([history], np.int32))
    layers = []
    for p, (_, ids) in zip(base.layers, routing):
        freq = np.bincount(np.asarray(ids).reshape(-1), minlength=c.num_experts) / len(history)
        hot = tuple(int(e) for e in np.argsort(-freq, kind="stable")[: p.slots])
        layers.append(planning.LayerPlan(p.layer, p.slots, p.split_rows, hot, tuple(float(f) for f in freq)))
    return planning.OffloadPlan(tuple(layers), base.kv_length, policy, prefetch)


def run(engine, prompt, tokens, repeats) -> tuple[dict, list[int]]:
    engine.generate(prompt_ids=prompt, max_new_tokens=tokens)  # compile and warm the cache
    runs = [engine.generate(prompt_ids=prompt, max_new_tokens=tokens) for _ in range(repeats)]
    best = sorted(runs, key=lambda r: r.decode_tokens_per_s)[len(runs) // 2]
    out = {"decode_tokens_per_s": best.decode_tokens_per_s, "ttft_s": best.ttft_s}
    for key in ("bytes_h2d_per_token", "hit_rate", "prefetch_precision", "prefetch_recall", "cache_hits",
                "cache_misses"):
        if key in best.extra:
            out[key] = best.extra[key]
    return out, best.token_ids


def bench_model(name: str, workdir: Path, tokens: int, repeats: int) -> dict:
    path = model_dir(name, workdir)
    resident = Engine.from_dir(path)
    resident.config = resident.config.replace(eos_token_ids=())  # fixed length: never stop early
    prompt, history = prompts(resident, name)
    c = resident.config
    result = {"config": {"layers": c.num_layers, "experts": c.num_experts, "top_k": c.top_k,
                         "hidden": c.hidden_size, "expert_intermediate": c.moe_intermediate_size, "dtype": c.dtype,
                         "expert_bytes": c.expert_bytes()},
              "prompt_tokens": len(prompt), "new_tokens": tokens}
    result["resident"], ref_tokens = run(resident, prompt, tokens, repeats)
    full = OffloadEngine(c, path, planning.plan_from_budget(c, expert_budget=1.0, kv_length=KV_LENGTH))
    result["full_budget"], full_tokens = run(full, prompt, tokens, repeats)
    result["full_budget_vs_resident"] = (result["full_budget"]["decode_tokens_per_s"]
                                         / result["resident"]["decode_tokens_per_s"])
    del full
    exact = full_tokens == ref_tokens
    rows = []
    for fraction in BUDGETS:
        for policy, prefetch in [(p, True) for p in POLICIES] + [("lru", False)]:
            plan = history_plan(resident, history, fraction, policy, prefetch)
            engine = OffloadEngine(c, path, plan)
            row, got = run(engine, prompt, tokens, repeats)
            exact &= got == ref_tokens
            rows.append({"expert_budget": fraction, "policy": policy, "prefetch": prefetch,
                         "slots_per_layer": plan.layers[0].slots, **row})
            del engine
    result["budgets"] = rows
    result["tokens_identical_to_resident"] = exact
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["random100m", "demo"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/jaxmoe-bench")
    ap.add_argument("--out", default=str(common.RESULTS / "offload_cpu.json"))
    args = ap.parse_args(argv)
    report = {"benchmark": "offload_cpu", "machine": common.machine_info("cpu"), "versions": common.versions(),
              "settings": {"tokens": args.tokens, "repeats": args.repeats, "kv_length": KV_LENGTH,
                           "budgets": BUDGETS, "policies": POLICIES, "note": "CPU: device and pinned_host are both host "
                           "RAM; figures show the runtime's overhead and exact traffic, not PCIe speed"},
              "models": {name: bench_model(name, Path(args.workdir), args.tokens, args.repeats) for name in args.models}}
    common.write_json(args.out, report)
    for name, m in report["models"].items():
        print(f"\n{name}: resident {m['resident']['decode_tokens_per_s']:.1f} tok/s, full budget "
              f"{m['full_budget']['decode_tokens_per_s']:.1f} tok/s ({m['full_budget_vs_resident']:.2f}x), "
              f"tokens identical: {m['tokens_identical_to_resident']}")
        print("| budget | policy | prefetch | tok/s | MB/token | hit rate | precision | recall |")
        print("|---|---|---|---|---|---|---|---|")
        for r in m["budgets"]:
            print(f"| {r['expert_budget']:.0%} | {r['policy']} | {'on' if r['prefetch'] else 'off'} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['bytes_h2d_per_token'] / 1e6:.2f} | {r['hit_rate']:.3f} | "
                  f"{r['prefetch_precision']:.2f} | {r['prefetch_recall']:.2f} |")
    return report


if __name__ == "__main__":
    main()
