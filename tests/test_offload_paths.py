"""What the benchmarks read off the offload runtime: which path each decode step took, the
transfers it made, and the device memory settings jaxmoe applies before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

import jaxmoe
from jaxmoe import device_memory
from jaxmoe.offload import plan as planning

PROMPT = [5, 9, 20, 33, 7, 8, 40, 41, 3]


def _run(engine, n=8):
    engine.config = engine.config.replace(eos_token_ids=())
    return engine.generate(prompt_ids=PROMPT, max_new_tokens=n)


def test_fast_path_off_takes_the_round_trip_with_the_same_result(converted):
    fast = _run(jaxmoe.load(converted["mixtral"], expert_budget=1.0, kv_length=256))
    slow = _run(jaxmoe.load(converted["mixtral"], expert_budget=1.0, kv_length=256, fast_path=False))
    steps, layers = len(fast.token_ids) - 1, 2
    assert fast.extra["layer_paths"] == {"one_call_steps": steps, "resident_layer_calls": 0, "round_trip_layer_calls": 0}
    assert slow.extra["layer_paths"] == {"one_call_steps": 0, "resident_layer_calls": 0,
                                         "round_trip_layer_calls": steps * layers}
    assert slow.token_ids == fast.token_ids
    for key in ("cache_hits", "cache_misses", "bytes_h2d"):  # (the one-call step makes no prefetch guesses)
        assert slow.extra[key] == fast.extra[key], key
    assert slow.extra["bytes_h2d"] == 0


def test_transfer_log_holds_every_decode_byte(converted):
    engine = jaxmoe.load(converted["qwen2_moe"], expert_budget=0.5, split_ratio=0.5, kv_length=256)
    _run(engine)  # warm the cache and compile
    engine.transfer_log = []
    r = _run(engine)
    steps = len(r.token_ids) - 1
    logged = sum(a.nbytes for _, _, segment in engine.transfer_log for a in jax.tree.leaves(segment))
    assert logged == r.extra["bytes_h2d_per_token"] * steps > 0
    assert {step for step, _, _ in engine.transfer_log} <= set(range(steps))
    assert {layer for _, layer, _ in engine.transfer_log} <= set(engine.config.moe_layer_ids)


def test_settings_cap_the_allocator_and_only_raise_the_host_limit():
    s = device_memory.settings(20 * 2**30, 100 * 10**9, 80 * 2**30)  # XLA reads the host limit in GiB
    assert s == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2500",
                 "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "95"}
    s = device_memory.settings(100 * 2**30, 10**9, 80 * 2**30)
    assert s["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "1.0000" and s["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] == "64"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in device_memory.settings(2**30, 0, None)  # no GPU


def test_load_applies_the_settings_before_jax_starts_and_keeps_the_users(converted):
    code = f"""
import json, jaxmoe
e = jaxmoe.load({str(converted["mixtral"])!r}, expert_budget=0.5, kv_length=256)
print(json.dumps(e.generate(prompt_ids=[5, 9, 20], max_new_tokens=2).extra["device_memory"]))
from jaxmoe import device_memory
print(json.dumps(device_memory.configure(1, 1)))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_P")}
    env.update(JAX_PLATFORMS="cpu", XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB="200")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, late = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert not first["backend_already_started"]
    assert first["applied"] == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert first["user_set"] == {"XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB": "200"}
    config = jaxmoe.checkpoint.load_config(converted["mixtral"])
    plan = planning.plan_from_budget(config, expert_budget=0.5, kv_length=256)
    want = planning.footprint(config, plan)["total"] + device_memory.workspace_bytes(config, 256)
    assert first["device_limit_bytes"] == want
    assert late["backend_already_started"] and late["applied"] == {}
    assert np.isfinite(want)


def test_device_limit_counts_prefill_activations_and_stacked_experts():
    from jaxmoe.models import preset

    config = preset("mixtral-8x7b")
    attention = 4 * config.num_heads * 2048 * 2048  # one layer's float32 scores of a 2048-token prompt
    assert device_memory.workspace_bytes(config, 2048) > device_memory.SCRATCH_BYTES + attention
    half = planning.plan_from_budget(config, expert_budget=0.5)
    assert device_memory.device_limit(config, half) == (planning.footprint(config, half)["total"]
                                                        + device_memory.workspace_bytes(config, 2048))
    assert device_memory.device_limit(config, half, vram_budget=80 * 2**30) == (
        80 * 2**30 + device_memory.workspace_bytes(config, 2048))
    full = planning.plan_from_budget(config, expert_budget=1.0)
    stacked = config.num_experts * config.expert_bytes()  # a whole-cache layer's prefill on GPU
    assert (device_memory.device_limit(config, full) - device_memory.device_limit(config, full, fast_path=False)
            == stacked)


def _clean_env(**extra) -> dict[str, str]:
    """This environment without XLA memory settings, on the CPU, with `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_P", "XLA_CLIENT"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _fresh_process(code: str, **env) -> str:
    return subprocess.run([sys.executable, "-c", code], env=_clean_env(**env), capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_a_user_fraction_under_either_name_stands():
    """jaxlib refuses to start with both XLA_CLIENT_MEM_FRACTION and XLA_PYTHON_CLIENT_MEM_FRACTION."""
    code = """
import json, os
from jaxmoe import device_memory
device_memory.gpu_total_bytes = lambda: 80 * 2**30  # as if on an 80 GiB GPU
print(json.dumps([device_memory.configure(2**30, 0), os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")]))
"""
    report, fraction = json.loads(_fresh_process(code, XLA_CLIENT_MEM_FRACTION="0.5").strip().splitlines()[-1])
    assert not report["backend_already_started"] and fraction is None
    assert report["user_set"] == {"XLA_CLIENT_MEM_FRACTION": "0.5"}
    assert report["applied"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    report, fraction = json.loads(_fresh_process(code).strip().splitlines()[-1])
    assert fraction == report["applied"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.0125"


def test_cli_sets_memory_before_a_first_use_conversion_starts_jax(tmp_path):
    """`jaxmoe generate` on a model not yet converted: conversion starts JAX, so the limits must be
    set before it."""
    from jaxmoe.demo import MODEL_DIR

    proc = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "generate", str(MODEL_DIR), "--prompt", "def f(x):",
                           "--max-new-tokens", "2", "--expert-budget", "0.5", "--json"],
                          env=_clean_env(JAXMOE_CACHE=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["model_dir"].startswith(str(tmp_path))  # converted in this run
    assert not report["device_memory"]["backend_already_started"]
    assert report["device_memory"]["applied"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
