"""Loading a converted model and generating text with jitted prefill and decode.

The jit boundary. Two compiled functions do all device work: `prefill` runs the padded prompt
(length bucketed to a power of two, so new prompts reuse compiled code) through the model into a
fixed-length KV cache; `decode` runs one token. Both are pure functions of (graph definition,
parameter state, tokens, positions, cache), the cache is donated so XLA updates it in place, and
positions and sampling settings are traced, so nothing but a new bucket or cache length ever
compiles. The token loop stays in Python: it streams text, checks stop tokens, and dispatches
step n+1 before reading step n's token, so host work overlaps device work.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmoe import checkpoint as ckpt
from jaxmoe.config import ModelConfig
from jaxmoe.models.transformer import KVCache, abstract_model
from jaxmoe.sampling import SamplingParams, greedy, sample

MIN_BUCKET = 16
MIN_CACHE = 256
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_jax_event(name: str, seconds: float, **_) -> None:
    if name in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


def compile_clock() -> float:
    """Seconds JAX has spent tracing, lowering and compiling in this process so far."""
    return _compile_seconds[0]


class ContextLengthError(ValueError):
    pass


def next_pow2(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


@dataclasses.dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # new tokens only, a stop token included
    stop_reason: str  # "eos" | "length" | "context"
    ttft_s: float  # request start to first new token, compile excluded
    prefill_s: float
    decode_tokens_per_s: float  # steady state over the decode steps, compile excluded
    compile_s: float  # compilation done by this request (0 when all code was cached)
    prompt_bucket: int
    cache_length: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(out.pop("extra"))
        return out


def _on_leaves(fn):
    """fn(graphdef, state, ...) as fn(graphdef, treedef, leaves, ...): a step call then passes a
    flat list of arrays instead of flattening the nested parameter State every time (~0.1 ms a
    step on the demo model, a sixth of it)."""

    def on_leaves(graphdef, treedef, leaves, *args, **kwargs):
        return fn(graphdef, jax.tree.unflatten(treedef, leaves), *args, **kwargs)

    on_leaves.__name__ = fn.__name__  # names the compiled step in profiles and compile logs
    return on_leaves


def model_state(config: ModelConfig, params: dict):
    """(graph definition, parameter State) of the model, the State filled from a pure-dict tree."""
    graphdef, state = nnx.split(abstract_model(config))
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def _prefill(graphdef, state, tokens, length, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache, _ = model(tokens, 0, cache)
    last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1, keepdims=False)  # [B, D]
    return model.logits(last), cache


def _decode(graphdef, state, token, pos, cache, key, params, *, greedy_only: bool, routing: bool = False):
    """-> (next token [1], logits [1, V], cache), and with `routing` each MoE layer's expert ids."""
    model = nnx.merge(graphdef, state)
    hidden, cache, layers = model(token[:, None], pos, cache)
    logits = model.logits(hidden[:, 0])
    # The step's key is folded in here from the request's key and the position: on the host, an
    # eager fold_in is several more dispatches per token.
    nxt = greedy(logits) if greedy_only else sample(logits, jax.random.fold_in(key, pos), params)
    return (nxt, logits, cache, [ids for _, ids in layers]) if routing else (nxt, logits, cache)


def _forward(graphdef, state, tokens, cache, predict_next=False):
    model = nnx.merge(graphdef, state)
    hidden, _, routing = model(tokens, 0, cache, predict_next=predict_next)
    return model.logits(hidden), routing


