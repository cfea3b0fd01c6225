"""The benchmark harness and its PyTorch baselines (bench/).

- torch_lru (expert offload with an LRU cache smaller than the experts, speculative loading on or
  off) generates exactly what plain transformers generates;
- recorded routing replays into a transformers model position by position;
- the oracle reproduces the public trace's reference figures;
- every system gets the same expert byte budget; GPU scripts refuse to time JAX on the CPU;
- the baselines' CPU run finishes with every system producing the resident model's tokens;
- the overlap ablation's three runs take the same per-layer path and copy the same bytes;
- the README's results section is exactly what the committed JSON renders.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import harness, report
from conftest import MIXTRAL_TRACE, max_rel_err, torch_model

# Compile time dominates the CPU runs; LLVM optimisation changes speed, not results.
FAST_ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")


def _generate(model, prompt, n):
    import torch

    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.max_new_tokens, gen.min_new_tokens, gen.pad_token_id = None, False, n, n, 0
    gen.output_logits = gen.return_dict_in_generate = True
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits).numpy()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_torch_lru_matches_transformers(family, prefetch):
    pytest.importorskip("torch")
    from bench.torch_lru import CachedExperts, ExpertOffload

    reference = torch_model(family)
    model = copy.deepcopy(reference)
    offload = ExpertOffload(model, slots=2, device="cpu", prefetch=prefetch)  # of 4 or 6 experts per layer
    assert all(isinstance(model.model.layers[i].mlp.experts, CachedExperts) for i in offload.layer_ids)
    prompt = [1, 5, 9, 20, 33, 7, 8, 40, 41, 3]
    want_tokens, want_logits = _generate(reference, prompt, 16)
    got_tokens, got_logits = _generate(model, prompt, 16)
    assert got_tokens == want_tokens
    assert max_rel_err(got_logits, want_logits) < 1e-4
    d = offload.decode
    assert d.tokens == 15 and d.misses > 0 and d.hits > 0  # the cache really evicts and refetches
    assert d.bytes_h2d == d.demand_bytes + d.prefetch_bytes and d.demand_bytes == d.misses * offload.expert_bytes
    assert (d.prefetch_bytes > 0) == prefetch and (offload.report()["prefetch_precision"] is not None) == prefetch
    assert offload.prefill.misses > 0  # the prompt needs more experts than a layer holds: computed in groups


def test_replay_follows_the_trace_in_transformers():
    torch = pytest.importorskip("torch")
    import transformers

    from bench.torch_lru import ExpertOffload, install_replay

    replay = harness.Replay(MIXTRAL_TRACE)
    assert replay.ids.shape == (333, 32, 2) and replay.num_tokens == 333
    ids, weights = replay.rows(layer=33, start=332, n=2)  # layer 33 -> trace layer 1; positions wrap
    np.testing.assert_array_equal(ids, replay.ids[[332, 0], 1])
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-3)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    offload = ExpertOffload(model, slots=3, device="cpu", record_routing=True)
    clock, undo = install_replay(model, replay)
    prompt = list(range(3, 13))
    _generate(model, prompt, 6)
    assert clock.pos == len(prompt) + 5  # prefill, then one position per decode step
    assert offload.routing == replay.decode_routing(offload.layer_ids, len(prompt), 5)
    undo()
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"


def test_oracle_reproduces_the_trace_reference_figures():
    from jaxmoe.models import preset

    config = preset("mixtral-8x7b")
    replay = harness.Replay(MIXTRAL_TRACE)
    routing = replay.decode_routing(range(32), 0, replay.num_tokens)
    for slots, want in ((2, 0.396), (4, 0.754), (6, 0.913)):  # SOURCE.md, cache warm with 0..C-1
        assert abs(harness.oracle(routing, config, slots)["hit_rate"] - want) < 0.01, slots


def test_random_checkpoint_loads_in_both_worlds(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxmoe.convert import convert

    cfg = harness.hf_config("qwen3-30b-a3b", 2, vocab_size=64, hidden_size=32, moe_intermediate_size=16,
                            intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, torch_dtype="bfloat16")
    hf_dir = harness.write_random_hf_checkpoint(cfg, tmp_path / "hf", seed=1)
    assert len(list(hf_dir.glob("*.safetensors"))) == 3  # one shard per layer plus embeddings and head
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.dtype == torch.bfloat16 and model.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 32, 32)
    assert convert(hf_dir, tmp_path / "jm", progress=False).dtype == "bfloat16"
    routers = {name for name, _, kind in harness.checkpoint_tensors(cfg) if kind == "router"}
    assert routers == {f"model.layers.{layer}.mlp.gate.weight" for layer in range(2)}


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_every_system_gets_the_same_expert_bytes(preset, fraction):
    from bench.baselines import GPU_MODELS, equal_budgets
    from jaxmoe.offload import plan as planning

    config = harness.jaxmoe_config(harness.hf_config(preset, GPU_MODELS[preset][1]))
    b = equal_budgets(config, fraction, 256)
    total = len(config.moe_layer_ids) * config.num_experts * config.expert_bytes()
    cache = b["expert_cache_bytes"]
    assert cache["jaxmoe"] == cache["torch_lru"] == cache["accelerate"] <= fraction * total
    assert cache["jaxmoe"] > (fraction - 1 / config.num_experts) * total  # the budget is used, not undercut
    # accelerate's device limit holds the non-expert weights and the same expert bytes: no KV cache or
    # transfer buffers of jaxmoe's footprint on top
    assert b["accelerate_max_memory"] == planning.resident_bytes(config) + cache["accelerate"]
    assert b["accelerate_max_memory"] < b["jaxmoe_footprint"]["total"]


def test_gpu_run_refuses_jax_on_the_cpu(capsys):
    cpu = {"jax_platform": "cpu", "jax_device_kind": "cpu", "torch_device": None}
    with pytest.raises(SystemExit) as exc:
        harness.require_platform("gpu", cpu)
    assert exc.value.code == 2 and "pip install '.[cuda]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        harness.require_platform("gpu", {**cpu, "jax_platform": "gpu"}, torch_too=True)
    harness.require_platform("cpu", cpu)
    found = harness.probe_platform(FAST_ENV)
    assert found["jax_platform"] == "cpu" and harness.machine(found)["platform"] == "cpu"


def test_baselines_cpu_run(tmp_path):
    """The whole harness on a tiny 8-expert top-2 Mixtral: 2 budgets, router and replayed routing."""
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    out = tmp_path / "baselines.json"
    cmd = [sys.executable, "-m", "bench.baselines", "--device", "cpu", "--models", "tiny-mixtral",
           "--budgets", "0.25,0.5", "--variants", "lcp:no-prefetch", "--out", str(out), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=FAST_ENV, cwd=harness.ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["correctness_only"] and doc["machine"]["platform"] == "cpu" and not doc["problems"]
    assert doc["settings"]["headline"] == "jaxmoe[lru,prefetch]" and doc["code"]["commit"]
    assert sorted((e["routing"], e["expert_budget"]) for e in doc["results"]) == [
        ("replay", 0.25), ("replay", 0.5), ("router", 0.25), ("router", 0.5)]
    for e in doc["results"]:
        assert set(e["systems"]) == {"jaxmoe[lru,prefetch]", "jaxmoe[lcp,no-prefetch]", "torch_lru[prefetch]",
                                     "accelerate"}
        for name, s in e["systems"].items():
            assert s["first_token_mismatch"] is None, (e["routing"], name)
            assert s["decode_tokens_per_s"] > 0 and "bytes_h2d_per_token" in s
        assert e["ratios"]["jaxmoe[lru,prefetch]/torch_lru[prefetch]"] > 0
        assert e["systems"]["accelerate"]["expert_bytes_on_device"] <= e["expert_cache_bytes"]["accelerate"]
        # Same cache size, same routing: LRU moves no fewer bytes than the oracle.
        assert e["systems"]["torch_lru[prefetch]"]["bytes_h2d_per_token"] >= e["oracle"]["bytes_per_token"] - 1e-6


def test_overlap_ablation_runs_share_one_path(tmp_path):
    """offload_gpu --smoke on the CPU: both, compute-only and copy-only time the same per-layer path."""
    out = tmp_path / "offload.json"
    cmd = [sys.executable, "-m", "bench.offload_gpu", "--smoke", "--layers", "2", "--tokens", "8", "--repeats", "1",
           "--out", str(out), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=FAST_ENV, cwd=harness.ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["platform"] == "cpu" and all(doc["tokens_match_resident"].values())
    steps = doc["settings"]["new_tokens"] - 1
    for name in ("both", "compute_only"):
        paths = doc["paths"][name]
        assert paths["one_call_steps"] == 0 and paths["resident_layer_calls"] == 0, name
        assert paths["round_trip_layer_calls"] == steps * doc["settings"]["layers"], name
    assert doc["decode"]["both"]["bytes_h2d_per_token"] > 0 == doc["decode"]["compute_only"]["bytes_h2d_per_token"]
    assert doc["copy_only"]["bytes_per_token"] == doc["decode"]["both"]["bytes_h2d_per_token"]
    assert set(doc["split_sweep"]) == {"0.25", "0.5", "0.75", "1"}


def test_readme_results_are_the_committed_json():
    assert report.readme_section(report.README.read_text()) == report.render(), \
        "README.md's results differ from bench/results/*.json: run `python -m bench.report`"
