"""A PyTorch expert-offload baseline in the style of Mixtral-offloading (Eliseev & Mazur, 2023).

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)   # on the host
    offload = ExpertOffload(model, slots=4, device="cuda", prefetch=True)        # model now runs on cuda
    model.generate(...)
    offload.decode.snapshot()  # hits, misses, bytes moved ...

For the transformers families whose experts are one fused module (`mlp.experts.gate_up_proj`,
`down_proj`: Mixtral, Qwen2/3-MoE, OLMoE): routed experts stay in pinned host memory, each MoE
layer gets a device cache of C slots with LRU eviction, copies run on a side CUDA stream guarded
by per-slot events, and while decoding the next layer's router guesses its experts from this
layer's hidden state and starts copying the missing ones (as jaxmoe does). On a CPU the same code
runs with plain copies, so it is tested for exactness against transformers anywhere. Method:
bench/README.md.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Routers whose top-k weights stay float32 (Mixtral's); the others cast them to the hidden dtype.
FLOAT32_SCORES = ("MixtralTopKRouter",)


@dataclasses.dataclass
class Counters:
    """Traffic and cache counters of one phase (prefill or decode)."""

    tokens: int = 0  # forward steps (decode) or prompt tokens (prefill)
    hits: int = 0
    misses: int = 0
    bytes_h2d: int = 0  # demand + prefetch
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    prefetch_hits: int = 0  # needed experts that a prefetch brought in
    predicted: int = 0  # experts guessed for the next layer, over decode steps with a guess
    predicted_used: int = 0  # ... of which the layer used
    predicted_needed: int = 0  # experts those layers used (recall's denominator)
    needed: int = 0

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ExpertStore:
    """One layer's routed experts in (pinned, on CUDA) host memory: gate_up [E, 2I, D], down [E, D, I]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, pin: bool):
        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if not pin:
                return t.cpu().contiguous()
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t)
            return out

        self.gate_up, self.down = host(gate_up), host(down)
        self.expert_bytes = (self.gate_up[0].numel() + self.down[0].numel()) * self.gate_up.element_size()

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


