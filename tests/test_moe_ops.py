"""The routed-expert fast paths against their definition, on random experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.models import moe


def random_experts(rng, e, i, d):
    return [(jnp.asarray(rng.standard_normal((2 * i, d), dtype=np.float32) * 0.2),
             jnp.asarray(rng.standard_normal((d, i), dtype=np.float32) * 0.2)) for _ in range(e)]


@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (3, 16, 2), (9, 32, 2), (12, 4, 2), (5, 8, 3)])
def test_fast_paths_match_definition(n, e, k):
    """experts_selected (unrolled below SELECT_UNROLL_PAIRS pairs, scanned above) and
    experts_grouped give the definition's result (experts_dense), for any routing."""
    rng = np.random.default_rng(n * 100 + e)
    i, d = 24, 16
    experts = random_experts(rng, e, i, d)
    x = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32))
    weights, ids = moe.route(jnp.asarray(rng.standard_normal((n, e), dtype=np.float32)), k, True)
    ref = moe.experts_dense(x, weights, ids, experts)
    assert float(jnp.max(jnp.abs(ref))) > 0.1
    for fn in (moe.experts_selected, moe.experts_grouped, moe.experts_auto):
        got = jax.jit(fn)(x, weights, ids, experts)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5, err_msg=fn.__name__)


@pytest.mark.parametrize("rows", [1, 10, 24])
def test_segments_add_up_to_the_expert(rows):
    """Top rows plus bottom rows of gate, up and down give the whole expert (the offload split)."""
    rng = np.random.default_rng(rows)
    i, d = 24, 16
    gate, up, down = (rng.standard_normal((i, d), dtype=np.float32) * 0.2 for _ in range(3))
    x = jnp.asarray(rng.standard_normal((3, d), dtype=np.float32))
    top, bottom = moe.split_expert(gate, up, down, rows)
    assert top[0].shape == (2 * rows, d) and top[1].shape == (d, rows)
    split = moe.expert_ffn(x, *top) + (moe.expert_ffn(x, *bottom) if bottom is not None else 0)
    assert (bottom is None) == (rows == i)
    whole = moe.expert_ffn(x, np.concatenate([gate, up]), down.T)
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5, atol=1e-5)
