"""Peak memory of `jaxmoe convert` on a synthetic multi-GB Mixtral-shaped checkpoint.

Builds a random float32 Hugging Face checkpoint (default: hidden 1024, expert intermediate 4096,
8 experts, 8 layers, vocab 32000, about 3.5 GB in 9 shards) tensor by tensor, so building it needs
no more memory than one tensor. Then runs the converter in a child process and records its peak
resident memory two ways (psutil sampling every 20 ms, and the kernel's ru_maxrss for that child),
next to the same figures for a child that only imports jaxmoe.convert. The converter streams one
unit at a time, so its peak should sit near baseline + a few times the largest unit, not near the
checkpoint size.

    python bench/convert_memory.py                 # writes bench/results/convert_memory.json
    python bench/convert_memory.py --workdir /big/disk --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.02


# --------------------------------------------------------------------------------- synthetic model


def mixtral_tensors(a) -> list[tuple[list[str], dict[str, tuple[int, ...]]]]:
    """[(shard tensor names in order, {name: shape})], one shard for embed/norm/head and one per layer."""
    hd = a.hidden // a.heads
    outer = {"model.embed_tokens.weight": (a.vocab, a.hidden), "model.norm.weight": (a.hidden,),
             "lm_head.weight": (a.vocab, a.hidden)}
    shards = [outer]
    for layer in range(a.layers):
        p = f"model.layers.{layer}"
        t = {f"{p}.input_layernorm.weight": (a.hidden,), f"{p}.post_attention_layernorm.weight": (a.hidden,),
             f"{p}.self_attn.q_proj.weight": (a.heads * hd, a.hidden),
             f"{p}.self_attn.k_proj.weight": (a.kv_heads * hd, a.hidden),
             f"{p}.self_attn.v_proj.weight": (a.kv_heads * hd, a.hidden),
             f"{p}.self_attn.o_proj.weight": (a.hidden, a.heads * hd),
             f"{p}.block_sparse_moe.gate.weight": (a.experts, a.hidden)}
        for e in range(a.experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"] = (a.intermediate, a.hidden)
            t[f"{q}.w3.weight"] = (a.intermediate, a.hidden)
            t[f"{q}.w2.weight"] = (a.hidden, a.intermediate)
        shards.append(t)
    return [(list(t), t) for t in shards]


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """A float32 safetensors file written one tensor at a time; returns its data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= 0.02
            f.write(memoryview(a).cast("B"))
            del a
    return offset


def build_checkpoint(hf_dir: Path, a) -> dict:
    hf_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = mixtral_tensors(a)
    weight_map, total, largest = {}, 0, 0
    for i, (names, shapes) in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(hf_dir / fname, shapes, rng)
        weight_map |= dict.fromkeys(names, fname)
        largest = max(largest, max(int(np.prod(s)) * 4 for s in shapes.values()))
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=a.vocab, hidden_size=a.hidden,
        intermediate_size=a.intermediate, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads, num_local_experts=a.experts,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096,
        sliding_window=None, tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
    )
    (hf_dir / "config.json").write_text(json.dumps(config, indent=1))
    hd = a.hidden // a.heads
    expert = 3 * a.intermediate * a.hidden * 4
    layer = 4 * (2 * a.hidden + (2 * a.heads + 2 * a.kv_heads) * hd * a.hidden + a.experts * a.hidden)
    embed = a.vocab * a.hidden * 4
    head = embed + a.hidden * 4
    return dict(checkpoint_bytes=total, shards=len(shards), largest_tensor_bytes=largest,
                largest_unit_bytes=max(expert, layer, embed, head), expert_unit_bytes=expert,
                layer_unit_bytes=layer, embed_unit_bytes=embed, head_unit_bytes=head,
                units=a.layers * (a.experts + 1) + 2)


# ------------------------------------------------------------------------------------- measurement


