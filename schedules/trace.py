"""Routing traces: which experts each MoE layer chose for each processed token.

Traces are the input of everything offline in jaxmoe: statistics, the cache simulator and the
planner. They are recorded from the fully resident model (greedy generation, then one full
forward pass over prompt + generated tokens: cached decode equals a full forward, so the routing
of every position is exactly what the offloaded runtime will see), or read from public traces.

File format `jaxmoe-trace` version 1: JSON lines.

Line 1, the header:

    {"format": "jaxmoe-trace", "version": 1,
     "model": {model identity, as jaxmoe.offload.plan.model_identity} or null,
     "moe_layers": [model layer index of each MoE layer],  # L entries, the order of every list below
     "num_experts": E, "top_k": k, "source": "how it was made",
     "requests": [{"id": "r0", "prompt_tokens": 12, "new_tokens": 32, "stop_reason": "length"}, ...]}

Then one line per processed token, requests one after the other, tokens in processing order:

    {"request": "r0", "pos": 12, "phase": "prefill" | "decode", "token": 1234,  # the input token id
     "experts": [[e, ...k] per MoE layer],        # the router's choice, in its order (descending weight)
     "weights": [[w, ...k] per MoE layer],        # the gate weights the model applied
     "predicted": [[e, ...k] or null per MoE layer]}  # optional

`predicted[i]` is the guess made at MoE layer moe_layers[i] for model layer moe_layers[i] + 1: that
layer's router applied to layer i's post-attention hidden state, which is exactly what the
offload runtime prefetches; null where the next layer is not an MoE layer. Prompt positions are
"prefill" (the runtime processes them in one step); the generated tokens fed back are "decode"
(one step each). As in the runtime, the last generated token is never processed. (One difference:
when generation stops at an end-of-sequence token with room left, the runtime's pipelined loop
has already dispatched that token's decode step and counts its transfers; the trace leaves it
out, so the simulator counts one token less for such a request.)

`read_trace` also accepts the public per-(request, token, layer) format of
`tests/data/mixtral-8x7b-instruct` (fields `dataset` + `problem_id`, `token_idx` or
`token_pos`, `layer`, `experts`, `gating_probs`): all its tokens are decode tokens, it has no
predictions, and tokens missing some layers are skipped (counted in `Trace.skipped_tokens`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMAT = "jaxmoe-trace"
TRACE_VERSION = 1


class TraceError(ValueError):
    pass


@dataclasses.dataclass
class Request:
    """One request's routing. T processed tokens, L MoE layers, k experts per token."""

    id: str
    positions: np.ndarray  # [T] token positions
    decode: np.ndarray  # [T] bool: False for prompt (prefill) tokens, which come first
    experts: np.ndarray  # [T, L, k] int
    weights: np.ndarray  # [T, L, k] float (NaN where unknown)
    predicted: np.ndarray | None = None  # [T, L, k] int, -1 where no prediction; None: not recorded
    tokens: np.ndarray | None = None  # [T] input token ids, when recorded
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # prompt_tokens, new_tokens, stop_reason

    @property
    def num_prefill(self) -> int:
        return int(np.sum(~self.decode))


