"""Steady-state greedy decode on CPU: jaxmoe against transformers' own `generate`, same weights.

    python -m bench.decode_cpu                       # demo model, random 111M and 140M Mixtral shapes
    python -m bench.decode_cpu --models random --repeats 5

Both sides get the same weights, prompt ids and number of new tokens, greedy, no early stop; only
decode steps are timed (the n-1 steps after the first token, compile excluded). transformers runs
in four configurations (1 and 2 torch threads x its `grouped_mm` and `eager` expert code) and the
fastest is the baseline. Repeats alternate between all runners, so background load hits both
sides alike; the statistic is the median. Writes bench/results/decode_cpu.json.

Models: `demo` is the bundled model; `random` a random Mixtral shape (8 layers, hidden 512, 8
experts of intermediate 1024, top-2, the demo's 4096-token vocabulary: 111M parameters, the
layers alone 107M); `random-v32k` the same with Mixtral's 32000-token untied vocabulary (140M).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench import harness

RANDOM = dict(architectures=["MixtralForCausalLM"], vocab_size=4096, hidden_size=512, intermediate_size=1024,
              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
              num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {"demo": None, "random": RANDOM, "random-v32k": {**RANDOM, "vocab_size": 32000}}


class JaxmoeRunner:
    def __init__(self, model_dir: Path, prompt: list[int], n: int):
        from jaxmoe.engine import Engine

        self.engine, self.prompt, self.n = Engine.from_dir(model_dir), prompt, n
        self.warmup = self.once()
        self.runs = []

    def once(self) -> dict:
        return harness.jaxmoe_generate(self.engine, self.prompt, self.n)


class TransformersRunner:
    def __init__(self, hf_dir: Path, prompt: list[int], n: int, impl: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.threads, self.prompt, self.n = threads, prompt, n
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                          experts_implementation=impl).eval()
        self.warmup = self.once()
        self.runs = []

    def once(self) -> dict:
        import torch

        torch.set_num_threads(self.threads)
        return harness.torch_generate(self.model, self.prompt, self.n, "cpu")


def summary(runner) -> dict:
    tps = [r["decode_tokens_per_s"] for r in runner.runs]
    assert all(r["token_ids"] == runner.warmup["token_ids"] for r in runner.runs)
    return {"decode_tokens_per_s": statistics.median(tps), "decode_tokens_per_s_runs": tps,
            "warmup_decode_tokens_per_s": runner.warmup["decode_tokens_per_s"],
            "compile_s": runner.warmup.get("compile_s"),
            "prefill_s": statistics.median(r.get("prefill_s", r["ttft_s"]) for r in runner.runs)}


def bench_model(name: str, workdir: Path, args) -> dict:
    import jax

    import jaxmoe
    from jaxmoe import checkpoint as ckpt
    from jaxmoe.demo import MODEL_DIR

    if name == "demo":
        hf_dir, jm_dir = MODEL_DIR, jaxmoe.resolve_model_dir(None)
    else:
        hf_dir, jm_dir = harness.build_model(name, MODELS[name], workdir)
    config = ckpt.load_config(jm_dir)
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, args.prompt_tokens).tolist()
    print(f"[{name}] loading and warming up ...", flush=True)
    jm = JaxmoeRunner(jm_dir, prompt, args.new_tokens)
    hf = {f"{impl}/{t}thr": TransformersRunner(hf_dir, prompt, args.new_tokens, impl, t)
          for t in (2, 1) for impl in ("grouped_mm", "eager")}
    for r in range(args.repeats):  # interleaved
        print(f"[{name}] repeat {r + 1}/{args.repeats}", flush=True)
        for runner in (jm, *hf.values()):
            runner.runs.append(runner.once())
    theirs = {k: summary(v) for k, v in hf.items()}
    best = max(theirs, key=lambda k: theirs[k]["decode_tokens_per_s"])
    ours = summary(jm)
    return {
        "params": int(sum(x.size for x in jax.tree.leaves(jm.engine.state))),
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "jaxmoe": ours, "transformers": theirs, "transformers_baseline": best,
        "ratio": ours["decode_tokens_per_s"] / theirs[best]["decode_tokens_per_s"],
        "tokens_match": {k: harness.first_mismatch(jm.warmup["token_ids"], v.warmup["token_ids"]) is None
                         for k, v in hf.items()},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=harness.RESULTS / "decode_cpu.json")
    args = ap.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    found = harness.probe_platform()
    report = {"benchmark": "decode_cpu", "machine": harness.machine(found), "versions": harness.versions(),
              "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "statistic": "median of repeats after one warm-up, interleaved",
                           "xla_flags": os.environ.get("XLA_FLAGS")},
              "models": {}}
    with tempfile.TemporaryDirectory(prefix="decode_cpu-") as tmp:
        for name in args.models.split(","):
            if name not in MODELS:
                raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}")
            report["models"][name] = bench_model(name, Path(tmp), args)
            harness.write_result(args.out, report)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    harness.write_result(args.out, report)
    for name, m in report["models"].items():
        print(f"{name:12} {m['params'] / 1e6:6.1f}M  jaxmoe {m['jaxmoe']['decode_tokens_per_s']:7.1f} tok/s  "
              f"transformers {m['transformers'][m['transformers_baseline']]['decode_tokens_per_s']:7.1f} "
              f"({m['transformers_baseline']})  {m['ratio']:.2f}x  tokens match: {all(m['tokens_match'].values())}")
    return report


if __name__ == "__main__":
    main()
