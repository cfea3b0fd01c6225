"""PyTorch baselines and the benchmark harness (bench/torch_lru.py, bench/common.py, bench/baselines.py).

- torch_lru (expert offload with an LRU cache smaller than the experts, speculative loading on or
  off) generates exactly what plain transformers generates;
- recorded routing replays into a transformers model position by position;
- the Belady counter reproduces the trace's reference figures;
- the harness's CPU run finishes, every system produces the resident model's greedy tokens in
  both routing modes, and its JSON has the fields the GPU run reports.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import max_rel_err, torch_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
from conftest import MIXTRAL_TRACE as TRACE  # noqa: E402
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

SYSTEM_FIELDS = ("decode_tokens_per_s", "ttft_s", "bytes_h2d_per_token", "device_bytes_peak")


def _generate(model, prompt, n):
    import torch

    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.max_new_tokens, gen.min_new_tokens, gen.pad_token_id = None, False, n, n, 0
    gen.output_logits = gen.return_dict_in_generate = True
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
    tokens = out.sequences[0, len(prompt):].tolist()
    assert len(tokens) == n
    return tokens, torch.stack(out.logits).numpy()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_torch_lru_matches_transformers(family, prefetch):
    pytest.importorskip("torch")
    from torch_lru import CachedExperts, ExpertOffload

    reference = torch_model(family)
    model = copy.deepcopy(reference)
    offload = ExpertOffload(model, slots=2, device="cpu", prefetch=prefetch)  # 4 or 6 experts per layer
    assert all(isinstance(layer.mlp.experts, CachedExperts) for i, layer in enumerate(model.model.layers)
               if i in offload.layer_ids)
    prompt = [1, 5, 9, 20, 33, 7, 8, 40, 41, 3]
    want_tokens, want_logits = _generate(reference, prompt, 16)
    got_tokens, got_logits = _generate(model, prompt, 16)
    assert got_tokens == want_tokens
    assert max_rel_err(got_logits, want_logits) < 1e-4
    d = offload.decode
    assert d.tokens == 15 and d.misses > 0 and d.hits > 0  # the cache really evicts and refetches
    assert d.bytes_h2d == d.demand_bytes + d.prefetch_bytes
    assert d.demand_bytes == d.misses * offload.expert_bytes
    assert (d.prefetch_bytes > 0) == prefetch and (d.predicted > 0) == prefetch
    assert offload.prefill.misses > 0  # the prompt needs more experts than a layer holds: computed in groups


def test_torch_lru_cache_sizes_are_checked():
    pytest.importorskip("torch")
    from torch_lru import ExpertOffload

    with pytest.raises(ValueError, match="slots"):
        ExpertOffload(torch_model("mixtral"), slots=5, device="cpu")


def _trace_or_skip() -> common.RoutingTrace:
    if not TRACE.is_file():
        pytest.skip(f"no routing trace at {TRACE}")
    return common.RoutingTrace.read(TRACE)


def test_replay_router_follows_the_trace():
    torch = pytest.importorskip("torch")
    import transformers

    from torch_lru import ExpertOffload, install_replay

    trace = _trace_or_skip()
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    offload = ExpertOffload(model, slots=3, device="cpu", record_routing=True)
    clock, undo = install_replay(model, trace)
    prompt = list(range(3, 13))
    _generate(model, prompt, 6)
    assert clock.pos == len(prompt) + 5  # prefill, then one position per decode step
    for layer in offload.layer_ids:
        want = trace.layer_sequence(layer, len(prompt), 5)
        assert offload.routing[layer] == want
    undo()
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"


def test_trace_reading_and_position_mapping():
    trace = _trace_or_skip()
    assert trace.ids.shape == (333, 32, 2) and trace.skipped_tokens == 5
    ids, weights = trace.rows(layer=33, start=332, n=2)  # layer 33 -> trace layer 1; positions wrap
    np.testing.assert_array_equal(ids, trace.ids[[332, 0], 1])
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-3)


def test_belady_reproduces_the_trace_reference_figures():
    trace = _trace_or_skip()
    layers = {l: [r.tolist() for r in trace.ids[:, l]] for l in range(trace.num_layers)}
    for slots, want in ((2, 0.396), (4, 0.754), (6, 0.913)):  # SOURCE.md, cache warm with 0..C-1
        got = common.oracle_traffic(layers, slots, expert_bytes=1, warm="first")["hit_rate"]
        assert abs(got - want) < 0.01, (slots, got)


def test_belady_small_cases():
    # C=2, tokens need one expert each: a b c a b -> Belady keeps a and b after evicting for c? c evicts
    # whichever of a,b is used later (b): misses a, b, c, b -> 4 from an empty start, 2 from the best start.
    seq = [[0], [1], [2], [0], [1]]
    assert common.belady(seq, 2, warm=[]) == (1, 4)
    assert common.belady(seq, 2) == (3, 2)
    assert common.belady([[0, 1], [0, 1]], 2) == (4, 0)
    with pytest.raises(ValueError):
        common.belady([[0, 1, 2]], 2, warm=[])


def test_random_checkpoint_loads_in_both_worlds(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxmoe.convert import convert

    cfg = common.hf_config("qwen3-30b-a3b", 2, vocab_size=64, hidden_size=32, moe_intermediate_size=16,
                           intermediate_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           num_experts=4, num_experts_per_tok=2, torch_dtype="bfloat16")
    hf_dir = common.write_random_hf_checkpoint(cfg, tmp_path / "hf", seed=1)
    assert len(list(hf_dir.glob("*.safetensors"))) == 3  # one shard per layer plus embeddings and head
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.dtype == torch.bfloat16 and model.model.layers[1].mlp.experts.gate_up_proj.shape == (4, 32, 32)
    config = convert(hf_dir, tmp_path / "jm", progress=False)
    assert config.num_layers == 2 and config.dtype == "bfloat16"
    kinds = {name: kind for name, _, kind in common.checkpoint_tensors(cfg)}
    routers = {name for name, kind in kinds.items() if kind == "router"}
    assert routers == {f"model.layers.{layer}.mlp.gate.weight" for layer in range(2)}  # drawn as routers


def test_harness_cpu_run(tmp_path):
    """The whole harness on a tiny 8-expert top-2 Mixtral: 2 budgets, 2 policies, router and replay."""
    pytest.importorskip("torch")
    trace = _trace_or_skip()
    try:
        import accelerate  # noqa: F401

        systems = "reference,torch_lru,jaxmoe,accelerate"
    except ImportError:
        systems = "reference,torch_lru,jaxmoe"
    out = tmp_path / "baselines.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # Compile time dominates this run; LLVM optimisation changes speed, not results.
               XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, str(BENCH / "baselines.py"), "--device", "cpu", "--models", "tiny-mixtral",
           "--budgets", "0.25,0.5", "--policies", "lru,lcp", "--systems", systems, "--no-torch-no-prefetch",
           "--prompt-tokens", "16", "--new-tokens", "10", "--warmup-tokens", "2",
           "--replay", str(TRACE), "--out", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| model | routing | expert budget | system |" in proc.stdout  # the markdown table
    doc = json.loads(out.read_text())

    assert doc["correctness_only"] and doc["machine"]["platform"] == "cpu" and doc["machine"]["device"]
    assert doc["versions"]["jax"] and doc["versions"]["torch"]
    assert doc["h2d"]["jax"] and doc["settings"]["replay"] == str(TRACE)
    failed = [r for r in doc["records"] if r.get("status") != "ok"]
    assert not failed, failed
    expected = {"jaxmoe[lru,prefetch]", "jaxmoe[lru,no-prefetch]", "jaxmoe[lcp,prefetch]", "jaxmoe[lcp,no-prefetch]",
                "torch_lru[prefetch]"} | ({"accelerate"} if "accelerate" in systems else set())
    entries = [e for e in doc["results"] if not e.get("reference")]
    assert sorted((e["routing"], e["expert_budget"]) for e in entries) == [
        ("replay", 0.25), ("replay", 0.5), ("router", 0.25), ("router", 0.5)]
    for e in entries:
        assert e["device"] == doc["machine"]["device"] and e["model"] == "tiny-mixtral"
        assert set(e["systems"]) == expected
        for name, s in e["systems"].items():
            assert all(k in s for k in SYSTEM_FIELDS), (name, s)
            assert s["tokens_match_reference"] == s["tokens_compared"] == doc["settings"]["new_tokens"], (e["routing"], name)
        o = e["oracle"]
        assert o["bytes_per_token"] >= 0 and e["bandwidth_floor_tokens_per_s"] == o["tokens_per_s"]
        assert e["h2d_gb_per_s"] > 0 and set(e["gap_to_oracle"]) == expected
        assert "jaxmoe/torch_lru" in e["ratios"] and e["jaxmoe_best"] in expected
        # Same cache size, same policy, same routing: torch_lru moves no fewer bytes than the oracle.
        assert e["systems"]["torch_lru[prefetch]"]["bytes_h2d_per_token"] >= o["bytes_per_token"] - 1e-6
    replay = [e for e in entries if e["routing"] == "replay"]
    assert all(e["oracle"]["routing_source"].startswith("trace") for e in replay)
    refs = [e for e in doc["results"] if e.get("reference")]
    assert {e["routing"] for e in refs} == {"router", "replay"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").is_file()


def test_committed_cpu_result_is_marked_correctness_only():
    path = BENCH / "results" / "baselines_cpu_smoke.json"
    if not path.is_file():
        pytest.skip("no committed CPU smoke result")
    doc = json.loads(path.read_text())
    assert doc["correctness_only"] is True and doc["machine"]["platform"] == "cpu"
    for e in doc["results"]:
        assert e["device"] == doc["machine"]["device"] and "systems" in e
