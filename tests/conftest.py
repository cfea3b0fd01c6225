"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# The public Mixtral-8x7B-Instruct routing trace (provenance in its SOURCE.md).
MIXTRAL_TRACE = Path(__file__).parent / "data" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Family -> (transformers config class name, tiny config overrides).
TINY_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                      rope_theta=10000.0)),
    "mixtral_window": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                             sliding_window=8, rope_theta=10000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=32, intermediate_size=48,
                                         shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=3,
                                         norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=32, intermediate_size=48, num_experts=6,
                                         num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=3,
                                         mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                  norm_topk_prob=False, clip_qkv=3.0)),
}


def torch_model(family: str, seed: int = 0):
    """A tiny float32 transformers model with weights large enough to exercise every path."""
    torch = pytest.importorskip("torch")
    import transformers

    cls_name, overrides = TINY_FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (torch model, saved HF dir)."""
    out = {}
    for family in TINY_FAMILIES:
        model = torch_model(family)
        out[family] = (model, save_hf(model, tmp_path_factory.mktemp(f"hf-{family}")))
    return out


@pytest.fixture(scope="session")
def converted(hf_checkpoints, tmp_path_factory):
    """family -> converted jaxmoe checkpoint directory."""
    from jaxmoe.convert import convert

    out = {}
    for family, (_, hf_dir) in hf_checkpoints.items():
        target = tmp_path_factory.mktemp(f"jm-{family}") / "model"
        convert(hf_dir, target, progress=False)
        out[family] = target
    return out


def max_rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
