"""Peak memory of `jaxmoe convert` on a multi-GB Mixtral-shaped checkpoint: conversion streams unit
by unit, so its peak should sit near the interpreter's baseline plus a few units, not near the
checkpoint's size.

    python -m bench.convert_memory              # hidden 1024, 8 layers of 8 experts (intermediate 4096),
                                                # vocabulary 32000, float32: 3.6 GB in 9 shards

The random source checkpoint is written a tensor at a time (bench/harness.py). The conversion runs
in a child process and its peak resident memory is the kernel's `ru_maxrss` for that child
(os.wait4), next to a child that only imports jaxmoe.convert. Writes
bench/results/convert_memory.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import harness


# Linux carries a process's memory high-water mark across exec, so a child forked from this
# (large) process would report this process's size: a small launcher spawns the measured command.
_LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); "
             "_, status, usage = os.wait4(pid, 0); print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))")


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of a command, from the kernel's accounting."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=harness.ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak, status = (int(x) for x in proc.stdout.split()[-2:])
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return peak, wall


def unit_bytes(c) -> dict[str, int]:
    """Bytes of the units conversion handles one at a time."""
    itemsize = np.dtype(c.jnp_dtype).itemsize
    d, hd = c.hidden_size, c.head_dim
    attention = d * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * d
    return {"expert": c.expert_bytes(), "embed": c.vocab_size * d * itemsize,
            "head": (c.vocab_size * d + d) * itemsize,
            "layer": (attention + 2 * d + c.num_experts * d) * itemsize}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=harness.RESULTS / "convert_memory.json")
    args = ap.parse_args(argv)
    config = harness.hf_config("mixtral-8x7b", args.layers, hidden_size=1024, intermediate_size=4096,
                               num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000,
                               torch_dtype="float32")
    c = harness.jaxmoe_config(config)
    work = Path(tempfile.mkdtemp(prefix="convert-memory-", dir=args.workdir))
    try:
        t = time.perf_counter()
        hf_dir = harness.write_random_hf_checkpoint(config, work / "hf")
        os.sync()  # the fresh shards' writeback must not slow the timed conversion
        build_s = time.perf_counter() - t
        source = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        baseline, _ = peak_rss([sys.executable, "-c", "import jaxmoe.convert"])
        peak, wall = peak_rss([sys.executable, "-m", "jaxmoe.cli", "convert", str(hf_dir), str(work / "jm"), "--quiet"])
        units = unit_bytes(c)
        largest = max(units.values())
        report = {
            "benchmark": "convert_memory", "machine": harness.machine({"jax_platform": "cpu", "jax_device_kind": "cpu"}),
            "versions": harness.versions(),
            "settings": {"hidden": c.hidden_size, "expert_intermediate": c.moe_intermediate_size,
                         "experts": c.num_experts, "layers": c.num_layers, "vocab": c.vocab_size, "dtype": c.dtype,
                         "shards": len(list(hf_dir.glob("*.safetensors"))), "build_s": build_s},
            "checkpoint_bytes": source, "unit_bytes": units, "largest_unit_bytes": largest,
            "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "peak_over_baseline_bytes": peak - baseline,
            "peak_over_baseline_in_largest_units": (peak - baseline) / largest,
            "peak_over_checkpoint": peak / source, "convert_s": wall, "read_gb_per_s": source / wall / 1e9,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    harness.write_result(args.out, report)
    print(f"{source / 1e9:.2f} GB converted in {wall:.1f} s; peak {peak / 1e6:.0f} MB, baseline {baseline / 1e6:.0f} MB: "
          f"{(peak - baseline) / largest:.2f} x the largest unit ({largest / 1e6:.0f} MB) above it")
    return report


if __name__ == "__main__":
    main()
