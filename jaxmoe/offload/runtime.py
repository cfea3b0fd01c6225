"""Generation with routed experts in host memory and a planned expert cache on the device.

Design. Each layer runs as two jitted calls dispatched from Python: `attn_router` (attention,
the router, and the next layer's router applied to this layer's hidden state, which predicts
the next layer's experts) and `experts` (computes the chosen experts from cache slots).
Between them the host reads the router's choice (one small device->host sync per layer), asks the layer's `LayerController` (the same
code the trace simulator runs) what to fetch and where it goes, and issues eager `device_put`s
from `pinned_host` arrays. Eager transfers run on their own stream, so the next layer's predicted
experts move while this layer's experts and the next attention compute. Every buffer shape is
fixed by the plan before the first compile; slot numbers and expert ids are traced arrays, so a
new routing decision never recompiles. A layer whose cache holds every expert whole can never
miss: it runs as one call on its cached segments, like the resident model, with no round trip,
and its routing is accounted once the step has run. When every MoE layer's cache holds every
expert whole, a decode step is the resident model's compiled step over the cached segments: one
call, accounted after it.

Why not one jit per token with data-dependent slices of host arrays inside it: policies would
have to live in XLA (and again, differently, in the simulator), fetching "only the misses" needs
data-dependent control flow around host->device copies that XLA's GPU pipeline does not
reliably support, and a fixed number of masked fetches per layer would move bytes that a hit does
not need. The per-layer sync costs tens of microseconds on a GPU against milliseconds of
transfer per layer at any budget that offloads.

Layout. A layer with split ratio r keeps, per cached expert, its top segment (the first
R = round(r*I) intermediate rows of gate, up and down, as the model lays an expert out: gate_up
[2R, D] and down [D, R]) in one of C slots. A slot is the pair of device buffers a transfer
produced: an arriving segment replaces the slot's buffers, with no copy, and the experts call
picks slots with `lax.switch`, reading them in place (a traced slice of one stacked [C, ...]
array would be copied before every product on CPU). Whole experts are r = 1. A needed expert
whose top is cached moves only its bottom segment; a missing one moves both; the output is
top(x) + bottom(x), exactly the expert.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxmoe import checkpoint as ckpt
from jaxmoe.config import ModelConfig
from jaxmoe.engine import Engine, GenerationResult, _load_tokenizer, model_state
from jaxmoe.models.moe import expert_ffn, experts_auto, split_expert, switch_expert
from jaxmoe.models.transformer import KVCache, project_out
from jaxmoe.offload import plan as planning
from jaxmoe.offload import policies
from jaxmoe.offload.cache import Counters, build_controllers
from jaxmoe.offload.plan import OffloadPlan
from jaxmoe.sampling import greedy, sample


def memory(kind: str):
    return SingleDeviceSharding(jax.devices()[0], memory_kind=kind)


Segment = tuple[jax.Array, jax.Array]  # (gate_up [2R, D], down [D, R]), see moe.split_expert
# How a request's decode ran: steps as the resident model's one compiled call, MoE layer calls
# without the host round trip (cache holds every expert whole), and with it.
PATHS = ("one_call_steps", "resident_layer_calls", "round_trip_layer_calls")


class HostExpertStore:
    """Every routed expert in pinned host memory as (top, bottom) segments."""

    def __init__(self, model_dir: Path, config: ModelConfig, plan: OffloadPlan):
        host = memory("pinned_host")
        self.top: dict[int, list[Segment]] = {}
        self.bottom: dict[int, list[Segment | None]] = {}
        for p in plan.layers:
            tops, bottoms = [], []
            for e in range(config.num_experts):
                unit = ckpt.read_unit(model_dir, ckpt.expert_unit(p.layer, e))
                prefix = f"layers.{p.layer}.mlp.experts.{e}."
                top, bottom = split_expert(*(unit[prefix + n] for n in ("gate", "up", "down")), p.split_rows)
                tops.append(jax.device_put(top, host))
                bottoms.append(jax.device_put(bottom, host) if bottom is not None else None)
            self.top[p.layer], self.bottom[p.layer] = tops, bottoms

    def fits(self, plan: OffloadPlan) -> bool:
        """Whether this store's segments are the ones `plan` splits experts into."""
        return all(p.layer in self.top and self.top[p.layer][0][1].shape[1] == p.split_rows for p in plan.layers)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves((self.top, self.bottom)))


