"""The Flax (NNX) decoder shared by every supported MoE family.

Dimension letters: B batch, T new tokens, S cache length, D hidden, H query heads, K key/value
heads, G = H/K query heads per key/value head, Hd head dim, V vocabulary, E experts, I expert
intermediate size, k experts per token.

The model is a pure function of its parameters and a fixed-length KV cache: `__call__` writes the
new tokens' keys and values at `start` and attends causally over the whole static cache, so
prefill (T = prompt bucket) and decode (T = 1) share one code path and never change shape.
Routed-expert computation is delegated to `MoEBlock.experts_fn`, the seam the offload runtime
uses to run experts out of a device cache instead of resident weights.

Weight layout. Every linear weight is [out, in], as PyTorch stores it, and is applied as
x @ w.T: the form XLA on CPU spreads over both cores (`matvec_chain_f32` in
bench/results/decode_cpu.json). Products that read the same input are fused into one matrix
(`FusedLinear`: attention's q/k/v, an MLP's gate/up), one product instead of several; converted
checkpoints keep Hugging Face's tensors apart, and `params_from_checkpoint` /
`checkpoint_shapes` translate between the two, in this one place.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxmoe.config import ModelConfig
from jaxmoe.models import moe as moe_ops


@struct.dataclass
class KVCache:
    # Per layer, keys [B, K, Hd, S] and values [B, K, S, Hd]: with one new token, attention sums
    # the keys over Hd rows and the values over S rows, each vectorised along the cache's minor
    # axis and read in place (see _scores).
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @staticmethod
    def key_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, config.num_kv_heads, config.head_dim, length)

    @staticmethod
    def value_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, int, int, int]:
        return (batch, config.num_kv_heads, length, config.head_dim)

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int) -> KVCache:
        def z(shape):
            return tuple(jnp.zeros(shape, config.jnp_dtype) for _ in range(config.num_layers))

        return cls(k=z(cls.key_shape(config, batch, length)), v=z(cls.value_shape(config, batch, length)))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ weight.T (+ bias), weight [out, in]."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs):
        scale = d_in**-0.5  # initial values matter only for models built without a checkpoint
        self.weight = nnx.Param(jax.random.uniform(rngs.params(), (d_out, d_in), dtype, -scale, scale))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x):
        y = x @ self.weight[...].T
        return y if self.bias is None else y + self.bias[...]


class FusedLinear(Linear):
    """Several linear layers on the same input as one product: `parts` names each layer (its name
    in the checkpoint, a sibling of this module) and its output width, in order along `out`."""

    def __init__(self, d_in: int, parts: tuple[tuple[str, int], ...], bias: bool, dtype, rngs: nnx.Rngs):
        super().__init__(d_in, sum(n for _, n in parts), bias, dtype, rngs)
        self.parts = parts

    def split(self, y):
        """The product's output [..., out] -> one array per part."""
        bounds = np.cumsum([n for _, n in self.parts])[:-1]
        return jnp.split(y, bounds, axis=-1)


