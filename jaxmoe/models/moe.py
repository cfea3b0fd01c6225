"""Routing and routed-expert computation as pure functions.

Dimension letters: N tokens, D hidden, E experts, I expert intermediate, k experts per token.

An expert's weights are gate, up and down, each [I, D], intermediate-major, so that the first r*I
rows of all three are one expert's *top segment* (MoEpic's vertical split) and any segment is a
contiguous row range. An expert computes
    down^T (act(gate x) * (up x)),
which is a sum over the intermediate rows, so top(x) + bottom(x) equals the whole expert exactly.

The model holds routed experts as a sequence of E pairs `(gate_up, down)`: gate and up stacked
into one [2I, D] matrix (one product instead of two) and down as [D, I], so that both products
take the form x @ w.T, the one XLA on CPU spreads over both cores for matrices of a few MB (2 MB:
21 GB/s against 14 for w @ x or x @ w; `matvec_chain_f32` in bench/results/decode_cpu.json).
Each expert is in its own buffers. Not one stacked [E, ...] array, because decode reads a traced
selection of experts: XLA on CPU materialises a dynamic slice of a stacked array before each dot
(a full extra pass over every selected expert, 40% of a decode step on the bench model), while
`lax.switch` over separate buffers hands the chosen buffer to the dot as is.

`experts_dense` (every expert on every token, weighted by its routing coefficient) is the
definition, and on CPU also the path for many tokens; `experts_selected` (few tokens: decode)
and `experts_grouped` (many tokens on accelerators: prefill) must match it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}

Experts = Sequence[tuple[jax.Array, jax.Array]]  # E x (gate_up [2I, D], down [D, I])


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts in float32, then exact top-k; optionally renormalise the k weights.

    Returns (weights [N, k] float32, expert ids [N, k] int32). This is the order every supported
    family uses (Mixtral always renormalises; Qwen and OLMoE follow `norm_topk_prob`).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def expert_ffn(x, gate_up, down, act="silu"):
    """One expert (or a segment of one) on tokens x [N, D] or [D]; gate_up [2I, D], down [D, I]."""
    return gated(x @ gate_up.T, act) @ down.T


def gated(h, act):
    """[..., 2I] gate and up pre-activations -> act(gate) * up [..., I]."""
    i = h.shape[-1] // 2
    return ACTIVATIONS[act](h[..., :i]) * h[..., i:]


def switch_expert(index, experts: Experts, x, act="silu"):
    """x ([N, D] or [D]) through experts[index], `index` traced: a `lax.switch` with one branch per
    expert, so only the chosen expert's buffers are read, in place (no gather, no copy)."""
    return jax.lax.switch(index, [lambda v, w=w: expert_ffn(v, *w, act) for w in experts], x)


# Up to this many (token, expert) pairs are unrolled in experts_selected; more run in a scan.
SELECT_UNROLL_PAIRS = 16


def experts_selected(x, weights, ids, experts: Experts, act="silu"):
    """Few tokens: read only the selected experts, one (token, expert) pair at a time.

    Each pair is a `lax.switch` on its expert id over one branch per expert, so only the chosen
    expert's buffers are read, as stored (matrix-vector products, no gather or copy).
    """
    n, k = ids.shape

    def pair(xt, e):
        return switch_expert(e, experts, xt, act).astype(jnp.float32)

    if n * k <= SELECT_UNROLL_PAIRS:
        rows = []
        for t in range(n):
            acc = jnp.zeros(x.shape[-1:], jnp.float32)
            for j in range(k):
                acc = acc + weights[t, j] * pair(x[t], ids[t, j])
            rows.append(acc)
        return jnp.stack(rows).astype(x.dtype)

    def step(out, p):
        t, e, w = p
        return out.at[t].add(w * pair(jax.lax.dynamic_index_in_dim(x, t, keepdims=False), e)), None

    tokens = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    out, _ = jax.lax.scan(step, jnp.zeros((n, x.shape[-1]), jnp.float32),
                          (tokens, ids.reshape(-1), weights.reshape(-1).astype(jnp.float32)))
    return out.astype(x.dtype)


_CONTRACT_D = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


def experts_grouped(x, weights, ids, experts: Experts, act="silu"):
    """Many tokens: sort (token, expert) pairs by expert and run grouped matmuls (ragged dot)
    over the experts stacked for the call (a copy, small next to the matmuls at prefill sizes)."""
    n, k = ids.shape
    gate_up, down = (jnp.stack(m) for m in zip(*experts))  # [E, 2I, D], [E, D, I]
    flat_ids = ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_ids, stable=True)
    token_of = order // k
    xs = x[token_of]  # [N*k, D]
    group_sizes = jnp.bincount(flat_ids, length=len(experts)).astype(jnp.int32)
    h = jax.lax.ragged_dot_general(xs, gate_up, group_sizes, _CONTRACT_D)  # [N*k, 2I]
    ys = jax.lax.ragged_dot_general(gated(h, act), down, group_sizes, _CONTRACT_D)  # [N*k, D]
    ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    out = jnp.zeros((n, x.shape[-1]), jnp.float32).at[token_of].add(ys)
    return out.astype(x.dtype)


def experts_dense(x, weights, ids, experts: Experts, act="silu"):
    """Every expert on every token, weighted by its routing coefficient (zero where a token does not
    use it): the definition. As a path for many tokens on CPU it spends E/k times the routed FLOPs
    on plain matmuls that read each expert once; XLA's CPU ragged dot took 9x longer at prefill
    sizes (32 tokens, 8 experts)."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e, (gate_up, down) in enumerate(experts):
        coef = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1)  # [N]
        out = out + coef[:, None] * expert_ffn(x, gate_up, down, act).astype(jnp.float32)
    return out.astype(x.dtype)


def experts_auto(x, weights, ids, experts: Experts, act="silu"):
    """Pick the path by the (static) number of token-expert pairs against the expert count, and
    for many tokens by the platform the call is lowered for."""
    if ids.size < len(experts):
        return experts_selected(x, weights, ids, experts, act)
    return jax.lax.platform_dependent(
        x, weights, ids, experts,
        cpu=lambda *a: experts_dense(*a, act=act), default=lambda *a: experts_grouped(*a, act=act))


def split_expert(gate, up, down, rows: int):
    """One expert's checkpoint arrays (numpy [I, D] each) -> (top, bottom) segments, each in the
    model's layout (gate_up [2R, D], down [D, R]); top holds the first `rows` intermediate rows,
    bottom the rest (None when rows == I). expert_ffn(x, *top) + expert_ffn(x, *bottom) is the
    expert exactly."""
    def segment(rs):
        return np.ascontiguousarray(np.concatenate([gate[rs], up[rs]])), np.ascontiguousarray(down[rs].T)

    top = segment(slice(0, rows))
    return top, (segment(slice(rows, None)) if rows < gate.shape[0] else None)
