"""The `jaxmoe` command end to end on the bundled demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxmoe.demo import MODEL_DIR


def run_cli(*args, cache, check=True):
    env = {**os.environ, "JAXMOE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "jaxmoe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jaxmoe-cache")


@pytest.fixture(scope="module")
def demo_run(cache):
    proc = run_cli("generate", "--prompt", "def parse(self, text):", "--max-new-tokens", "24", "--json", cache=cache)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_demo_generates_and_reports_json(demo_run):
    proc, out = demo_run
    for key in ("text", "prompt_token_ids", "token_ids", "ttft_s", "decode_tokens_per_s", "compile_s"):
        assert key in out
    assert len(out["token_ids"]) >= 1 and out["text"]
    assert proc.stdout.startswith(out["text"][:10])  # streamed before the JSON line
    assert out["decode_tokens_per_s"] > 0 and out["compile_s"] > 0


def test_prompt_tokenisation_is_transformers(demo_run):
    from transformers import AutoTokenizer

    _, out = demo_run
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert out["prompt_token_ids"] == tok("def parse(self, text):")["input_ids"]
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)


def test_offloaded_demo_gives_the_same_tokens(demo_run, cache):
    _, resident = demo_run
    proc = run_cli("generate", "--prompt", "def parse(self, text):", "--max-new-tokens", "24", "--json",
                   "--expert-budget", "0.25", "--policy", "lcp", "--split-ratio", "0.5", cache=cache)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == resident["token_ids"]
    for key in ("cache_hits", "cache_misses", "bytes_h2d", "bytes_h2d_per_token", "prefetch_precision",
                "prefetch_recall", "device_bytes_peak", "offload"):
        assert key in out
    assert out["offload"]["policy"] == "lcp" and out["bytes_h2d"] > 0


def test_budget_below_minimum_fails_cleanly(cache):
    proc = run_cli("generate", "--prompt", "x", "--vram-budget", "1KiB", cache=cache, check=False)
    assert proc.returncode == 2 and "minimum" in proc.stderr and "Traceback" not in proc.stderr


def test_static_policy_without_a_schedule_fails_cleanly(cache):
    proc = run_cli("generate", "--prompt", "x", "--expert-budget", "0.5", "--policy", "static", cache=cache, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxmoe: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "needs a schedule from `jaxmoe plan`" in errors[0]


def test_unsupported_architecture_lists_supported(tmp_path, cache):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    proc = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "out"), cache=cache, check=False)
    assert proc.returncode == 2
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        assert arch in proc.stderr
    assert not (tmp_path / "out").exists()
