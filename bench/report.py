"""The README's results section, rendered from the committed JSON in bench/results/.

    python -m bench.report          # rewrite the section between the README's results markers

Every figure the README reports comes from here; tests/test_bench.py fails when the README and
the JSON disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import harness

README = harness.ROOT / "README.md"
BEGIN = "<!-- results: rendered by `python -m bench.report` from bench/results/*.json; do not edit -->"
END = "<!-- end of results -->"


def _load(name: str) -> dict | None:
    path = harness.RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    return f"{m['device']}, {m['cpu_count']} cores, jax {v['jax']}" + (f", torch {v['torch']}" if v.get("torch") else "")


def gpu_section() -> list[str]:
    docs = [d for d in (_load("offload_gpu_gpu.json"), _load("baselines_gpu.json")) if d]
    if not docs:
        return ["**No GPU figure has been measured yet.** `bash bench/gpu.sh` runs every GPU benchmark in one "
                "command (about 9 minutes on one H100)."]
    out = []
    off = _load("offload_gpu_gpu.json")
    if off:
        s, d, o = off["settings"], off["decode"], off["overlap"]
        out += [f"Offload on {_machine(off)} (`bench/offload_gpu.py`): {s['preset']} shapes, {s['layers']} of "
                f"{s['full_layers']} layers, {s['dtype']}, {s['expert_budget']:.0%} expert budget: "
                f"{d['both']['decode_tokens_per_s']:.1f} tok/s against {d['resident']['decode_tokens_per_s']:.1f} resident; "
                f"per token: both {1e3 * o['both_s_per_token']:.2f} ms, compute only {1e3 * o['compute_only_s_per_token']:.2f} ms, "
                f"copy only {1e3 * o['copy_only_s_per_token']:.2f} ms.", ""]
    base = _load("baselines_gpu.json")
    if base:
        out += [f"Against PyTorch offloading on {_machine(base)} (`bench/baselines.py`), headline "
                f"`{base['settings']['headline']}`, router routing:", "",
                "| model | expert budget | jaxmoe tok/s | torch_lru tok/s | accelerate tok/s | jaxmoe / torch_lru |",
                "|---|---|---|---|---|---|"]
        for e in base["results"]:
            if e["routing"] != "router":
                continue
            s = e["systems"]
            tps = [s.get(k, {}).get("decode_tokens_per_s") for k in (e["headline"], "torch_lru[prefetch]", "accelerate")]
            ratio = e["ratios"][f"{e['headline']}/torch_lru[prefetch]"]
            out.append(f"| {e['model']} | {e['expert_budget']:.0%} | "
                       + " | ".join("-" if t is None else f"{t:.2f}" for t in tps)
                       + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return out


def cpu_section() -> list[str]:
    out = []
    dec = _load("decode_cpu.json")
    if dec:
        out += [f"Decode on CPU against transformers (`bench/decode_cpu.py`; {_machine(dec)}; batch 1, greedy, "
                f"{dec['settings']['new_tokens']} new tokens, median of {dec['settings']['repeats']}; transformers in "
                f"its fastest setting; tokens identical; other jobs shared the machine, load average "
                f"{dec['machine']['load_average'][0]:.1f} at the start and {dec['load_average_end'][0]:.1f} at the end, "
                "which slows both sides and torch at 2 threads most):", "",
                "| model | params | jaxmoe tok/s | transformers tok/s | ratio |", "|---|---|---|---|---|"]
        for name, m in dec["models"].items():
            out.append(f"| {name} | {m['params'] / 1e6:.1f}M | {m['jaxmoe']['decode_tokens_per_s']:.1f} | "
                       f"{m['transformers'][m['transformers_baseline']]['decode_tokens_per_s']:.1f} | {m['ratio']:.2f}x |")
        out.append("")
    off = _load("offload_cpu.json")
    if off:
        parts = [f"{name} {m['full_budget_vs_resident']:.2f}x" for name, m in off["models"].items()]
        out += ["Offload runtime on CPU (`bench/offload_cpu.py`; device and host memory are the same RAM here, so "
                "this is the runtime's own cost; load average "
                f"{off['machine']['load_average'][0]:.1f} at the start, so run-to-run noise is large): every expert "
                "cached, against the resident engine: " + ", ".join(parts) + ".", ""]
    sim = _load("simulate_mixtral_trace.json")
    if sim:
        out += [f"Cache hit rates replaying the public Mixtral-8x7B routing trace ({sim['decode_tokens']} decode tokens; "
                "`bench/trace_policies.py`; whole experts, no prefetch):", "",
                "| expert budget | LRU | LFU | LCP | static | Belady (oracle) |", "|---|---|---|---|---|---|"]
        for budget in ("0.5", "0.75"):
            rows = {r["policy"]: r["hit_rate"] for r in sim["results"][budget]}
            out.append(f"| {float(budget):.0%} | " + " | ".join(f"{rows[p]:.3f}" for p in
                                                               ("lru", "lfu", "lcp", "static", "belady")) + " |")
        out.append("")
    conv = _load("convert_memory.json")
    if conv:
        out += [f"Conversion of a {conv['checkpoint_bytes'] / 1e9:.2f} GB checkpoint (`bench/convert_memory.py`) peaks at "
                f"{conv['peak_rss_bytes'] / 1e6:.0f} MB resident, {conv['peak_over_baseline_bytes'] / 1e6:.0f} MB above "
                f"the interpreter's {conv['baseline_rss_bytes'] / 1e6:.0f} MB: "
                f"{conv['peak_over_baseline_in_largest_units']:.1f} times its largest unit.", ""]
    smoke = _load("baselines_cpu.json")
    if smoke:
        ok = all(s.get("first_token_mismatch", 0) is None for e in smoke["results"] for s in e["systems"].values())
        out += [f"The GPU baseline harness on CPU (`bench/baselines.py --device cpu`, tiny models, correctness only): "
                f"every system {'produced' if ok else 'did NOT produce'} the resident model's tokens.", ""]
    return out


def render() -> str:
    return "\n".join([BEGIN, "", *gpu_section(), "", *cpu_section(), END])


def readme_section(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError("README.md has no results markers")
    return text[text.index(BEGIN): text.index(END) + len(END)]


def main() -> None:
    text = README.read_text()
    README.write_text(text.replace(readme_section(text), render()))
    print(f"rewrote the results section of {README}")


if __name__ == "__main__":
    sys.exit(main())