class LayerCache:
    """C device slots of one layer with LRU order; slot events guard reuse across streams."""

    def __init__(self, store: ExpertStore, slots: int, device: torch.device):
        e, two_i, d = store.gate_up.shape
        self.store, self.slots, self.device = store, slots, device
        self.gate_up = torch.empty((slots, two_i, d), dtype=store.gate_up.dtype, device=device)  # [C, 2I, D]
        self.down = torch.empty((slots, d, two_i // 2), dtype=store.down.dtype, device=device)  # [C, D, I]
        self.slot_of: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.ready: list = [None] * slots  # copy into the slot done
        self.released: list = [None] * slots  # compute reading the slot done
        for slot in range(min(slots, store.num_experts)):  # warm with experts 0..C-1, as jaxmoe does
            self.gate_up[slot].copy_(store.gate_up[slot])
            self.down[slot].copy_(store.down[slot])
            self.slot_of[slot] = slot
            self.lru[slot] = None

    def __contains__(self, expert: int) -> bool:
        return expert in self.slot_of

    def touch(self, expert: int) -> None:
        self.lru.move_to_end(expert)

    def load(self, expert: int, protected: set[int], stream) -> int:
        """Copy `expert` into a free slot or the LRU expert's slot (never one in `protected`)."""
        if len(self.slot_of) < self.slots:
            slot = next(s for s in range(self.slots) if s not in self.slot_of.values())
        else:
            victim = next((e for e in self.lru if e not in protected), None)
            if victim is None:
                raise RuntimeError(f"all {self.slots} slots hold experts needed now")
            slot = self.slot_of.pop(victim)
            del self.lru[victim]
        if stream is None:
            self.gate_up[slot].copy_(self.store.gate_up[expert])
            self.down[slot].copy_(self.store.down[expert])
        else:
            with torch.cuda.stream(stream):
                if self.released[slot] is not None:
                    stream.wait_event(self.released[slot])
                self.gate_up[slot].copy_(self.store.gate_up[expert], non_blocking=True)
                self.down[slot].copy_(self.store.down[expert], non_blocking=True)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(stream)
        self.slot_of[expert] = slot
        self.lru[expert] = None
        return slot

    def acquire(self, expert: int) -> int:
        """The expert's slot, with the compute stream ordered after its copy."""
        slot = self.slot_of[expert]
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        return slot

    def release(self, slot: int) -> None:
        if self.device.type == "cuda":
            self.released[slot] = torch.cuda.Event()
            self.released[slot].record(torch.cuda.current_stream(self.device))


class CachedExperts(nn.Module):
    """Drop-in for a transformers experts module: computes the chosen experts from a `LayerCache`."""

    def __init__(self, layer: int, runtime: ExpertOffload, act_fn: Callable):
        super().__init__()
        self.layer, self.act_fn = layer, act_fn
        self._runtime = [runtime]  # a list keeps the runtime out of the module tree

    @property
    def runtime(self) -> ExpertOffload:
        return self._runtime[0]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states [N, D], top_k_index [N, k], top_k_weights [N, k]
        rt = self.runtime
        cache = rt.caches[self.layer]
        n = hidden_states.shape[0]
        decoding = n == 1
        c = rt.decode if decoding else rt.prefill
        if self.layer == rt.first_layer:
            c.tokens += n
        rows = top_k_index.tolist()  # the layer's one device->host sync
        needed = sorted({e for row in rows for e in row})
        if decoding and rt.record_routing:
            rt.routing.setdefault(self.layer, []).append(needed)
        guessed = rt.predicted.pop(self.layer, None)
        if guessed is not None:
            c.predicted += len(guessed)
            c.predicted_used += len(guessed & set(needed))
            c.predicted_needed += len(needed)
        c.needed += len(needed)
        hits = [e for e in needed if e in cache]
        order = hits + [e for e in needed if e not in cache]
        for e in hits:
            c.prefetch_hits += e in rt.prefetched[self.layer]
        c.hits += len(hits)
        c.misses += len(order) - len(hits)
        rt.prefetched[self.layer].clear()

        out = torch.zeros_like(hidden_states)
        mask = None if decoding else F.one_hot(top_k_index, cache.store.num_experts).permute(2, 1, 0)  # [E, k, N]
        for start in range(0, len(order), cache.slots):
            group = order[start : start + cache.slots]
            for e in group:
                if e in cache:
                    cache.touch(e)
                else:
                    cache.load(e, set(group), rt.stream)
                    c.bytes_h2d += cache.store.expert_bytes
                    c.demand_bytes += cache.store.expert_bytes
            if start == 0 and decoding and rt.prefetch:
                self._prefetch_next()
            for e in sorted(group):
                slot = cache.acquire(e)
                if decoding:
                    pos = rows[0].index(e)
                    x, weight = hidden_states, top_k_weights[:, pos, None]
                    token_idx = None
                else:
                    top_k_pos, token_idx = torch.where(mask[e])
                    x, weight = hidden_states[token_idx], top_k_weights[token_idx, top_k_pos, None]
                gate, up = F.linear(x, cache.gate_up[slot]).chunk(2, dim=-1)
                y = F.linear(self.act_fn(gate) * up, cache.down[slot]) * weight
                if token_idx is None:
                    out += y.to(out.dtype)
                else:
                    out.index_add_(0, token_idx, y.to(out.dtype))
                cache.release(slot)
        return out

    def _prefetch_next(self) -> None:
        """Guess the next MoE layer's experts from this layer's residual stream; start copying the missing."""
        rt = self.runtime
        nxt = rt.next_layer.get(self.layer)
        x = rt.residual.pop(self.layer, None)
        if nxt is None or x is None:
            return
        norm, weight, top_k = rt.predictors[nxt]
        h = norm(x).reshape(-1, x.shape[-1])
        guess = set(torch.topk(F.linear(h, weight).float(), top_k, dim=-1).indices[0].tolist())
        rt.predicted[nxt] = guess
        cache = rt.caches[nxt]
        for e in sorted(guess):
            if e not in cache:
                cache.load(e, guess, rt.stream)
                rt.prefetched[nxt].add(e)
                rt.decode.bytes_h2d += cache.store.expert_bytes
                rt.decode.prefetch_bytes += cache.store.expert_bytes


def moe_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layers whose MLP holds fused routed experts (or their `CachedExperts`), by index."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if isinstance(experts, CachedExperts) or (hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")):
            out[i] = layer
    if not out:
        raise ValueError(f"{type(model).__name__}: no decoder layer has fused experts (mlp.experts.gate_up_proj)")
    return out


