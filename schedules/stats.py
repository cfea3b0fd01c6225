"""Trace statistics: what a cache and a prefetcher could exploit in a routing trace.

- Popularity: per layer, the share of tokens that use each expert. Skew is what a static hot set
  (and the frequency part of LFU/LCP) lives on.
- Reuse: per layer and use of an expert, tokens since the same request last used it (the gap),
  and the LRU stack distance (distinct other experts used at that layer in between, across
  requests as the cache sees them). An LRU cache of C slots hits roughly the uses whose stack
  distance is below C - k + 1; locality is what LRU lives on.
- Cross-layer predictability: how well layer l's experts predict layer l+1's. Conditional top-k
  accuracy: predict l+1's k experts as those most often seen with l's experts (transition counts
  over the same trace, so in-sample), the fraction of l+1's experts guessed; beside it, the
  popularity baseline (l+1's k most popular experts) and, when the trace records it, the
  runtime's own guess (l+1's router on l's hidden state). Prefetch lives on this.
- Expert activation matrices (MoE-Infinity's EAM): per request, layers x experts token counts,
  and their pairwise similarity (cosine of row-normalised rows, averaged over layers), the
  measure MoE-Infinity matches a running request against past ones with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxmoe.schedules.trace import Trace, activation_matrix


def _global_sequence(trace: Trace) -> np.ndarray:
    return np.concatenate([r.experts for r in trace.requests], axis=0)  # [N, L, k]


def reuse(trace: Trace) -> dict[str, list]:
    """Per layer: mean and median token gap within requests, mean and quantiles of stack distance."""
    seq = _global_sequence(trace)
    starts = np.cumsum([0] + [len(r.decode) for r in trace.requests])
    request_of = np.searchsorted(starts, np.arange(len(seq)), side="right") - 1
    gaps, stacks = [], []
    for i in range(trace.num_layers):
        last = np.full(trace.num_experts, -1)  # step of each expert's last use at this layer
        g, st = [], []
        for t, experts in enumerate(seq[:, i]):
            used = np.unique(experts)
            seen = used[last[used] >= 0]
            prev = last[seen]
            same = request_of[prev] == request_of[t]
            g.extend((t - prev[same]).tolist())
            st.extend((last[None, :] > prev[:, None]).sum(axis=1).tolist())  # distinct experts since
            last[used] = t
        gaps.append(np.array(g, float))
        stacks.append(np.array(st, float))

    def q(a, p):
        return float(np.quantile(a, p)) if a.size else float("nan")

    return {
        "gap_mean": [float(a.mean()) if a.size else float("nan") for a in gaps],
        "gap_median": [q(a, 0.5) for a in gaps],
        "stack_mean": [float(a.mean()) if a.size else float("nan") for a in stacks],
        "stack_median": [q(a, 0.5) for a in stacks],
        "stack_p90": [q(a, 0.9) for a in stacks],
    }


def cross_layer(trace: Trace) -> dict[str, list]:
    """Per layer pair (l, l+1): conditional top-k, popularity and (if recorded) router-guess accuracy."""
    seq = _global_sequence(trace)  # [N, L, k]
    n, layers, k = seq.shape
    e = trace.num_experts
    cond, pop, router = [], [], []
    pred = np.concatenate([r.predicted for r in trace.requests]) if trace.has_predictions else None
    for i in range(layers - 1):
        src, dst = seq[:, i], seq[:, i + 1]
        counts = np.zeros((e, e))
        np.add.at(counts, (np.repeat(src, k, axis=1).ravel(), np.tile(dst, (1, k)).ravel()), 1.0)
        scores = counts[src].sum(axis=1)  # [N, E]
        guess = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        cond.append(_overlap(guess, dst))
        popular = np.argsort(-np.bincount(dst.ravel(), minlength=e), kind="stable")[:k]
        pop.append(_overlap(np.broadcast_to(popular, dst.shape), dst))
        if pred is not None and trace.moe_layers[i] + 1 == trace.moe_layers[i + 1]:
            router.append(_overlap(pred[:, i], dst))
        else:
            router.append(None)
    return {"conditional_topk": cond, "popularity_topk": pop, "router_guess": router}


def _overlap(guess: np.ndarray, actual: np.ndarray) -> float:
    """Mean share of each token's actual experts that the guess contains."""
    hit = (guess[:, :, None] == actual[:, None, :]).any(axis=1)  # [N, k]
    return float(hit.mean())


def eam_similarity(eams: list[np.ndarray]) -> np.ndarray:
    """[R, R] mean over layers of the cosine similarity of row-normalised activation counts."""
    norm = [m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12) for m in eams]
    r = len(norm)
    out = np.zeros((r, r))
    for a in range(r):
        for b in range(r):
            out[a, b] = float(np.mean(np.sum(norm[a] * norm[b], axis=1)))
    return out