# -- per-layer device functions ------------------------------------------------------------------
# Graph definitions are bound with functools.partial when an engine is built (see
# `OffloadEngine._jitted`), not passed as static arguments, so no call hashes a module graph.


def _attn_router(layer_def, next_def, layer_state, next_state, x, start, k, v):
    """Attention and routing of one MoE layer, plus the next layer's router on this hidden state."""
    layer = nnx.merge(layer_def, layer_state)
    h, k, v = layer.attn(layer.attn_norm(x), start, k, v)
    x = x + h
    b, t, d = x.shape
    hn = layer.mlp_norm(x)
    weights, ids = layer.mlp.routing(hn.reshape(b * t, d))
    predicted = None
    if next_def is not None:
        nxt = nnx.merge(next_def, next_state)
        _, predicted = nxt.mlp.routing(nxt.mlp_norm(x).reshape(b * t, d))
    return x, hn, weights, ids, predicted, k, v


def _resident_layer(layer_def, layer_state, experts, x, start, k, v):
    """A whole MoE layer whose cache holds every expert whole, exactly as the resident model runs
    it: experts [E] are the cache's segments in expert order. Returns the routing for accounting."""
    def from_cache(flat, weights, ids, _placeholders, act):
        return experts_auto(flat, weights, ids, experts, act)

    x, k, v, (_, ids) = nnx.merge(layer_def, layer_state)(x, start, k, v, from_cache)
    return x, k, v, ids


def _dense_layer(layer_def, layer_state, x, start, k, v):
    x, k, v, _ = nnx.merge(layer_def, layer_state)(x, start, k, v)
    return x, k, v


def _experts(layer_def, finish, layer_state, x, hn, acc, weights, ids, valid, members, slots, bottoms, cache):
    """Add a chunk's experts, read from cache slots, to `acc`.

    members [K] expert ids (-1 pads), slots [K] their cache slots, cache: the layer's C slot
    segments, bottoms: K bottom segments (empty tuple without a split). `acc` is None for a
    layer's first chunk. With `finish`, returns the layer output instead of `acc`.
    """
    b, t, d = hn.shape
    flat = hn.reshape(b * t, d)
    token_ok = (jnp.arange(b * t) < valid)[:, None]  # padded prompt positions take no experts
    coef = jnp.sum(jnp.where((ids[:, :, None] == members[None, None, :]) & token_ok[:, :, None],
                             weights[:, :, None], 0.0), axis=1)  # [N, K]
    layer = nnx.merge(layer_def, layer_state)
    act = layer.mlp.c.hidden_act
    y = jnp.zeros(flat.shape, jnp.float32)
    for j in range(slots.shape[0]):
        yj = switch_expert(slots[j], cache, flat, act)
        if bottoms:
            yj = yj + expert_ffn(flat, *bottoms[j], act)
        y = y + coef[:, j : j + 1] * yj.astype(jnp.float32)
    acc = y if acc is None else acc + y
    if not finish:
        return acc
    y = acc.astype(x.dtype)
    if layer.mlp.c.shared_expert_intermediate_size:
        y = y + jax.nn.sigmoid(layer.mlp.shared_gate(flat)) * layer.mlp.shared(flat)
    return x + y.reshape(b, t, d)


def _embed(embed_def, embed_state, tokens):
    return nnx.merge(embed_def, embed_state)(tokens)


def _head(norm_def, out_def, norm_state, out_state, x):
    """Final norm and logits."""
    return project_out(nnx.merge(out_def, out_state), nnx.merge(norm_def, norm_state)(x))


@functools.partial(jax.jit, static_argnames="greedy_only")
def _choose(logits, key, pos, sampling, *, greedy_only: bool):
    """The next token, with the step's key folded in from the request's key as Engine's decode does."""
    return greedy(logits) if greedy_only else sample(logits, jax.random.fold_in(key, pos), sampling)


