"""Mixtral (`MixtralForCausalLM`): softmax -> top-k -> renormalise; no shared expert."""

from __future__ import annotations

from typing import Any

from jaxmoe.config import ModelConfig
from jaxmoe.models import hf
from jaxmoe.models.hf import TensorSpec

ARCHITECTURE = "MixtralForCausalLM"


def config_from_hf(h: dict[str, Any], dtype: str | None = None, generation: dict | None = None) -> ModelConfig:
    return ModelConfig(
        family="mixtral",
        num_experts=hf.num_experts(h),
        top_k=h["num_experts_per_tok"],
        moe_intermediate_size=h["intermediate_size"],
        norm_topk_prob=True,
        sliding_window=h.get("sliding_window"),
        **hf.common_fields(h, dtype, generation),
    )


def tensor_map(c: ModelConfig) -> list[TensorSpec]:
    return hf.moe_tensor_map(c, "block_sparse_moe", ("w1", "w3", "w2"))


PRESETS = {
    "mixtral-8x7b": dict(
        architectures=[ARCHITECTURE], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
        sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
    ),
}
