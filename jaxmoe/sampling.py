"""Next-token choice: greedy, or temperature with top-k then top-p filtering (as transformers
applies them). Settings are traced values, so changing them never recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # > 0
    top_k: jax.Array  # 0 disables
    top_p: jax.Array  # 1.0 disables

    @classmethod
    def make(cls, temperature: float, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> [B]; ties go to the lowest id, as torch.argmax does."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, p: SamplingParams) -> jax.Array:
    """logits [B, V] float32 -> token ids [B]. The sort that top-k and top-p need is skipped when
    neither is set (a cond on the traced settings: a full-vocabulary sort per token otherwise)."""
    scaled = logits / p.temperature
    filtered = (p.top_k > 0) | (p.top_p < 1.0)
    return jax.lax.cond(filtered, _sample_filtered, _sample_plain, scaled, key, p)


def _sample_plain(scaled, key, p):
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _sample_filtered(scaled, key, p):
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V], descending
    rank = jnp.arange(vocab)
    keep = (p.top_k <= 0) | (rank < p.top_k)
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < p.top_p) | (rank == 0)
    ranked = jnp.where(keep, ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)  # index into the ranking
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