def rope(x, positions, theta: float):
    """Rotary embedding, half-split convention (rotate_half), angles in float32. x: [B, T, n, Hd]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        dt, d = c.jnp_dtype, c.hidden_size
        self.c = c
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv = FusedLinear(d, (("q", q), ("k", kv), ("v", kv)), c.qkv_bias, dt, rngs)
        self.o = Linear(q, d, c.o_bias, dt, rngs)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps, dt)

    def __call__(self, x, start, k_cache, v_cache):
        """x [B, T, D]; k_cache [B, K, Hd, S], v_cache [B, K, S, Hd]; start: position of x[:, 0].
        Returns (y, k_cache, v_cache)."""
        c = self.c
        b, t, _ = x.shape
        q, k, v = self.qkv.split(self.qkv(x))
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)

        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, start))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, start, 0))

        groups = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Hd]
        scores = _scores(qg, k_cache).astype(jnp.float32) * c.head_dim**-0.5
        q_pos = start + jnp.arange(t)[:, None]  # [T, 1]
        k_pos = jnp.arange(k_cache.shape[3])[None, :]  # [1, S]
        visible = k_pos <= q_pos
        if c.sliding_window:
            visible &= q_pos - k_pos < c.sliding_window
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        y = _attend(probs, v_cache).reshape(b, t, c.num_heads * c.head_dim)
        return self.o(y), k_cache, v_cache


# One new token (decode) multiplies and sums over the caches as stored. Measured on the bench
# model's decode step (XLA on CPU, 256 / 2048 cache positions): as dots over a [B, K, S, Hd] cache,
# XLA copied every layer's cache into the dot's operand layout each step (9.5 / 15.4 ms a step);
# multiply-and-sum over that layout 8.3 / 12.7 ms; with the keys stored [B, K, Hd, S] 8.0 / 11.5.
# Many tokens (prefill) use dots.


def _scores(qg, k_cache):
    """qg [B, K, G, T, Hd], k_cache [B, K, Hd, S] -> [B, K, G, T, S]."""
    if qg.shape[3] == 1:
        return jnp.sum(qg[..., None] * k_cache[:, :, None, None, :, :], axis=4)
    return jnp.einsum("bkgth,bkhs->bkgts", qg, k_cache)


def _attend(probs, v_cache):
    """probs [B, K, G, T, S], v_cache [B, K, S, Hd] -> [B, T, K, G, Hd]."""
    if probs.shape[3] == 1:
        y = jnp.sum(probs[..., None] * v_cache[:, :, None, None, :, :], axis=4)  # [B, K, G, 1, Hd]
        return y.transpose(0, 3, 1, 2, 4)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v_cache)


class DenseMLP(nnx.Module):
    """A dense gated MLP (dense layers, Qwen's shared expert): the same function as a routed expert."""

    def __init__(self, d: int, i: int, act: str, dtype, rngs: nnx.Rngs):
        self.gate_up = FusedLinear(d, (("gate", i), ("up", i)), False, dtype, rngs)
        self.down = Linear(i, d, False, dtype, rngs)
        self.act = act

    def __call__(self, x):
        return moe_ops.expert_ffn(x, self.gate_up.weight[...], self.down.weight[...], self.act)


class Expert(nnx.Module):
    """One routed expert: gate and up stacked as `gate_up` [2I, D], and `down` [D, I] (see
    jaxmoe.models.moe). Checkpoints keep gate, up and down apart, each [I, D], the layout segments
    are cut from (see `params_from_checkpoint`)."""

    CHECKPOINT_TENSORS = ("gate", "up", "down")

    def __init__(self, d: int, i: int, dtype):
        self.gate_up = nnx.Param(jnp.zeros((2 * i, d), dtype))
        self.down = nnx.Param(jnp.zeros((d, i), dtype))

    def weights(self):
        return self.gate_up[...], self.down[...]


class MoEBlock(nnx.Module):
    """Router, routed experts (one `Expert` each) and an optional shared expert."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        dt, d, e, i = c.jnp_dtype, c.hidden_size, c.num_experts, c.moe_intermediate_size
        self.c = c
        self.router = Linear(d, e, False, dt, rngs)
        self.experts = nnx.List([Expert(d, i, dt) for _ in range(e)])
        if c.shared_expert_intermediate_size:
            self.shared = DenseMLP(d, c.shared_expert_intermediate_size, c.hidden_act, dt, rngs)
            self.shared_gate = Linear(d, 1, False, dt, rngs)

    def routing(self, x):
        """x [N, D] -> (weights [N, k] float32, ids [N, k])."""
        return moe_ops.route(self.router(x), self.c.top_k, self.c.norm_topk_prob)

    def __call__(self, x, experts_fn=None):
        """x [B, T, D] -> (y [B, T, D], (weights, ids) [B*T, k])."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, ids = self.routing(flat)
        fn = experts_fn or moe_ops.experts_auto
        y = fn(flat, weights, ids, [expert.weights() for expert in self.experts], self.c.hidden_act)
        if self.c.shared_expert_intermediate_size:
            y = y + jax.nn.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return y.reshape(b, t, d), (weights, ids)


class DecoderLayer(nnx.Module):
    def __init__(self, c: ModelConfig, layer: int, rngs: nnx.Rngs):
        dt = c.jnp_dtype
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.attn = Attention(c, rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.is_moe = c.moe_layers[layer]
        if self.is_moe:
            self.mlp = MoEBlock(c, rngs)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dt, rngs)

    def __call__(self, x, start, k_cache, v_cache, experts_fn=None):
        h, k_cache, v_cache = self.attn(self.attn_norm(x), start, k_cache, v_cache)
        x = x + h
        routing = None
        if self.is_moe:
            h, routing = self.mlp(self.mlp_norm(x), experts_fn)
        else:
            h = self.mlp(self.mlp_norm(x))
        return x + h, k_cache, v_cache, routing


class Transformer(nnx.Module):
    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        dt = c.jnp_dtype
        self.c = c
        self.embed = nnx.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(c, i, rngs) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, False, dt, rngs)

    def __call__(self, tokens, start, cache: KVCache, experts_fn=None, predict_next: bool = False):
        """tokens [B, T] at positions start.. -> (hidden [B, T, D], cache, routing).

        routing: per MoE layer, (weights [B*T, k], ids [B*T, k]). With `predict_next`, a third
        entry per MoE layer l: the experts layer l+1's router picks from layer l's post-attention
        hidden state (the offload runtime's prefetch guess), or None when l+1 is not MoE.
        """
        x = self.embed(tokens)
        ks, vs, routing = list(cache.k), list(cache.v), []
        guesses = []
        for i, layer in enumerate(self.layers):
            if predict_next and layer.is_moe:
                guesses.append(self._guess_next(i, x, start, ks[i], vs[i]))
            x, ks[i], vs[i], r = layer(x, start, ks[i], vs[i], experts_fn)
            if r is not None:
                routing.append(r)
        if predict_next:
            routing = [(w, ids, g) for (w, ids), g in zip(routing, guesses)]
        return self.final_norm(x), KVCache(k=tuple(ks), v=tuple(vs)), routing

    def _guess_next(self, i, x, start, k, v):
        """Layer i+1's router applied to layer i's post-attention hidden state."""
        if i + 1 >= len(self.layers) or not self.layers[i + 1].is_moe:
            return None
        layer, nxt = self.layers[i], self.layers[i + 1]
        h, _, _ = layer.attn(layer.attn_norm(x), start, k, v)
        x = x + h
        b, t, d = x.shape
        return nxt.mlp.routing(nxt.mlp_norm(x).reshape(b * t, d))[1]

    def output_layer(self):
        """The module that maps hidden states to logits: the LM head, or the tied embedding."""
        return self.embed if self.c.tie_word_embeddings else self.lm_head

    def logits(self, hidden):
        """hidden [..., D] (after the final norm) -> logits [..., V] in float32."""
        return project_out(self.output_layer(), hidden)