def measure(cmd: list[str], label: str) -> dict:
    """Run `cmd`, sampling its (and its children's) RSS every 20 ms; reap it with wait4 for its ru_maxrss."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak, timeline, last_mark = 0, [], -1.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        now = time.perf_counter() - t0
        if now - last_mark >= 0.5:
            timeline.append([round(now, 2), rss])
            last_mark = now
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed with {proc.returncode}:\n{output[-4000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return dict(
        command=cmd, wall_s=round(wall, 3), psutil_peak_rss_bytes=peak, ru_maxrss_bytes=usage.ru_maxrss * 1024,
        rusage_children_maxrss_bytes=after, rusage_children_maxrss_before_bytes=before,
        peak_rss_bytes=max(peak, usage.ru_maxrss * 1024), rss_timeline=timeline, output_tail=output[-500:],
    )


def cli_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "convert", "--help"], cwd=ROOT, capture_output=True)
    return r.returncode == 0


def machine() -> dict:
    import common

    return dict(cpu=common.cpu_model(), cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
                ram_bytes=psutil.virtual_memory().total, platform=platform.platform())


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "flax", "psutil"):
        try:
            out[dist] = version(dist)
        except Exception:
            out[dist] = None
    return out


def spot_check(hf_dir: Path, out_dir: Path, a) -> list[str]:
    """The converted last expert and embedding equal the source tensors (after the documented transpose)."""
    from safetensors import safe_open

    from jaxmoe import checkpoint as ckpt

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def src(name):
        with safe_open(hf_dir / index[name], "np") as f:
            return f.get_tensor(name)

    L, E = a.layers - 1, a.experts - 1
    checked = []
    unit = ckpt.read_unit(out_dir, f"layers.{L}.experts.{E}")
    p = f"model.layers.{L}.block_sparse_moe.experts.{E}"
    for ours, theirs, t in (("gate", "w1", False), ("up", "w3", False), ("down", "w2", True)):
        ref = src(f"{p}.{theirs}.weight")
        got = unit[f"layers.{L}.mlp.experts.{E}.{ours}"]
        assert np.array_equal(got, ref.T if t else ref), ours
        checked.append(f"layers.{L}.mlp.experts.{E}.{ours}")
    assert np.array_equal(ckpt.read_unit(out_dir, "embed")["embed.embedding"], src("model.embed_tokens.weight"))
    checked.append("embed.embedding")
    assert len(ckpt.read_manifest(out_dir)["units"]) == a.layers * (a.experts + 1) + 2
    return checked


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert --dtype")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert_memory.json")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=a.workdir))
    hf_dir, out_dir = work / "hf", work / "jaxmoe"
    try:
        t = time.perf_counter()
        sizes = build_checkpoint(hf_dir, a)
        os.sync()  # flush the fresh shards now, so their writeback does not slow the timed conversion
        build_s = time.perf_counter() - t
        print(f"built {sizes['checkpoint_bytes'] / 1e9:.2f} GB in {sizes['shards']} shards ({build_s:.1f} s)", flush=True)

        baseline = measure([sys.executable, "-c", "import jaxmoe.convert"], "baseline")
        baseline_orbax = measure(
            [sys.executable, "-c",
             "import jaxmoe.convert, orbax.checkpoint as ocp; from jaxmoe import checkpoint as c; c._checkpointer()"],
            "baseline+orbax")
        if cli_available():
            entry = "python -m jaxmoe.cli convert"
            cmd = [sys.executable, "-m", "jaxmoe.cli", "convert", str(hf_dir), str(out_dir), "--quiet"]
            if a.dtype:
                cmd += ["--dtype", a.dtype]
        else:
            entry = "python -c jaxmoe.convert.convert(...)"
            code = f"from jaxmoe.convert import convert; convert({str(hf_dir)!r}, {str(out_dir)!r}, dtype={a.dtype!r}, progress=False)"
            cmd = [sys.executable, "-c", code]
        # The source is in the page cache (just written); page cache is not RSS, so peak figures are unaffected,
        # but the GB/s figure is for a warm cache.
        run = measure(cmd, "convert")
        out_bytes = dir_bytes(out_dir)
        checked = spot_check(hf_dir, out_dir, a)

        peak, base = run["peak_rss_bytes"], baseline["peak_rss_bytes"]
        gb = 1e9
        result = dict(
            benchmark="convert_memory",
            date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            machine=machine(),
            versions=versions(),
            settings=dict(hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, layers=a.layers,
                          vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads, source_dtype="float32",
                          convert_dtype=a.dtype or "float32 (checkpoint's own)", entry=entry,
                          sample_interval_s=SAMPLE_S, build_s=round(build_s, 2)),
            **sizes,
            output_bytes=out_bytes,
            peak_rss_bytes=peak,
            baseline_rss_bytes=base,
            baseline_with_orbax_rss_bytes=baseline_orbax["peak_rss_bytes"],
            peak_over_baseline_bytes=peak - base,
            peak_over_baseline_in_largest_units=round((peak - base) / sizes["largest_unit_bytes"], 2),
            peak_over_baseline_in_experts=round((peak - base) / sizes["expert_unit_bytes"], 2),
            peak_over_checkpoint=round(peak / sizes["checkpoint_bytes"], 3),
            wall_s=run["wall_s"],
            read_gb_per_s=round(sizes["checkpoint_bytes"] / gb / run["wall_s"], 3),
            spot_checked=checked,
            runs=dict(convert=run, baseline=baseline, baseline_with_orbax=baseline_orbax),
        )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=1))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