class ExpertOffload:
    """Installs LRU expert caching into a transformers MoE model (see the module docstring)."""

    def __init__(self, model: nn.Module, slots: int | dict[int, int], device: str | torch.device = "cuda",
                 prefetch: bool = True, record_routing: bool = False):
        self.model, self.device = model, torch.device(device)
        self.prefetch, self.record_routing = prefetch, record_routing
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        layers = moe_layers(model)
        self.layer_ids = sorted(layers)
        self.first_layer = self.layer_ids[0]
        self.next_layer = {l: l + 1 for l in self.layer_ids if l + 1 in layers}
        self.stores: dict[int, ExpertStore] = {}
        self.predictors: dict[int, tuple[nn.Module, nn.Parameter, int]] = {}
        self.residual: dict[int, torch.Tensor] = {}
        self.predicted: dict[int, set[int]] = {}
        self.prefetched: dict[int, set[int]] = {l: set() for l in self.layer_ids}
        self.routing: dict[int, list[list[int]]] = {}
        self._hooks = []
        for l in self.layer_ids:
            layer = layers[l]
            experts = layer.mlp.experts
            self.stores[l] = ExpertStore(experts.gate_up_proj, experts.down_proj, pin=cuda)
            layer.mlp.experts = CachedExperts(l, self, experts.act_fn)
            del experts
            self._hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(self._capture(l)))
            router = layer.mlp.gate
            self.predictors[l] = (layer.post_attention_layernorm, router.weight, router.top_k)
        model.to(self.device)
        self.caches: dict[int, LayerCache] = {}
        self.set_slots(slots)
        self.prefill, self.decode = Counters(), Counters()

    def _capture(self, layer: int):
        def hook(_module, args):
            self.residual[layer] = args[0]

        return hook

    @property
    def expert_bytes(self) -> int:
        return self.stores[self.first_layer].expert_bytes

    def host_bytes(self) -> int:
        return sum(s.gate_up.nbytes + s.down.nbytes for s in self.stores.values())

    def set_slots(self, slots: int | dict[int, int]) -> None:
        """(Re)build every layer's device cache, warm with experts 0..C-1."""
        self.caches.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        for l in self.layer_ids:
            c = slots[l] if isinstance(slots, dict) else slots
            if not 1 <= c <= self.stores[l].num_experts:
                raise ValueError(f"layer {l}: {c} slots; need 1..{self.stores[l].num_experts}")
            self.caches[l] = LayerCache(self.stores[l], c, self.device)
        if self.device.type == "cuda":  # the warm copies ran on the default stream; the copy stream must not overtake them
            torch.cuda.synchronize(self.device)
        self.predicted.clear()
        self.residual.clear()
        for s in self.prefetched.values():
            s.clear()

    def reset_counters(self) -> None:
        self.prefill, self.decode = Counters(), Counters()
        self.routing = {}

    def report(self) -> dict:
        """Decode figures under the names jaxmoe reports them."""
        d = self.decode
        guessed = self.prefetch and d.predicted > 0
        return {"bytes_h2d_per_token": d.bytes_h2d / max(d.tokens, 1), "hit_rate": d.hits / max(d.hits + d.misses, 1),
                "cache_hits": d.hits, "cache_misses": d.misses, "prefill_bytes_h2d": self.prefill.bytes_h2d,
                "prefetch_precision": d.predicted_used / d.predicted if guessed else None,
                "prefetch_recall": d.predicted_used / max(d.predicted_needed, 1) if guessed else None}

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# -- recorded routing ----------------------------------------------------------------------------


class ReplayClock:
    """Sequence position of the next token the model will process (advanced by the last MoE layer)."""

    def __init__(self):
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0


class ReplayRouter(nn.Module):
    """Stands in for a layer's router (`mlp.gate`): returns the recorded experts and gating
    probabilities for (token position, layer) instead of the router's choice.

    It keeps the router's weight Parameter under the same name (state dicts and offload hooks see
    the same tree) but never reads it, so it runs wherever accelerate has put that weight. Router
    logits, used only for auxiliary losses, are returned as zeros."""

    def __init__(self, router: nn.Module, layer: int, routing, clock: ReplayClock, advances: bool):
        super().__init__()
        self.weight = router.weight
        self.num_experts, self.hidden = router.weight.shape
        self.top_k, self.layer, self.advances = router.top_k, layer, advances
        self.float_scores = type(router).__name__ in FLOAT32_SCORES
        self._source = [routing, clock]

    def forward(self, hidden_states: torch.Tensor):
        routing, clock = self._source
        h = hidden_states.reshape(-1, self.hidden)
        ids, weights = routing.rows(self.layer, clock.pos, h.shape[0])
        if self.advances:
            clock.pos += h.shape[0]
        dtype = torch.float32 if self.float_scores else h.dtype  # what the replaced router returns
        scores = torch.as_tensor(weights, dtype=torch.float32).to(device=h.device, dtype=dtype)  # [N, k]
        logits = h.new_zeros(h.shape[0], self.num_experts)  # [N, E]
        return logits, scores, torch.as_tensor(ids, dtype=torch.long).to(h.device)


def install_replay(model: nn.Module, routing) -> tuple[ReplayClock, Callable[[], None]]:
    """Swap every MoE layer's router for a `ReplayRouter`; returns (clock, undo)."""
    clock = ReplayClock()
    layers = moe_layers(model)
    last = max(layers)
    originals = {}
    for l, layer in layers.items():
        originals[l] = layer.mlp.gate
        layer.mlp.gate = ReplayRouter(layer.mlp.gate, l, routing, clock, advances=l == last)

    def undo() -> None:
        for l, layer in layers.items():
            layer.mlp.gate = originals[l]

    return clock, undo
