"""Qwen2-MoE (`Qwen2MoeForCausalLM`, e.g. Qwen1.5-MoE): q/k/v biases, a shared expert scaled by a
sigmoid gate, top-k renormalised only when `norm_topk_prob`, optional dense layers."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import ModelConfig
from jaxmoe.models import hf
from jaxmoe.models.hf import TensorSpec

ARCHITECTURE = "Qwen2MoeForCausalLM"


def config_from_hf(h: dict[str, Any], dtype: str | None = None, generation: dict | None = None) -> ModelConfig:
    if h.get("use_sliding_window"):
        raise hf.UnsupportedModelError("Qwen2-MoE with use_sliding_window=true is not supported")
    return ModelConfig(
        family="qwen2_moe",
        num_experts=hf.num_experts(h),
        top_k=h["num_experts_per_tok"],
        moe_intermediate_size=h["moe_intermediate_size"],
        intermediate_size=h.get("intermediate_size", 0),
        shared_expert_intermediate_size=h.get("shared_expert_intermediate_size", 0),
        moe_layers=hf.sparse_layers(h),
        norm_topk_prob=bool(h.get("norm_topk_prob", False)),
        qkv_bias=bool(h.get("qkv_bias", True)),
        **hf.common_fields(h, dtype, generation),
    )


def tensor_map(c: ModelConfig) -> list[TensorSpec]:
    return hf.moe_tensor_map(c, "mlp", ("gate_proj", "up_proj", "down_proj"))


PRESETS = {
    "qwen1.5-moe-a2.7b": dict(
        architectures=[ARCHITECTURE], vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=151643, eos_token_id=151643,
    ),
}
