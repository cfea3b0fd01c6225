"""Model configuration: one frozen dataclass for every supported MoE family.

Families differ in a handful of switches (attention biases, q/k norms, routing normalisation,
shared experts, dense layers); those switches live here so the Flax model in
`jaxmoe.models.transformer` is written once. Each family's `jaxmoe.models.<family>` module turns
a Hugging Face `config.json` into a `ModelConfig` and names the checkpoint's tensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # a key of jaxmoe.models.FAMILIES
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # Hd
    num_experts: int  # E
    top_k: int
    moe_intermediate_size: int  # I, per routed expert
    intermediate_size: int = 0  # dense MLP of non-MoE layers
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to one
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (per-head RMSNorm, Qwen3) | "full" (over all heads, OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    dtype: str = "float32"  # weight and activation dtype; routing and softmax run in float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, moe in enumerate(self.moe_layers) if moe)

    def expert_bytes(self) -> int:
        """Bytes of one routed expert (gate, up and down matrices)."""
        return 3 * self.hidden_size * self.moe_intermediate_size * jnp.dtype(self.jnp_dtype).itemsize

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["moe_layers"] = list(self.moe_layers)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(json.loads(Path(path).read_text()))