def fused_linears(model: Transformer) -> dict[str, FusedLinear]:
    """Dotted module path -> FusedLinear, for every fused product in the model."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model) if isinstance(node, FusedLinear)}


_EXPERT_GATE = re.compile(r"\.experts\.\d+\.gate$")  # a routed expert's first checkpoint tensor
_EXPERT_GATE_UP = re.compile(r"\.experts\.\d+\.gate_up$")  # ... and its first model parameter


def params_from_checkpoint(tensors: dict[str, np.ndarray], fused: dict[str, FusedLinear]) -> dict[str, np.ndarray]:
    """Checkpoint tensors (dotted path -> numpy array; any subset holding whole modules, e.g. one
    unit) -> the model's parameters: fused linears concatenated from their parts, and each routed
    expert's gate/up/down laid out by `moe.split_expert`. `fused` is `fused_linears(model)`."""
    out = dict(tensors)
    for path, linear in fused.items():
        parent = path.rpartition(".")[0]
        for leaf in ("weight", "bias"):
            names = [f"{parent}.{name}.{leaf}" for name, _ in linear.parts]
            if names[0] in out:
                out[f"{path}.{leaf}"] = np.concatenate([out.pop(n) for n in names])
    for path in [p for p in out if _EXPERT_GATE.search(p)]:
        prefix = path[: -len("gate")]
        gate, up, down = (out.pop(prefix + name) for name in Expert.CHECKPOINT_TENSORS)
        top, _ = moe_ops.split_expert(gate, up, down, rows=gate.shape[0])  # the whole expert
        out.update({prefix + "gate_up": top[0], prefix + "down": top[1]})
    return out


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted checkpoint path -> shape: the model's parameter shapes with fused linears and routed
    experts taken apart as `params_from_checkpoint` expects them."""
    model = abstract_model(config)
    _, state = nnx.split(model)
    shapes = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)):
        shapes[".".join(str(getattr(k, "key", k)) for k in keys)] = tuple(leaf.shape)
    for path, linear in fused_linears(model).items():
        parent = path.rpartition(".")[0]
        for leaf in ("weight", "bias"):
            shape = shapes.pop(f"{path}.{leaf}", None)
            if shape is not None:
                shapes.update({f"{parent}.{name}.{leaf}": (n, *shape[1:]) for name, n in linear.parts})
    for path in [p for p in shapes if _EXPERT_GATE_UP.search(p)]:
        prefix = path[: -len("gate_up")]
        two_i, d = shapes.pop(path)
        shapes.pop(prefix + "down")
        shapes.update({prefix + name: (two_i // 2, d) for name in Expert.CHECKPOINT_TENSORS})
    return shapes


def project_out(output_layer, hidden):
    if isinstance(output_layer, nnx.Embed):
        return output_layer.attend(hidden).astype(jnp.float32)
    return output_layer(hidden).astype(jnp.float32)


def abstract_model(config: ModelConfig) -> Transformer:
    """The model's structure with shape-only parameters (no memory allocated)."""
    return nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))


@functools.lru_cache(maxsize=64)  # a frozen config -> an int; tracing the model takes seconds at real sizes
def param_count(config: ModelConfig) -> int:
    _, state = nnx.split(abstract_model(config))
    return sum(int(x.size) for x in jax.tree.leaves(state))
