"""OLMoE (`OlmoeForCausalLM`): RMSNorm on the whole q and k projections (not per head), optional
q/k/v clipping, top-k renormalised only when `norm_topk_prob`."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import ModelConfig
from jaxmoe.models import hf
from jaxmoe.models.hf import TensorSpec

ARCHITECTURE = "OlmoeForCausalLM"


def config_from_hf(h: dict[str, Any], dtype: str | None = None, generation: dict | None = None) -> ModelConfig:
    bias = bool(h.get("attention_bias", False))
    return ModelConfig(
        family="olmoe",
        num_experts=hf.num_experts(h),
        top_k=h["num_experts_per_tok"],
        moe_intermediate_size=h["intermediate_size"],
        norm_topk_prob=bool(h.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=h.get("clip_qkv"),
        **hf.common_fields(h, dtype, generation),
    )


def tensor_map(c: ModelConfig) -> list[TensorSpec]:
    return hf.moe_tensor_map(c, "mlp", ("gate_proj", "up_proj", "down_proj"))


PRESETS = {
    "olmoe-1b-7b": dict(
        architectures=[ARCHITECTURE], vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=None, eos_token_id=50279,
    ),
}