@dataclasses.dataclass
class Trace:
    moe_layers: tuple[int, ...]  # model layer index of each traced MoE layer
    num_experts: int
    top_k: int
    requests: list[Request]
    model: dict[str, Any] | None = None  # model identity, when recorded by jaxmoe
    source: str = ""
    skipped_tokens: int = 0  # public traces: tokens dropped for missing layers

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def has_predictions(self) -> bool:
        return bool(self.requests) and all(r.predicted is not None for r in self.requests)

    def num_tokens(self, phase: str = "all") -> int:
        return sum(int(_phase_mask(r, phase).sum()) for r in self.requests)

    def frequencies(self, phase: str = "all") -> np.ndarray:
        """[L, E] per-token use frequency of each expert (each row sums to k): the `prior`."""
        counts = np.zeros((self.num_layers, self.num_experts))
        for r in self.requests:
            counts += activation_matrix(r, self.num_experts, phase)
        return counts / max(self.num_tokens(phase), 1)

    def check_model(self, config) -> None:
        """Refuse a trace recorded for a model whose routing shapes differ from `config`'s."""
        from jaxmoe.offload.plan import model_identity

        if self.model is not None and self.model != model_identity(config):
            diff = {k: (self.model.get(k), v) for k, v in model_identity(config).items() if self.model.get(k) != v}
            raise TraceError(f"the trace was recorded on another model; differing (trace, model): {diff}")
        if (len(config.moe_layer_ids), config.num_experts, config.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise TraceError(
                f"trace has {self.num_layers} MoE layers, {self.num_experts} experts, top-{self.top_k}; the model has "
                f"{len(config.moe_layer_ids)} MoE layers, {config.num_experts} experts, top-{config.top_k}")


def _phase_mask(r: Request, phase: str) -> np.ndarray:
    if phase == "all":
        return np.ones(len(r.decode), bool)
    if phase == "decode":
        return r.decode
    if phase == "prefill":
        return ~r.decode
    raise ValueError(f"phase is all, decode or prefill, not {phase!r}")


def activation_matrix(r: Request, num_experts: int, phase: str = "all") -> np.ndarray:
    """MoE-Infinity's expert activation matrix of one request: [L, E] token counts."""
    ex = r.experts[_phase_mask(r, phase)]  # [T, L, k]
    out = np.zeros((ex.shape[1], num_experts))
    np.add.at(out, (np.broadcast_to(np.arange(ex.shape[1])[None, :, None], ex.shape), ex), 1.0)
    return out


# -- writing and reading ---------------------------------------------------------------------------


def write_trace(path: str | Path, trace: Trace) -> None:
    requests = [{"id": r.id, **r.meta} for r in trace.requests]
    header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "model": trace.model,
              "moe_layers": list(trace.moe_layers), "num_experts": trace.num_experts, "top_k": trace.top_k,
              "source": trace.source, "requests": requests}
    with open(path, "w") as f:
        f.write(json.dumps(header) + "\n")
        for r in trace.requests:
            for t in range(len(r.positions)):
                line = {"request": r.id, "pos": int(r.positions[t]), "phase": "decode" if r.decode[t] else "prefill"}
                if r.tokens is not None:
                    line["token"] = int(r.tokens[t])
                line.update(experts=r.experts[t].tolist(), weights=np.round(r.weights[t], 6).tolist())
                if r.predicted is not None:
                    line["predicted"] = [None if p[0] < 0 else p.tolist() for p in r.predicted[t]]
                f.write(json.dumps(line) + "\n")


