"""Routing traces: the file formats, recording on a real (tiny) model, and the statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxmoe.checkpoint import load_config
from jaxmoe.cli import main
from jaxmoe.schedules import stats
from jaxmoe.schedules import trace as tr

from conftest import MIXTRAL_TRACE as SHARED_TRACE  # noqa: E402


def _toy_trace(predicted=True) -> tr.Trace:
    """One request, 2 layers, 4 experts, top-1: layer 1 always picks (layer 0's expert + 1) mod 4."""
    first = np.array([0, 1, 0, 1, 2])
    experts = np.stack([first, (first + 1) % 4], axis=1)[:, :, None]  # [T, L, k]
    guess = np.stack([(first + 1) % 4, np.full(5, -1)], axis=1)[:, :, None]
    req = tr.Request("r0", np.arange(5), np.array([False, False, True, True, True]), experts,
                     np.ones(experts.shape), guess if predicted else None,
                     tokens=np.arange(10, 15), meta={"prompt_tokens": 2, "new_tokens": 4, "stop_reason": "length"})
    return tr.Trace((0, 1), 4, 1, [req], {"family": "toy"}, "test")


def test_native_format_round_trips(tmp_path):
    for predicted in (True, False):
        trace = _toy_trace(predicted)
        tr.write_trace(tmp_path / "t.jsonl", trace)
        head = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
        assert head["format"] == "jaxmoe-trace" and head["requests"][0]["stop_reason"] == "length"
        back = tr.read_trace(tmp_path / "t.jsonl")
        r, b = trace.requests[0], back.requests[0]
        assert (back.moe_layers, back.num_experts, back.top_k, back.model) == ((0, 1), 4, 1, {"family": "toy"})
        for f in ("positions", "decode", "experts", "weights", "tokens"):
            np.testing.assert_array_equal(getattr(b, f), getattr(r, f))
        assert b.meta == r.meta and back.has_predictions == predicted
        if predicted:
            np.testing.assert_array_equal(b.predicted, r.predicted)
        assert back.num_tokens("prefill") == 2 and back.num_tokens("decode") == 3


def test_unreadable_traces_are_refused_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(tr.TraceError, match="neither"):
        tr.read_trace(bad)
    trace = _toy_trace()
    trace.requests[0].decode = np.array([True, False, True, True, True])
    tr.write_trace(bad, trace)
    with pytest.raises(tr.TraceError, match="prefill token follows a decode token"):
        tr.read_trace(bad)
    with pytest.raises(FileNotFoundError):
        tr.read_trace(tmp_path / "missing.jsonl")


def test_reads_the_public_mixtral_trace():
    if not SHARED_TRACE.is_file():
        pytest.skip("shared trace not present")
    trace = tr.read_trace(SHARED_TRACE)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    assert [len(r.decode) for r in trace.requests] == [81, 252]  # 333 complete tokens
    assert trace.skipped_tokens == 5 and trace.num_tokens("prefill") == 0 and not trace.has_predictions
    assert np.allclose(trace.frequencies().sum(axis=1), 2.0)


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("def f(x):\n\nclass A:\n")
    assert tr.read_prompts(tmp_path / "p.txt") == ["def f(x):", "class A:"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{"prompt_ids": [5, 6]}\n')
    assert tr.read_prompts(tmp_path / "p.jsonl") == ["hi", [5, 6]]
    (tmp_path / "q.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(tr.TraceError, match="prompt"):
        tr.read_prompts(tmp_path / "q.jsonl")


def test_statistics_of_a_known_trace():
    s = stats.trace_stats(_toy_trace())
    np.testing.assert_allclose(s["popularity"][0], [0.4, 0.4, 0.2, 0.0])
    assert s["reuse"]["gap_mean"][0] == 2.0 and s["reuse"]["stack_mean"][0] == 1.0  # 0 1 0 1 2
    assert s["cross_layer"]["conditional_topk"] == [1.0]  # layer 1 is a function of layer 0
    assert s["cross_layer"]["popularity_topk"] == [pytest.approx(0.4)]
    assert s["cross_layer"]["router_guess"] == [1.0]
    assert s["eam"]["r0"] == [[2, 2, 1, 0], [0, 2, 2, 1]]
    assert s["eam_similarity"] == [[pytest.approx(1.0)]]
    text = stats.format_stats(s)
    assert "expert activation matrices" in text and "request r0: 5 tokens" in text


def test_trace_stats_cli_on_the_public_trace(tmp_path, capsys):
    if not SHARED_TRACE.is_file():
        pytest.skip("shared trace not present")
    pytest.importorskip("matplotlib")
    png = tmp_path / "pop.png"
    assert main(["trace-stats", str(SHARED_TRACE), "--json", "--png", str(png)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tokens"] == 333 and s["skipped_tokens"] == 5 and len(s["eam"]) == 2
    assert all(sum(map(sum, m)) == 32 * 2 * n for m, n in zip(s["eam"].values(), (81, 252)))
    # Layer l predicts layer l+1 better than popularity alone does (in-sample).
    assert np.mean(s["cross_layer"]["conditional_topk"]) > np.mean(s["cross_layer"]["popularity_topk"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_trace_cli_records_what_decode_processes(converted, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    ids = [[5, 9, 11, 3, 7, 21], [40, 41, 42, 43, 44, 45]]
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in ids))
    out = tmp_path / "trace.jsonl"
    assert main(["trace", str(converted["qwen3_moe"]), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    trace = tr.read_trace(out)
    config = load_config(converted["qwen3_moe"])
    assert trace.moe_layers == config.moe_layer_ids == (1, 2)  # layer 0 is dense
    assert trace.model["family"] == "qwen3_moe" and trace.has_predictions
    for prompt, r in zip(ids, trace.requests):
        # Decode processes every new token but the last; tests/test_simulator.py checks the routing
        # against a full forward and the tokens against the offload runtime's.
        assert r.tokens[: len(prompt)].tolist() == prompt and r.num_prefill == len(prompt)
        assert r.decode.sum() == r.meta["new_tokens"] - 1 == 5 and r.meta["stop_reason"] == "length"
        assert r.experts.shape == (len(r.tokens), 2, 2) and (r.predicted[:, 1] == -1).all()  # none after the last layer
        assert (r.predicted[:, 0] >= 0).all() and np.allclose(r.weights.sum(axis=-1), 1.0, atol=1e-5)  # top-k renormalised
    with pytest.raises(tr.TraceError, match="another model"):
        trace.check_model(load_config(converted["olmoe"]))