class Engine:
    """A loaded model: parameters on the device, the tokenizer, and compiled step functions."""

    pipelined_decode = True  # dispatch decode step n+1 before reading step n's token

    def __init__(self, config: ModelConfig, params: dict, tokenizer=None, model_dir: Path | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.graphdef, state = model_state(config, params)
        self.state = state
        self._state_leaves, self._state_treedef = jax.tree.flatten(state)
        self._compiled: dict[tuple, Any] = {}
        self._jit_prefill = jax.jit(_on_leaves(_prefill), static_argnums=(0, 1), donate_argnums=5)
        self._jit_decode = jax.jit(_on_leaves(_decode), static_argnums=(0, 1),
                                   static_argnames=("greedy_only", "routing"), donate_argnums=5)
        self._jit_forward = jax.jit(_forward, static_argnums=0, static_argnames="predict_next")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Engine:
        model_dir = Path(model_dir)
        config = ckpt.load_config(model_dir)
        params = ckpt.load_params(model_dir, config)
        return cls(config, params, _load_tokenizer(model_dir), model_dir)

    # -- compiled functions ------------------------------------------------------------------------

    def _compiled_fn(self, key: tuple, jitted, *args, leaves=None, **static) -> Callable:
        """Compile once per key; the result takes the parameter leaves (default: the engine's
        own; others of the same tree structure may be given) and then `args`."""
        if key not in self._compiled:
            self._compiled[key] = jitted.lower(self.graphdef, self._state_treedef, leaves or self._state_leaves,
                                               *args, **static).compile()
        return self._compiled[key]

    def _step_functions(self, bucket, cache_len, greedy_only, tokens, length, cache, key, sampling):
        """(prefill, decode) for these shapes, compiled ahead of time and cached.

        prefill(tokens, length, cache) -> (logits [1, V], cache)
        decode(token, pos, cache, key, sampling) -> (next token [1], logits [1, V], cache)
        """
        prefill = self._compiled_fn(("prefill", bucket, cache_len), self._jit_prefill, tokens, length, cache)
        decode = self._compiled_fn(
            ("decode", cache_len, greedy_only), self._jit_decode,
            jnp.zeros((1,), jnp.int32), jnp.int32(0), cache, key, sampling, greedy_only=greedy_only,
        )
        leaves = self._state_leaves
        return (lambda *a: prefill(leaves, *a)), (lambda *a: decode(leaves, *a))

    def _begin_request(self) -> None:
        """Hook for engines that keep per-request state."""

    def _request_report(self, result: GenerationResult) -> dict[str, Any]:
        """Hook: engine-specific figures added to a generation result."""
        return {}

    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.zeros(self.config, batch, length)

    def forward(self, tokens: np.ndarray, predict_next: bool = False) -> tuple[np.ndarray, list]:
        """Full forward pass without a prior cache: tokens [B, T] -> (logits [B, T, V], routing).

        routing per MoE layer: (weights [B*T, k], ids [B*T, k]), plus the next layer's predicted
        ids [B*T, k] (or None) with `predict_next`; see Transformer.__call__."""
        tokens = jnp.asarray(tokens, jnp.int32)
        cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        logits, routing = self._jit_forward(self.graphdef, self.state, tokens, cache, predict_next=predict_next)
        return np.asarray(logits), jax.tree.map(np.asarray, routing)

    # -- generation --------------------------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("--chat: this model's tokenizer has no chat template")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        chat: bool = False,
        stream: Callable[[str], None] | None = None,
        return_logits: bool = False,
    ) -> GenerationResult:
        """Generate from a text prompt (or token ids). temperature 0 is greedy."""
        t_request, compiled_before = time.perf_counter(), compile_clock()
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt, chat)
        n = len(ids)
        context = self.max_context()
        if n == 0:
            raise ValueError("empty prompt")
        if n >= context:
            raise ContextLengthError(f"prompt has {n} tokens; the context is {context} tokens")
        bucket = min(next_pow2(n, MIN_BUCKET), context)
        cache_len = min(next_pow2(n + max_new_tokens, max(MIN_CACHE, bucket)), context)
        budget = min(max_new_tokens, cache_len - n)

        greedy_only = temperature <= 0
        sampling = SamplingParams.make(max(temperature, 1e-6), top_k, top_p)
        cache = self.new_cache(1, cache_len)
        tokens = jnp.asarray(np.pad(np.asarray(ids, np.int32), (0, bucket - n))[None])
        length = jnp.int32(n)
        base_key = jax.random.key(seed)
        prefill, decode = self._step_functions(bucket, cache_len, greedy_only, tokens, length, cache,
                                                          base_key, sampling)
        self._begin_request()
        t_start = time.perf_counter()

        logits, cache = prefill(tokens, length, cache)
        first = greedy(logits) if greedy_only else sample(logits, jax.random.fold_in(base_key, 0), sampling)
        out: list[int] = [int(np.asarray(first)[0])]
        t_first, compiled_first = time.perf_counter(), compile_clock()
        all_logits = [np.asarray(logits[0])] if return_logits else None
        eos = set(self.config.eos_token_ids)
        printer = _TextStream(self.tokenizer, stream)
        printer.push(out)

        stop = "eos" if out[0] in eos else None
        token, pos, queued = first, n, None

        def consume(step) -> bool:
            out.append(int(np.asarray(step[0])[0]))  # index on the host: a jax index is one more dispatch
            if return_logits:
                all_logits.append(np.asarray(step[1][0]))
            printer.push(out)
            return out[-1] in eos

        while stop is None:
            step = None
            if len(out) + (queued is not None) < budget:
                token, step_logits, cache = decode(token, np.int32(pos), cache, base_key, sampling)
                pos += 1
                step = (token, step_logits)
            if queued is not None and consume(queued):
                stop = "eos"
            # Pipelined: step n+1 is dispatched before step n's token is read, so host and device
            # overlap; an engine that syncs inside a step reads each token at once instead.
            queued = step
            if queued is None:
                break
            if not self.pipelined_decode and stop is None:
                stop = "eos" if consume(queued) else None
                queued = None
        if stop is None:
            stop = "length" if budget == max_new_tokens else "context"
        t_end, compiled_end = time.perf_counter(), compile_clock()

        decode_steps = len(out) - 1
        result = GenerationResult(
            text=printer.text(out),
            prompt_token_ids=ids,
            token_ids=out,
            stop_reason=stop,
            ttft_s=t_first - t_request - (compiled_first - compiled_before),
            prefill_s=t_first - t_start,
            decode_tokens_per_s=decode_steps / (t_end - t_first - (compiled_end - compiled_first)) if decode_steps else 0.0,
            compile_s=compiled_end - compiled_before,
            prompt_bucket=bucket,
            cache_length=cache_len,
        )
        result.extra.update(self._request_report(result))
        if return_logits:
            result.extra["logits"] = np.stack(all_logits)
        return result


class _TextStream:
    """Incremental detokenisation: emit only text that will not change with the next token.

    Each push decodes a short window, not the whole output: the tokens from `prefix` on, against
    the same window without the newest tokens (from `read` on); the difference is the new text.
    The few tokens before `read` give the tokenizer its context (a leading space, a merge), so the
    pieces add up to decoding everything at once, at a cost that does not grow with the output.
    """

    def __init__(self, tokenizer, sink: Callable[[str], None] | None):
        self.tokenizer, self.sink = tokenizer, sink
        self.prefix = self.read = 0  # token offsets: window start, end of what has been emitted

    def text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> None:
        if self.sink is None or self.tokenizer is None:
            return
        shown = self.text(ids[self.prefix : self.read])
        text = self.text(ids[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(shown):  # incomplete UTF-8, or nothing new yet
            return
        self.sink(text[len(shown) :])
        self.prefix, self.read = self.read, len(ids)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(model_dir))