# -- engine --------------------------------------------------------------------------------------


class OffloadEngine(Engine):
    """An `Engine` whose routed experts live in host memory behind per-layer device caches."""

    # Each step already syncs per layer; reading its token at once means a step after EOS is
    # never dispatched, so no transfer is made (or counted) for a token nobody asked for.
    pipelined_decode = False

    def __init__(self, config: ModelConfig, model_dir: Path, plan: OffloadPlan, tokenizer=None,
                 store: HostExpertStore | None = None, *, fast_path: bool = True):
        self.plan = plan
        # False: every MoE layer takes the host round trip even when its cache cannot miss (the
        # overlap benchmark's compute-only run times the same path as a budget that offloads).
        self.fast_path = fast_path
        self.policy = policies.get(plan.policy)
        if plan.policy in policies.ORACLE:
            raise ValueError(f"policy {plan.policy!r} needs the future; it exists only in the simulator")
        planning.check_policy(plan)
        params = ckpt.load_params(model_dir, config, experts=False)
        empty = jnp.zeros((0, config.hidden_size), config.jnp_dtype)
        for layer in config.moe_layer_ids:  # routed experts stay on the host; placeholders keep the tree
            params["layers"][layer]["mlp"]["experts"] = {
                e: {"gate_up": empty, "down": empty} for e in range(config.num_experts)}
        super().__init__(config, params, tokenizer, model_dir)
        if store is not None and not store.fits(plan):
            raise ValueError("the given host expert store was split for another plan")
        self.store = store or HostExpertStore(model_dir, config, plan)

        model = nnx.merge(self.graphdef, self.state)
        self.layer_defs = [nnx.split(layer) for layer in model.layers]
        self._jit_cache: dict[tuple, Any] = {}
        embed_def, embed_state = nnx.split(model.embed)
        self._embed = functools.partial(self._jitted(_embed, embed_def), embed_state)
        norm_def, norm_state = nnx.split(model.final_norm)
        out_def, out_state = nnx.split(model.output_layer())
        self._head = functools.partial(self._jitted(_head, norm_def, out_def), norm_state, out_state)
        self.counters = Counters()
        self.controllers = build_controllers(config, plan, self.policy, self.counters)
        device = memory("device")
        self.caches: dict[int, list[Segment]] = {}  # per layer, the segment in each slot
        self._zero_bottom: dict[int, Segment] = {}
        for p in plan.layers:
            slot_expert = self.controllers[p.layer].cache.slot_expert
            self.caches[p.layer] = [jax.device_put(self.store.top[p.layer][e], device) for e in slot_expert]
            bottom_rows = config.moe_intermediate_size - p.split_rows
            d = config.hidden_size
            self._zero_bottom[p.layer] = tuple(jnp.zeros(shape, config.jnp_dtype)
                                               for shape in ((2 * bottom_rows, d), (d, bottom_rows)))
        self.next_moe = {l: l + 1 for l in config.moe_layer_ids if l + 1 in self.controllers}
        # Layers whose cache holds every expert whole never transfer or evict: they run in one call
        # on the cached segments without waiting for the router, and are accounted after the step.
        self._resident_experts = {
            p.layer: tuple(self.caches[p.layer][self.controllers[p.layer].cache.slot_of(e)]
                           for e in range(config.num_experts))
            for p in plan.layers if p.slots >= config.num_experts and p.split_rows == config.moe_intermediate_size}
        self._layer_fns = [self._bind_layer(l) for l in range(config.num_layers)]
        # Every expert of every MoE layer cached whole: the model's parameters with the cached
        # segments in the experts' places, for the one-call decode step (same tree as self.state).
        self._cached_model_leaves = None
        if len(self._resident_experts) == len(self.controllers):
            for l, segments in self._resident_experts.items():
                params["layers"][l]["mlp"]["experts"] = {
                    e: {"gate_up": gate_up, "down": down} for e, (gate_up, down) in enumerate(segments)}
            leaves, treedef = jax.tree.flatten(model_state(config, params)[1])
            assert treedef == self._state_treedef
            self._cached_model_leaves = leaves
        self._inflight_tops: dict[int, dict[int, Segment]] = {l: {} for l in self.controllers}
        self._inflight_bottoms: dict[int, dict[int, Segment]] = {l: {} for l in self.controllers}
        self._predicted: dict[int, list[int]] = {}
        self._now = 0
        # Optional hooks that make every system follow one recorded routing in benchmarks:
        # route_override(layer, position, tokens) -> (expert ids [tokens, k], weights [tokens, k])
        # replaces the router's choice for the tokens at positions position.. of the request;
        # predict_override(layer, position) -> expert ids replaces the prefetch guess for `layer`.
        self.route_override = None
        self.predict_override = None
        self._request_now = 0
        self._paths = dict.fromkeys(PATHS, 0)  # this request's decode steps and layer calls by path
        self._decode_step: int | None = None  # the request's decode step, None during prefill
        # A list to record every decode transfer as (decode step, layer, pinned-host segment), so a
        # benchmark can replay exactly these copies with nothing else running; None records nothing.
        self.transfer_log: list | None = None
        self.device_memory: dict | None = None  # what jaxmoe.load set for JAX's memory (device_memory.configure)
        self._request_start: dict[str, int] = {}
        self._prefill_counters: dict[str, int] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path, plan: OffloadPlan | None = None, store: HostExpertStore | None = None,
                 fast_path: bool = True, **budget) -> OffloadEngine:
        model_dir = Path(model_dir)
        config = ckpt.load_config(model_dir)
        plan = plan or planning.plan_from_budget(config, **budget)
        return cls(config, model_dir, plan, _load_tokenizer(model_dir), store, fast_path=fast_path)

    def max_context(self) -> int:
        return min(self.config.max_position_embeddings, self.plan.kv_length)

    # -- the layer loop ----------------------------------------------------------------------------

    def _jitted(self, fn, *static, donate: tuple[int, ...] = ()):
        """`fn` with its leading static arguments bound, jitted once per distinct binding in this
        engine (layers with equal structure share compiled code). Held by the engine, so compiled
        code and the graph definitions it binds go when the engine does."""
        key = (fn, static, donate)
        if key not in self._jit_cache:
            self._jit_cache[key] = jax.jit(functools.partial(fn, *static), donate_argnums=donate)
        return self._jit_cache[key]

    def _bind_layer(self, l: int) -> dict:
        """Layer l's device functions with its parameters bound: only activations, caches and
        small index arrays are passed per call."""
        layer_def, layer_state = self.layer_defs[l]
        if l not in self.controllers:
            return {"dense": functools.partial(self._jitted(_dense_layer, layer_def, donate=(3, 4)), layer_state)}
        fns = {"attn": functools.partial(self._jitted(_attn_router, layer_def, None, donate=(4, 5)), layer_state, None)}
        nl = self.next_moe.get(l)
        if nl is not None:
            next_def, next_state = self.layer_defs[nl]
            fns["attn_predict"] = functools.partial(self._jitted(_attn_router, layer_def, next_def, donate=(4, 5)),
                                                    layer_state, next_state)
        for finish in (False, True):
            fns[finish] = functools.partial(self._jitted(_experts, layer_def, finish, donate=(3,)), layer_state)
        if l in self._resident_experts:
            fns["resident"] = functools.partial(self._jitted(_resident_layer, layer_def, donate=(4, 5)), layer_state,
                                                self._resident_experts[l])
        return fns

    def _runs_resident(self, l: int, decoding: bool) -> bool:
        """Whether layer l can skip the host round trip: every expert cached whole, routing not
        replayed, and no prefetch guess for a next layer that could miss."""
        if not self.fast_path or l not in self._resident_experts or self.route_override is not None:
            return False
        nl = self.next_moe.get(l) if decoding and self.plan.prefetch else None
        return nl is None or nl in self._resident_experts

    def _fetch(self, segment: Segment, layer: int) -> Segment:
        if self.transfer_log is not None and self._decode_step is not None:
            self.transfer_log.append((self._decode_step, layer, segment))
        return jax.device_put(segment, memory("device"))

    def _run_chunks(self, l, x, hn, weights, ids, valid, chunks):
        store, k = self.store, self.config.top_k
        inflight_tops, inflight_bottoms = self._inflight_tops[l], self._inflight_bottoms[l]
        fns, acc = self._layer_fns[l], None
        for i, chunk in enumerate(chunks):
            for e, slot in chunk.top_fetches:  # an arrived segment becomes its slot's buffers
                self.caches[l][slot] = inflight_tops.pop(e) if e in inflight_tops else self._fetch(store.top[l][e], l)
            bottoms = ()
            if store.bottom[l][0] is not None:
                bottoms = tuple(self._fetch(store.bottom[l][e], l) if e in chunk.bottom_fetches else inflight_bottoms.pop(e)
                                for e in chunk.members)
                bottoms += (self._zero_bottom[l],) * (k - len(bottoms))
            members = np.array(chunk.members + [-1] * (k - len(chunk.members)), np.int32)
            slots = np.array(chunk.slots + [0] * (k - len(chunk.slots)), np.int32)
            acc = fns[i == len(chunks) - 1](x, hn, acc, weights, ids, valid, members, slots, bottoms,
                                            tuple(self.caches[l]))
        inflight_tops.clear()
        inflight_bottoms.clear()
        return acc  # the layer output after the last chunk

    def _layers(self, x, start, kv: KVCache, valid: int, decoding: bool):
        ks, vs = list(kv.k), list(kv.v)
        unaccounted = []  # (layer, ids) of layers run without a host round trip
        for l, fns in enumerate(self._layer_fns):
            if "dense" in fns:
                x, ks[l], vs[l] = fns["dense"](x, start, ks[l], vs[l])
                continue
            if self._runs_resident(l, decoding):
                x, ks[l], vs[l], ids = fns["resident"](x, start, ks[l], vs[l])
                unaccounted.append((l, ids))
                self._paths["resident_layer_calls"] += decoding
                continue
            self._paths["round_trip_layer_calls"] += decoding
            nl = self.next_moe.get(l) if decoding and self.plan.prefetch else None
            attn = fns["attn_predict"] if nl is not None else fns["attn"]
            x_attn, hn, weights, ids, predicted, ks[l], vs[l] = attn(x, start, ks[l], vs[l])
            chosen = np.asarray(ids)[:valid]  # the one host sync of the layer
            if self.route_override is not None:  # replay recorded routing instead of the router's
                chosen, forced_w = self.route_override(l, self._now - self._request_now, valid)
                pad = ids.shape[0] - valid
                ids = jnp.asarray(np.pad(chosen, ((0, pad), (0, 0))), jnp.int32)
                weights = jnp.asarray(np.pad(forced_w, ((0, pad), (0, 0))), jnp.float32)
            ctl = self.controllers[l]
            if l in self._predicted:
                ctl.score_prediction(self._predicted.pop(l), chosen[0].tolist())
            chunks = ctl.step([row.tolist() for row in chosen], self._now)
            # Demand transfers and the experts go first; the next layer's guess queues behind
            # them on the copy stream and moves while these experts compute.
            x = self._run_chunks(l, x_attn, hn, weights, ids, np.int32(valid), chunks)
            if nl is not None:
                guess = np.asarray(predicted)[0].tolist()
                if self.predict_override is not None:
                    guess = [int(e) for e in self.predict_override(nl, self._now - self._request_now)]
                self._predicted[nl] = guess
                tops, bottoms = self.controllers[nl].prefetch(guess, self._now)
                for e, _ in tops:
                    self._inflight_tops[nl][e] = self._fetch(self.store.top[nl][e], nl)
                for e in bottoms:
                    self._inflight_bottoms[nl][e] = self._fetch(self.store.bottom[nl][e], nl)
        for l, ids in unaccounted:
            self._account(l, ids, valid)
        self._now += valid
        return x, KVCache(k=tuple(ks), v=tuple(vs))

    def _account(self, l: int, ids, valid: int) -> None:
        """The bookkeeping of a round trip, for layer l run without one, once the step has run."""
        chosen = np.asarray(ids)[:valid]
        if l in self._predicted:
            self.controllers[l].score_prediction(self._predicted.pop(l), chosen[0].tolist())
        self.controllers[l].step([row.tolist() for row in chosen], self._now)

    def _decodes_in_one_call(self) -> bool:
        """Whether a decode step can be the resident model's step over the cached segments."""
        return self._cached_model_leaves is not None and all(
            self._runs_resident(l, True) for l in self.controllers)

    # -- Engine hooks --------------------------------------------------------------------------------

    def _step_functions(self, bucket, cache_len, greedy_only, tokens, length, cache, key, sampling):
        if cache_len > self.plan.kv_length:
            raise ValueError(f"this request needs a KV cache of {cache_len} tokens; the plan reserves {self.plan.kv_length}")
        def prefill(tokens, length, cache):
            n = int(length)
            x, cache = self._layers(self._embed(tokens), np.int32(0), cache, n, decoding=False)
            self._prefill_counters = self.counters.snapshot()
            return self._head(x[:, n - 1]), cache

        def decode(token, pos, cache, key, sampling):
            self.counters.tokens += 1
            self._decode_step = 0 if self._decode_step is None else self._decode_step + 1
            if self._decodes_in_one_call():
                self._paths["one_call_steps"] += 1
                step = self._compiled_fn(("decode-cached", cache_len, greedy_only), self._jit_decode, token, pos, cache,
                                         key, sampling, leaves=self._cached_model_leaves,
                                         greedy_only=greedy_only, routing=True)
                token, logits, cache, routing = step(self._cached_model_leaves, token, pos, cache, key, sampling)
                for l, ids in zip(self.config.moe_layer_ids, routing):
                    self._account(l, ids, 1)
                self._now += 1
                return token, logits, cache
            x, cache = self._layers(self._embed(token[:, None]), pos, cache, 1, decoding=True)
            logits = self._head(x[:, 0])
            return _choose(logits, key, pos, sampling, greedy_only=greedy_only), logits, cache

        return prefill, decode  # compiled lazily; generate() clocks compilation as it happens

    def _begin_request(self) -> None:
        for ctl in self.controllers.values():
            ctl.cache.new_request()
        self._predicted.clear()
        self._paths = dict.fromkeys(PATHS, 0)
        self._decode_step = None
        self._request_start = self.counters.snapshot()
        self._request_now = self._now

    def _request_report(self, result: GenerationResult) -> dict[str, Any]:
        now = self.counters.snapshot()
        start, prefill = self._request_start, self._prefill_counters or self._request_start
        decode = {k: now[k] - prefill[k] for k in now}
        pre = {k: prefill[k] - start[k] for k in now}
        tokens = max(decode["tokens"], 1)
        device = jax.devices()[0]
        stats = device.memory_stats() or {}
        planned = planning.footprint(self.config, self.plan)
        return {
            "cache_hits": decode["hits"],
            "cache_misses": decode["misses"],
            "hit_rate": decode["hits"] / max(decode["hits"] + decode["misses"], 1),
            "bytes_h2d": decode["bytes_h2d"] + pre["bytes_h2d"],
            "bytes_h2d_per_token": decode["bytes_h2d"] / tokens,
            "prefill_bytes_h2d": pre["bytes_h2d"],
            "prefill_cache_hits": pre["hits"],
            "prefill_cache_misses": pre["misses"],
            "prefetch_bytes": decode["prefetch_bytes"],
            "prefetch_hits": decode["prefetch_hits"],
            "prefetch_precision": decode["predicted_used"] / max(decode["predicted"], 1),
            "prefetch_recall": decode["predicted_used"] / max(decode["predicted_needed"], 1),
            "device_bytes_peak": int(stats.get("peak_bytes_in_use", planned["total"])),
            "device_bytes_peak_source": "measured" if "peak_bytes_in_use" in stats else "planned",
            "device_bytes_planned": planned,
            "offload": self.plan.to_json(self.config),
            "layer_paths": dict(self._paths),
            "device_memory": self.device_memory,
        }
