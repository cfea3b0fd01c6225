"""Decode latency model: seconds per token from per-layer compute times and transfers.

The runtime (jaxmoe.offload.runtime) runs each MoE layer as: attention + router (one device
call), a host sync to read the router's choice, then the controller's decisions: this layer's
missing segments are issued (demand), then the expert computation, which waits for them and for
the prefetch issued into it one layer earlier (the first chunk writes every prefetched top into
the cache), then the next layer's predicted segments (prefetch), behind the demand on the copy
stream.

The model replays that order per decode token with two resources that run in parallel, the
compute stream and one host->device copy stream, each doing its work in issue order:

    for MoE layer i:
        router_done  = compute_free + a_i                      # dense layers before i, attention, router(s), sync
        demand of layer i:        starts at max(copy_free, router_done), lasts D_i
        prefetch into layer i+1:  starts at max(copy_free, router_done), lasts P_{i+1}
        compute_free = max(router_done, demand done, prefetch into i done) + c_i   # experts
    token time = compute_free after the last MoE layer + tail (later dense layers, head)

with a transfer of B bytes in n device_puts lasting n * latency + B / bandwidth, and
c_i = (experts computed) * expert_s + (device calls) * launch_s. A layer with nothing to wait
for does not wait for the copy stream. Transfers overlap compute exactly as far as this
ordering allows: a prefetch hides behind the previous layer's experts and this layer's attention;
a demand fetch always stalls. Simplifications: each token starts with an idle copy stream, and a
chunk waits for all its segments (the top's compute does not start before the bottom arrives).

Everything here is a pure function of arrays: the simulator calls it on one configuration, the
planner on many at once (extra leading axes broadcast).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmoe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ComputeTimes:
    """Seconds of one decode token's compute parts; `measured` says whether they were timed."""

    attention_s: float
    router_s: float
    expert_s: float  # one whole expert; top + bottom segments cost the same in total
    mlp_s: float  # a dense layer's MLP (non-MoE layers) or the shared expert
    head_s: float
    launch_s: float
    sync_s: float
    measured: bool


def _model_entry(config: ModelConfig, profile: dict) -> dict | None:
    from jaxmoe.offload.plan import model_identity

    want = model_identity(config)
    return next((m for m in profile.get("models", []) if m.get("model") == want), None)


def roofline_times(config: ModelConfig, profile: dict, kv_length: int = 1024) -> ComputeTimes:
    """Bytes read per decode token / effective memory bandwidth, per part."""
    c, bw = config, float(profile["memory_bandwidth_Bps"])
    item = np.dtype(c.jnp_dtype).itemsize
    attn_w = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) * item
    kv = 2 * kv_length * c.num_kv_heads * c.head_dim * item
    dense = c.intermediate_size if not all(c.moe_layers) else c.shared_expert_intermediate_size
    return ComputeTimes(
        attention_s=(attn_w + kv) / bw,
        router_s=c.hidden_size * c.num_experts * item / bw,
        expert_s=c.expert_bytes() / bw,
        mlp_s=3 * c.hidden_size * dense * item / bw,
        head_s=c.hidden_size * c.vocab_size * item / bw,
        launch_s=float(profile.get("launch_s", 0.0)),
        sync_s=float(profile.get("sync_s", 0.0)),
        measured=False,
    )


def compute_times(config: ModelConfig, profile: dict) -> ComputeTimes:
    """The profile's measurements for this model if it has them, else roofline estimates."""
    entry = _model_entry(config, profile)
    if entry is None:
        return roofline_times(config, profile)
    roof = roofline_times(config, profile, entry.get("kv_length", 1024))
    return dataclasses.replace(
        roof, attention_s=entry["attention_s"], router_s=entry["router_s"], expert_s=entry["expert_s"],
        mlp_s=entry.get("mlp_s", roof.mlp_s), head_s=entry.get("head_s", roof.head_s), measured=True)


def transfer_seconds(nbytes, calls, profile: dict):
    """n device_puts moving `nbytes` in all: n * latency + bytes / bandwidth (arrays broadcast)."""
    h2d = profile["h2d"]
    return np.asarray(calls) * float(h2d["latency_s"]) + np.asarray(nbytes) / float(h2d["bandwidth_Bps"])


def layer_compute(config: ModelConfig, t: ComputeTimes, needed, calls, prefetch: bool):
    """(a, c) per MoE layer: before-the-experts seconds and expert seconds; arrays [L, ...].

    a_i: the dense layers between MoE layer i-1 and i, attention, router (and the next layer's
    router when prefetching), one device call and one host sync. c_i: `needed` experts computed in
    `calls` device calls."""
    ids = config.moe_layer_ids
    shared = t.mlp_s if config.shared_expert_intermediate_size else 0.0
    a = np.zeros(len(ids))
    prev = -1
    for i, layer in enumerate(ids):
        dense_before = layer - prev - 1
        next_router = prefetch and layer + 1 in ids
        a[i] = (dense_before * (t.attention_s + t.mlp_s + t.launch_s) + t.attention_s + t.router_s
                * (1 + next_router) + t.launch_s + t.sync_s + shared)
        prev = layer
    c = np.asarray(needed) * t.expert_s + np.asarray(calls) * t.launch_s
    return a.reshape((-1,) + (1,) * (c.ndim - 1)), c


def tail_seconds(config: ModelConfig, t: ComputeTimes) -> float:
    """Dense layers after the last MoE layer, the final norm and the LM head."""
    after = config.num_layers - 1 - config.moe_layer_ids[-1]
    return after * (t.attention_s + t.mlp_s + t.launch_s) + t.head_s + t.launch_s


def pipeline(a, c, prefetch_s, demand_s, start: int = 0, state=None, states: list | None = None):
    """Decode token seconds through the MoE layers (see the module docstring).

    a, c, prefetch_s, demand_s: indexable by MoE layer (arrays [L, ...] or lists of arrays that
    broadcast together): compute seconds, the transfer into layer i issued during layer i-1
    (prefetch_s[0] is ignored), layer i's demand transfer. Returns [...]: seconds from the first
    MoE layer's start to the last one's end. `start` and `state` (compute_free, copy_free,
    prefetch-into-start done) resume a run at layer `start`; `states`, if given, collects the
    state before each layer, so a caller can re-run only the layers after a change."""
    compute, copy, pre_done = state if state is not None else (0.0, 0.0, 0.0)
    layers = len(a)
    for i in range(start, layers):
        if states is not None:
            states.append((compute, copy, pre_done))
        router_done = compute + a[i]
        has = demand_s[i] > 0
        dem_done = np.where(has, np.maximum(copy, router_done) + demand_s[i], router_done)
        copy = np.where(has, dem_done, copy)
        nxt = 0.0
        if i + 1 < layers:
            has = prefetch_s[i + 1] > 0
            nxt = np.where(has, np.maximum(copy, router_done) + prefetch_s[i + 1], 0.0)
            copy = np.where(has, nxt, copy)
        compute = np.maximum(np.maximum(router_done, dem_done), pre_done) + c[i]
        pre_done = nxt
    return compute