def trace_stats(trace: Trace) -> dict[str, Any]:
    freqs = trace.frequencies()
    eams = [activation_matrix(r, trace.num_experts) for r in trace.requests]
    top = np.sort(freqs, axis=1)[:, ::-1] / trace.top_k
    half = max(1, trace.num_experts // 2)
    return {
        "moe_layers": list(trace.moe_layers), "num_experts": trace.num_experts, "top_k": trace.top_k,
        "requests": len(trace.requests), "tokens": trace.num_tokens(), "decode_tokens": trace.num_tokens("decode"),
        "prefill_tokens": trace.num_tokens("prefill"), "skipped_tokens": trace.skipped_tokens,
        "popularity": freqs.tolist(),
        "top_half_share": top[:, :half].sum(axis=1).tolist(),
        "reuse": reuse(trace),
        "cross_layer": cross_layer(trace),
        "eam": {r.id: m.astype(int).tolist() for r, m in zip(trace.requests, eams)},
        "eam_similarity": eam_similarity(eams).tolist(),
    }


def format_stats(s: dict[str, Any]) -> str:
    """Human-readable summary of trace_stats."""
    k, e = s["top_k"], s["num_experts"]
    lines = [f"{s['requests']} requests, {s['tokens']} tokens ({s['prefill_tokens']} prefill, {s['decode_tokens']} decode"
             f"{', ' + str(s['skipped_tokens']) + ' skipped for missing layers' if s['skipped_tokens'] else ''}); "
             f"{len(s['moe_layers'])} MoE layers, top-{k} of {e} experts", ""]
    x, r = s["cross_layer"], s["reuse"]
    lines.append(f"{'layer':>5} {'top experts (share of tokens)':<34} {'top-half':>8} {'gap':>6} {'stack':>6} "
                 f"{'next: cond':>10} {'popular':>8} {'router':>7}")
    for i, layer in enumerate(s["moe_layers"]):
        pop = np.asarray(s["popularity"][i])
        best = np.argsort(-pop, kind="stable")[:3]
        tops = " ".join(f"{int(b)}:{pop[b]:.2f}" for b in best)
        nxt = ("", "", "") if i + 1 >= len(s["moe_layers"]) else (
            f"{x['conditional_topk'][i]:.3f}", f"{x['popularity_topk'][i]:.3f}",
            "-" if x["router_guess"][i] is None else f"{x['router_guess'][i]:.3f}")
        lines.append(f"{layer:>5} {tops:<34} {s['top_half_share'][i]:>8.3f} {r['gap_mean'][i]:>6.1f} "
                     f"{r['stack_mean'][i]:>6.2f} {nxt[0]:>10} {nxt[1]:>8} {nxt[2]:>7}")
    lines += ["", "gap: mean tokens between uses of an expert within a request; stack: mean distinct other experts "
              "used in between (LRU stack distance); next: share of layer l+1's experts guessed from layer l "
              "(conditional top-k from the trace's own transition counts, in-sample), by popularity, by the router guess",
              "", "expert activation matrices (layers x experts, tokens routed):"]
    for rid, m in s["eam"].items():
        m = np.asarray(m)
        lines.append(f"request {rid}: {int(m[0].sum() // k)} tokens")
        if e <= 16:
            lines += [f"  {layer:>3} " + " ".join(f"{v:>4}" for v in row) for layer, row in zip(s["moe_layers"], m)]
        else:
            lines += [f"  {layer:>3} top " + " ".join(f"{b}:{row[b]}" for b in np.argsort(-row, kind='stable')[:6])
                      for layer, row in zip(s["moe_layers"], m)]
    sim = np.asarray(s["eam_similarity"])
    if len(sim) > 1:
        off = sim[~np.eye(len(sim), dtype=bool)]
        lines.append(f"EAM similarity between requests (mean per-layer cosine): min {off.min():.3f}, mean {off.mean():.3f}, max {off.max():.3f}")
    return "\n".join(lines)


class PlotError(ValueError):
    pass


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when a plot is asked for."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plots need matplotlib, which is not installed: pip install matplotlib (or jaxmoe[bench])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_popularity(s: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Heat map: share of tokens routed to each expert, per layer."""
    plt = _pyplot()
    pop = np.asarray(s["popularity"])
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * pop.shape[1] + 3), max(4, 0.2 * pop.shape[0] + 2)))
    im = ax.imshow(pop, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(s["moe_layers"])))
    ax.set_yticklabels(s["moe_layers"], fontsize=6 if len(s["moe_layers"]) > 24 else 8)
    ax.set_title(title or f"expert popularity ({s['tokens']} tokens, top-{s['top_k']})")
    fig.colorbar(im, ax=ax, label="share of tokens using the expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
