"""Generation behaviour: sampling settings, stopping, buckets, context limits."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.engine import ContextLengthError, Engine


@pytest.fixture(scope="module")
def engine(converted):
    return Engine.from_dir(converted["qwen2_moe"])


PROMPT = [5, 17, 33, 8, 61, 42, 9]


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate(prompt_ids=PROMPT, max_new_tokens=10).token_ids
    assert engine.generate(prompt_ids=PROMPT, max_new_tokens=10, temperature=1.0, top_k=1, seed=3).token_ids == greedy
    assert engine.generate(prompt_ids=PROMPT, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=4).token_ids == greedy


def test_sampling_is_reproducible_by_seed(engine):
    a = engine.generate(prompt_ids=PROMPT, max_new_tokens=12, temperature=2.0, seed=7).token_ids
    b = engine.generate(prompt_ids=PROMPT, max_new_tokens=12, temperature=2.0, seed=7).token_ids
    others = {tuple(engine.generate(prompt_ids=PROMPT, max_new_tokens=12, temperature=2.0, seed=s).token_ids)
              for s in range(8, 12)}
    assert a == b and len(others | {tuple(a)}) > 1


def test_stops_at_eos_and_keeps_it(converted):
    engine = Engine.from_dir(converted["mixtral"])
    engine.config = engine.config.replace(eos_token_ids=())
    free = engine.generate(prompt_ids=PROMPT, max_new_tokens=8).token_ids
    stop = free[3]
    engine.config = engine.config.replace(eos_token_ids=(stop,))
    out = engine.generate(prompt_ids=PROMPT, max_new_tokens=8)
    assert out.stop_reason == "eos" and out.token_ids == free[: free.index(stop) + 1]


def test_prompts_in_one_bucket_reuse_compiled_code(engine):
    engine.generate(prompt_ids=PROMPT, max_new_tokens=4)
    again = engine.generate(prompt_ids=PROMPT + [3, 4, 5], max_new_tokens=4)
    assert again.prompt_bucket == 16 and again.compile_s == 0.0


def test_prompt_longer_than_context_is_refused(engine):
    context = engine.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"context is {context} tokens"):
        engine.generate(prompt_ids=[5] * (context + 1), max_new_tokens=4)


def test_generation_is_clipped_at_the_context_end(engine):
    context = engine.config.max_position_embeddings
    out = engine.generate(prompt_ids=[5] * (context - 3), max_new_tokens=10)
    assert out.stop_reason in ("context", "eos") and len(out.token_ids) <= 3


def test_sampler_respects_top_k_support():
    import jax
    import jax.numpy as jnp

    from jaxmoe.sampling import SamplingParams, sample

    logits = jnp.asarray(np.log(np.array([[0.1, 0.4, 0.3, 0.2]])), jnp.float32)
    draws = {int(sample(logits, jax.random.key(s), SamplingParams.make(1.0, top_k=2))[0]) for s in range(64)}
    assert draws == {1, 2}
    draws = {int(sample(logits, jax.random.key(s), SamplingParams.make(1.0, top_p=0.65))[0]) for s in range(64)}
    assert draws == {1, 2}


def test_unfiltered_sampling_follows_the_softmax():
    """Without top-k or top-p the sampler skips the sort; draws still follow softmax(logits / T)."""
    import jax
    import jax.numpy as jnp

    from jaxmoe.sampling import SamplingParams, sample

    probs = np.array([0.1, 0.4, 0.3, 0.2])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    draw = jax.jit(lambda k: sample(logits, k, SamplingParams.make(1.0)))
    counts = np.bincount([int(draw(jax.random.key(s))[0]) for s in range(2000)], minlength=4) / 2000
    np.testing.assert_allclose(counts, probs, atol=0.04)


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "# héllo wörld ✓ 你好\n"])
def test_streamed_text_adds_up_to_the_result(prompt):
    """The streamed pieces (each decoded from a short window of tokens) concatenate to the text
    decoded from all tokens at once, multi-byte characters included."""
    from jaxmoe import resolve_model_dir

    engine = Engine.from_dir(resolve_model_dir(None))
    pieces = []
    result = engine.generate(prompt, max_new_tokens=160, temperature=1.5, seed=11, stream=pieces.append)
    assert len(pieces) > 10
    assert "".join(pieces) == result.text