def read_trace(path: str | Path) -> Trace:
    """A jaxmoe trace or a public per-layer routing trace (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace at {path}")
    with open(path) as f:
        first = f.readline()
        try:
            head = json.loads(first)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}: line 1 is not JSON ({e})") from None
        if head.get("format") == TRACE_FORMAT:
            return _read_native(path, head, f)
        if "layer" in head and "experts" in head and ("token_idx" in head or "token_pos" in head):
            return _read_public(path, [head], f)
    raise TraceError(f"{path}: neither a {TRACE_FORMAT} file (header line) nor a per-layer routing trace "
                     "(fields dataset/problem_id, token_idx, layer, experts, gating_probs)")


def read_traces(paths: Iterable[str | Path]) -> list[Trace]:
    return [read_trace(p) for p in paths]


def _read_native(path: Path, head: dict, lines) -> Trace:
    if head.get("version") != TRACE_VERSION:
        raise TraceError(f"{path}: trace version {head.get('version')} is not supported (this jaxmoe reads {TRACE_VERSION})")
    layers = len(head["moe_layers"])
    rows: dict[str, list[dict]] = {}
    for n, text in enumerate(lines, start=2):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{n}: not JSON ({e})") from None
        if len(row["experts"]) != layers:
            raise TraceError(f"{path}:{n}: {len(row['experts'])} layers of experts, the header says {layers}")
        rows.setdefault(str(row["request"]), []).append(row)
    meta = {str(m["id"]): {k: v for k, v in m.items() if k != "id"} for m in head.get("requests", [])}
    requests = []
    for rid, toks in rows.items():
        has_pred = all("predicted" in t for t in toks)
        k = head["top_k"]
        pred = None
        if has_pred:
            pred = np.array([[p if p is not None else [-1] * k for p in t["predicted"]] for t in toks], np.int64)
        requests.append(Request(
            id=rid,
            positions=np.array([t["pos"] for t in toks], np.int64),
            decode=np.array([t["phase"] == "decode" for t in toks], bool),
            experts=np.array([t["experts"] for t in toks], np.int64),
            weights=np.array([t["weights"] for t in toks], np.float64),
            predicted=pred, meta=meta.get(rid, {}),
            tokens=np.array([t["token"] for t in toks], np.int64) if all("token" in t for t in toks) else None))
        _check_request(path, requests[-1], head["num_experts"])
    return Trace(tuple(head["moe_layers"]), int(head["num_experts"]), int(head["top_k"]), requests,
                 head.get("model"), head.get("source", ""))


def _read_public(path: Path, first: list[dict], lines) -> Trace:
    tokens: dict[tuple, dict[int, dict]] = {}
    order: list[tuple] = []
    for n, text in enumerate(lines, start=2):
        if text.strip():
            try:
                first.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{n}: not JSON ({e})") from None
    for row in first:
        rid = (row.get("dataset", ""), row.get("problem_id", row.get("request", 0)))
        if rid not in order:
            order.append(rid)
        pos = row["token_idx"] if "token_idx" in row else row["token_pos"]
        tokens.setdefault((rid, int(pos)), {})[int(row["layer"])] = row
    num_layers = 1 + max(layer for per in tokens.values() for layer in per)
    top_k = max(len(r["experts"]) for per in tokens.values() for r in per.values())
    num_experts = 1 + max(e for per in tokens.values() for r in per.values() for e in r["experts"])
    skipped = 0
    requests = []
    for rid in order:
        keys = sorted(p for (r, p) in tokens if r == rid)
        full = [p for p in keys if len(tokens[(rid, p)]) == num_layers]
        skipped += len(keys) - len(full)
        if not full:
            continue
        per = [[tokens[(rid, p)][layer] for layer in range(num_layers)] for p in full]
        requests.append(Request(
            id=f"{rid[0]}/{rid[1]}" if rid[0] else str(rid[1]),
            positions=np.array(full, np.int64),
            decode=np.ones(len(full), bool),
            experts=np.array([[r["experts"] for r in tok] for tok in per], np.int64),
            weights=np.array([[r.get("gating_probs", [np.nan] * top_k) for r in tok] for tok in per], np.float64)))
    return Trace(tuple(range(num_layers)), num_experts, top_k, requests, None,
                 f"public routing trace {path.name}", skipped)


def _check_request(path: Path, r: Request, num_experts: int) -> None:
    if r.decode.size and np.any(r.decode[:-1] & ~r.decode[1:]):
        raise TraceError(f"{path}: request {r.id}: a prefill token follows a decode token")
    if r.experts.size and (r.experts.min() < 0 or r.experts.max() >= num_experts):
        raise TraceError(f"{path}: request {r.id}: expert ids outside 0..{num_experts - 1}")


# -- recording -------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str | list[int]]:
    """One prompt a line, or JSON lines with a "prompt" (text) or "prompt_ids" (token ids) field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    prompts: list[str | list[int]] = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                prompts.append([int(i) for i in row["prompt_ids"]] if "prompt_ids" in row else str(row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise TraceError(f"{path}:{n}: expected a JSON object with a \"prompt\" or \"prompt_ids\" field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise TraceError(f"{path} holds no prompts")
    return prompts


def record_request(engine, rid: str, prompt_ids: Sequence[int], max_new_tokens: int) -> Request:
    """Greedy generation on a resident `Engine`, then one full forward over what decode processed."""
    result = engine.generate(prompt_ids=list(prompt_ids), max_new_tokens=max_new_tokens)
    seq = list(prompt_ids) + result.token_ids[:-1]
    _, routing = engine.forward(np.asarray([seq], np.int32), predict_next=True)
    k = engine.config.top_k
    experts = np.stack([np.asarray(ids) for _, ids, _ in routing], axis=1)  # [T, L, k]
    weights = np.stack([np.asarray(w) for w, _, _ in routing], axis=1)
    predicted = np.stack([np.asarray(g) if g is not None else np.full((len(seq), k), -1) for _, _, g in routing], axis=1)
    n = len(prompt_ids)
    meta = {"prompt_tokens": n, "new_tokens": len(result.token_ids), "stop_reason": result.stop_reason}
    return Request(rid, np.arange(len(seq)), np.arange(len(seq)) >= n, experts.astype(np.int64),
                   weights.astype(np.float64), predicted.astype(np.int64), tokens=np.asarray(seq, np.int64), meta=meta)


def record(engine, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 32, chat: bool = False,
           progress: Callable[[str], None] | None = None) -> Trace:
    """Trace `prompts` (text, or token ids) on a fully resident engine."""
    from jaxmoe.offload.plan import model_identity

    requests = []
    for i, prompt in enumerate(prompts):
        ids = engine.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        requests.append(record_request(engine, f"r{i}", ids, max_new_tokens))
        if progress:
            progress(f"request r{i}: {len(ids)} prompt tokens, {requests[-1].meta['new_tokens']} new")
    c = engine.config
    source = f"jaxmoe trace of {engine.model_dir}" if engine.model_dir else "jaxmoe trace"
    return Trace(c.moe_layer_ids, c.num_experts, c.top_k, requests, model_identity(c), source)
