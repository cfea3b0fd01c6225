"""Qwen3-MoE (`Qwen3MoeForCausalLM`): per-head RMSNorm on q and k, no biases, no shared expert."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import ModelConfig
from jaxmoe.models import hf
from jaxmoe.models.hf import TensorSpec

ARCHITECTURE = "Qwen3MoeForCausalLM"


def config_from_hf(h: dict[str, Any], dtype: str | None = None, generation: dict | None = None) -> ModelConfig:
    if h.get("use_sliding_window"):
        raise hf.UnsupportedModelError("Qwen3-MoE with use_sliding_window=true is not supported")
    bias = bool(h.get("attention_bias", False))
    return ModelConfig(
        family="qwen3_moe",
        num_experts=hf.num_experts(h),
        top_k=h["num_experts_per_tok"],
        moe_intermediate_size=h["moe_intermediate_size"],
        intermediate_size=h.get("intermediate_size", 0),
        moe_layers=hf.sparse_layers(h),
        norm_topk_prob=bool(h.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        **hf.common_fields(h, dtype, generation),
    )


def tensor_map(c: ModelConfig) -> list[TensorSpec]:
    return hf.moe_tensor_map(c, "mlp", ("gate_proj", "up_proj", "down_proj"))


PRESETS = {
    "qwen3-30b-a3b": dict(
        architectures=[ARCHITECTURE], vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
        attention_bias=False, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151645,
    ),
}
