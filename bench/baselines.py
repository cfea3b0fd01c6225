"""jaxmoe against PyTorch offloading baselines: batch-1 greedy decode at equal device budgets.

    python bench/baselines.py --device gpu            # one H100, under 10 minutes: see "Time" below
    python bench/baselines.py --device cpu            # tiny models: every system's correctness, not speed
    python bench/baselines.py --device gpu --models mixtral-8x7b --policies lfu,lcp,static --systems jaxmoe
    python bench/baselines.py --device gpu --schedule plan.json   # adds jaxmoe with a planner schedule

Systems (on a GPU each runs in child processes of its own, so JAX and PyTorch never share the device):
- `jaxmoe[POLICY,prefetch|no-prefetch]`: `jaxmoe.load(converted, expert_budget=F, policy=..., prefetch=...)`,
  one process per budget (peak device memory is a process-lifetime figure in JAX);
  `jaxmoe[schedule:NAME]` for each `--schedule` written for this model and depth.
- `torch_lru[prefetch]` (and `[no-prefetch]`, default on CPU only): bench/torch_lru.py, a
  Mixtral-offloading-style PyTorch expert cache (pinned host experts, per-layer LRU of C slots,
  side-stream copies with events, speculative next-layer loading) with the C of jaxmoe's plan.
- `accelerate`: transformers `from_pretrained(device_map="auto", max_memory={0: B, "cpu": ...})`
  with B = jaxmoe's planned device footprint at that budget (resident weights, KV cache, expert
  cache, transfer buffers). It moves every offloaded weight on every forward, so its per-token
  time is flat: on a GPU it decodes `--accelerate-new-tokens` (default 8) tokens.
- `transformers[resident]`: the plain model wholly on the device, the token reference every system
  is compared with (and the no-offload speed); on a GPU one run after a warm-up.
On a CPU the same code runs with the CPU as the "device": accelerate's main device is the CPU and
it offloads to disk; torch_lru's copies are plain copies.

Models: presets with real shapes and random bf16 weights (bench/common.py), Mixtral-8x7B cut to 2
of 32 layers and Qwen3-30B-A3B to 4 of 48 (host memory, the 64 GiB pinned-host limit, disk, time;
the JSON says so; `--layers` overrides), OLMoE-1B-7B at its full 16 layers. Budgets: 50/25/75% of
the expert bytes, in that order. Routing: "router" (the random routers: near-uniform) and, for
models of the trace's expert count and top-k (Mixtral), "replay": every system follows `--replay`'s
recorded routing (jaxmoe through `OffloadEngine.route_override`, PyTorch through `ReplayRouter`);
next-layer predictors keep using the real routers in both modes.

Measured (warm-up request excluded; medians over `--repeats`): decode tokens/s (steady state
after the first token), TTFT, host->device bytes per decode token, peak device memory; pinned
host->device bandwidth (large copies, torch and JAX; the faster is the peak). Derived: each
system's bandwidth bound (peak / its bytes per token); the oracle floor, a Belady cache of the
same C with perfect prediction, best initial content, over the decode routing actually used
(recorded from the PyTorch models with the routers, the trace with replay), moving its bytes at
peak bandwidth with no compute; ratios of jaxmoe (best variant, and lru+prefetch) to the baselines.

Time. `--time-limit` (GPU default 560 s) is shared over models (GPU_MODELS' shares), and within a
model over its steps (STEP_WEIGHTS); time a step leaves unused passes on. A measurement that would
not fit is recorded as skipped, a worker past its share (plus `--grace`) is stopped, and what was
measured is kept; the JSON is rewritten after every step and lists every gap under `problems`.
The whole matrix (3 models x 3 budgets x 8 jaxmoe variants + baselines, two routing modes for
Mixtral, 128 tokens x 3 repeats) does not fit in 10 minutes of one H100: the default run does the
jaxmoe lru variants and the baselines first, other policies with what is left; further runs with
`--models/--systems/--policies` complete it, each within the limit.

Output: one JSON per run, bench/results/baselines_<device>[_<tag>].json (`results`: one entry per
model, routing and budget with device, model, expert_budget, systems{name: {decode_tokens_per_s,
ttft_s, bytes_h2d_per_token, device_bytes_peak, ...}}, oracle, ratios, gap_to_oracle; `records`:
every raw measurement), a plot of tokens/s against budget (same name, .png) and a markdown table
on stdout (also under `markdown`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

_TRACE = Path("shared") / "traces" / "mixtral-8x7b-instruct" / "humaneval_2_routing.jsonl"
# The project's shared directory sits beside the repository (or, in some checkouts, inside it).
DEFAULT_TRACE = next((root / _TRACE for root in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[1])
                      if (root / _TRACE).is_file()), None)
POLICIES = ("lru", "lfu", "lcp", "static")
# Steps of one model in order, with their shares of its time; unused time passes on.
STEP_WEIGHTS = {"torch_lru": 0.24, "jaxmoe_core": 0.32, "accelerate": 0.20, "reference": 0.06, "jaxmoe_rest": 0.18}

# Models at full scale: (preset, layers or None for all, share of the time limit).
GPU_MODELS = {
    "mixtral-8x7b": ("mixtral-8x7b", 2, 0.42),  # two routing modes: router and replay
    "qwen3-30b-a3b": ("qwen3-30b-a3b", 4, 0.23),
    "olmoe-1b-7b": ("olmoe-1b-7b", None, 0.35),
}
_TINY = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             rope_theta=10000.0, max_position_embeddings=512, torch_dtype="float32")
SMOKE_MODELS = {
    # 8 experts, top-2: the trace's shape, so it also runs with replayed routing.
    "tiny-mixtral": (dict(common.hf_config("mixtral-8x7b", 2, intermediate_size=32, **_TINY)), None, 0.6),
    "tiny-qwen3-moe": (dict(common.hf_config("qwen3-30b-a3b", 3, moe_intermediate_size=32, intermediate_size=48,
                                             num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0],
                                             bos_token_id=1, eos_token_id=2, **_TINY)), None, 0.4),
}


# -- measurement helpers (run inside workers) ------------------------------------------------------


class Deadline:
    """Skip a measurement that would not finish by `at` (estimated from the last one of its kind)."""

    def __init__(self, at: float):
        self.at = at
        self.last: dict[str, float] = {}

    def fits(self, kind: str) -> bool:
        return time.time() + self.last.get(kind, 0.0) <= self.at

    def done(self, kind: str, seconds: float) -> None:
        self.last[kind] = seconds


def _record(task: dict, system: str, budget: dict | None, mode: str, **fields) -> dict:
    return {"model": task["model"]["name"], "routing": mode, "system": system,
            "expert_budget": None if budget is None else budget["expert_budget"],
            "slots": None if budget is None else budget.get("slots"), **fields}


def _skip(task, system, budget, mode, reason) -> dict:
    return _record(task, system, budget, mode, status="skipped", reason=reason)


def _error(task, system, budget, mode, exc: BaseException) -> dict:
    return _record(task, system, budget, mode, status="error",
                   reason=f"{type(exc).__name__}: {str(exc)[:500]}", traceback=traceback.format_exc()[-3000:])


def _summarise_runs(runs: list[dict]) -> dict:
    """Median run's figures plus the spread of decode tokens/s."""
    mid = common.median_run(runs)
    out = dict(mid)
    out["decode_tokens_per_s_runs"] = [r["decode_tokens_per_s"] for r in runs]
    out["ttft_s"] = common.median([r["ttft_s"] for r in runs])
    return out


class JaxmoeReplay:
    """`route_override` for jaxmoe: recorded routing by sequence position."""

    def __init__(self, trace: common.RoutingTrace):
        self.trace = trace

    def __call__(self, layer: int, position: int, n: int):
        ids, weights = self.trace.rows(layer, position, n)
        return ids.astype(np.int32), weights.astype(np.float32)


# -- workers ---------------------------------------------------------------------------------------


def worker_bandwidth(task: dict, emit: Callable[[dict], None]) -> None:
    sizes = task["sizes_mb"]
    out = {"kind": "bandwidth", "jax": [], "torch": []}
    try:
        out["jax"] = common.h2d_bandwidth_jax(sizes)
    except Exception as exc:  # a result in itself (e.g. no pinned_host memory kind)
        out["jax_error"] = f"{type(exc).__name__}: {exc}"
    if task["device"] == "gpu":
        try:
            out["torch"] = common.h2d_bandwidth_torch(sizes)
        except Exception as exc:
            out["torch_error"] = f"{type(exc).__name__}: {exc}"
    emit(out)


def worker_jaxmoe(task: dict, emit: Callable[[dict], None]) -> None:
    import jaxmoe
    from jaxmoe.offload import plan as planning

    deadline = Deadline(task["deadline"])
    trace = _trace_or_none(task)
    prompt, n_new = task["prompt"], task["new_tokens"]
    store = None
    for budget in task["budgets"] or [None]:
        for variant in task["variants"]:
            if variant.get("schedule"):  # a schedule fixes its own budget
                system = f"jaxmoe[schedule:{Path(variant['schedule']).stem}]"
                load_kw = dict(schedule=variant["schedule"], kv_length=task["kv_length"])
            else:
                system = f"jaxmoe[{variant['policy']},{'prefetch' if variant['prefetch'] else 'no-prefetch'}]"
                load_kw = dict(expert_budget=budget["expert_budget"], policy=variant["policy"],
                               prefetch=variant["prefetch"], kv_length=task["kv_length"])
            if not deadline.fits("jaxmoe"):
                for mode in task["modes"]:
                    emit(_skip(task, system, budget, mode, "time limit"))
                continue
            t0, engine = time.time(), None
            try:
                t = time.perf_counter()
                if store is not None and not variant.get("schedule"):
                    load_kw["store"] = store  # same whole-expert split: reuse the pinned experts
                engine = jaxmoe.load(task["model"]["jaxmoe_dir"], **load_kw)
                if not variant.get("schedule"):
                    store = engine.store
                load_s = time.perf_counter() - t
                engine.config = engine.config.replace(eos_token_ids=())  # fixed length: never stop early
                entry_budget = budget
                if variant.get("schedule"):
                    config = engine.config
                    share = planning.cache_bytes(config, engine.plan) / (
                        len(config.moe_layer_ids) * config.num_experts * config.expert_bytes())
                    entry_budget = {"expert_budget": round(share, 4), "slots": None, "schedule": variant["schedule"]}
                for mode in task["modes"]:
                    replay = JaxmoeReplay(trace) if mode == "replay" else None
                    engine.route_override = replay

                    def once(n):
                        r = engine.generate(prompt_ids=prompt, max_new_tokens=n)
                        x = r.extra
                        return {"decode_tokens_per_s": r.decode_tokens_per_s, "ttft_s": r.ttft_s,
                                "compile_s": r.compile_s, "token_ids": r.token_ids,
                                "bytes_h2d_per_token": x["bytes_h2d_per_token"],
                                "device_bytes_peak": x["device_bytes_peak"],
                                "device_bytes_peak_source": x.get("device_bytes_peak_source"),
                                "device_bytes_planned": x.get("device_bytes_planned", {}).get("total"),
                                "hit_rate": x.get("hit_rate"), "cache_hits": x.get("cache_hits"),
                                "cache_misses": x.get("cache_misses"),
                                "prefetch_precision": x.get("prefetch_precision") if engine.plan.prefetch else None,
                                "prefetch_recall": x.get("prefetch_recall") if engine.plan.prefetch else None,
                                "prefill_bytes_h2d": x.get("prefill_bytes_h2d")}

                    warm = once(task["warmup_tokens"])
                    runs = [once(n_new) for _ in range(task["repeats"])]
                    emit(_record(task, system, entry_budget, mode, status="ok", load_s=load_s,
                                 warmup_compile_s=warm["compile_s"], new_tokens=n_new, repeats=len(runs),
                                 schedule=entry_budget.get("schedule"), **_summarise_runs(runs)))
            except Exception as exc:
                for mode in task["modes"]:
                    emit(_error(task, system, budget, mode, exc))
            finally:
                del engine
                gc.collect()
                deadline.done("jaxmoe", time.time() - t0)


def _torch_device(task: dict):
    import torch

    return torch.device("cuda" if task["device"] == "gpu" else "cpu")


def _torch_dtype(task: dict):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[task["model"]["dtype"]]


def torch_generate(model, prompt: list[int], n: int, device, before: Callable[[], None] | None = None) -> dict:
    """Greedy decode of exactly n new tokens, timed by a logits processor after every forward."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    cuda = device.type == "cuda"

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if cuda:
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    gen = copy.deepcopy(model.generation_config)
    gen.eos_token_id, gen.do_sample, gen.max_new_tokens, gen.min_new_tokens = None, False, n, None
    gen.temperature = gen.top_p = gen.top_k = None
    gen.pad_token_id = 0
    stamps = Stamps()
    ids = torch.tensor([prompt], device=device)
    if before is not None:
        before()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, generation_config=gen, logits_processor=LogitsProcessorList([stamps]))
    ts = stamps.times
    return {"token_ids": out[0, len(prompt):].tolist(), "ttft_s": ts[0] - t,
            "decode_tokens_per_s": (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else 0.0,
            "device_bytes_peak": int(torch.cuda.max_memory_allocated(device)) if cuda else None}


_TRACES: dict[str, common.RoutingTrace] = {}


def _trace_or_none(task) -> common.RoutingTrace | None:
    path = task.get("replay")
    if not path:
        return None
    if path not in _TRACES:
        _TRACES[path] = common.RoutingTrace.read(path)
    return _TRACES[path]


def _measure_modes(task, model, system, budget, deadline, kind, emit, extra_fn=None, before_fn=None,
                   n_new=None, record_routing=False):
    """Warm-up and repeats of `model` in each routing mode; one record per mode."""
    from torch_lru import install_replay, moe_layers

    device = _torch_device(task)
    trace = _trace_or_none(task)
    n_new = n_new or task["new_tokens"]
    for mode in task["modes"]:
        if not deadline.fits(kind):
            emit(_skip(task, system, budget, mode, "time limit"))
            continue
        t0 = time.time()
        undo, clock, hooks, routing = None, None, [], {}
        try:
            if mode == "replay":
                clock, undo = install_replay(model, trace)
            elif record_routing:
                for l, layer in moe_layers(model).items():
                    def hook(_m, args, output, l=l):
                        if args[0].reshape(-1, args[0].shape[-1]).shape[0] == 1:  # decode steps only
                            routing.setdefault(l, []).append(sorted(set(output[2][0].tolist())))
                    hooks.append(layer.mlp.gate.register_forward_hook(hook))

            def before():
                routing.clear()
                if clock is not None:
                    clock.reset()
                if before_fn is not None:
                    before_fn()

            torch_generate(model, task["prompt"], task["warmup_tokens"], device, before)
            runs = []
            for _ in range(task["repeats"]):
                r = torch_generate(model, task["prompt"], n_new, device, before)
                r.update(extra_fn() if extra_fn else {})
                runs.append(r)
            rec = _record(task, system, budget, mode, status="ok", new_tokens=n_new, repeats=len(runs),
                          **_summarise_runs(runs))
            if record_routing and mode == "router":
                rec["decode_routing"] = {str(l): seq for l, seq in routing.items()}
            emit(rec)
        except Exception as exc:
            emit(_error(task, system, budget, mode, exc))
        finally:
            for h in hooks:
                h.remove()
            if undo is not None:
                undo()
            deadline.done(kind, time.time() - t0)


def worker_reference(task: dict, emit: Callable[[dict], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    deadline = Deadline(task["deadline"])
    device = _torch_device(task)
    try:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(task["model"]["hf_dir"], dtype=_torch_dtype(task)).to(device).eval()
        load_s = time.perf_counter() - t
    except Exception as exc:
        for mode in task["modes"]:
            emit(_error(task, "transformers[resident]", None, mode, exc))
        return
    _measure_modes(task, model, "transformers[resident]", None, deadline, "reference", emit,
                   extra_fn=lambda: {"load_s": load_s, "bytes_h2d_per_token": 0.0}, record_routing=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def worker_torch_lru(task: dict, emit: Callable[[dict], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from torch_lru import ExpertOffload

    deadline = Deadline(task["deadline"])
    device = _torch_device(task)
    try:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(task["model"]["hf_dir"], dtype=_torch_dtype(task)).eval()
        offload = ExpertOffload(model, task["budgets"][0]["slots"], device, prefetch=True)
        load_s = time.perf_counter() - t
    except Exception as exc:
        for budget in task["budgets"]:
            for prefetch in task["prefetch"]:
                for mode in task["modes"]:
                    emit(_error(task, f"torch_lru[{'prefetch' if prefetch else 'no-prefetch'}]", budget, mode, exc))
        return

    def counters() -> dict:
        d = offload.decode
        return {"bytes_h2d_per_token": d.bytes_h2d / max(d.tokens, 1), "hit_rate": d.hits / max(d.hits + d.misses, 1),
                "cache_hits": d.hits, "cache_misses": d.misses,
                "prefetch_precision": d.predicted_used / max(d.predicted, 1) if offload.prefetch else None,
                "prefetch_recall": d.predicted_used / max(d.predicted_needed, 1) if offload.prefetch else None,
                "prefill_bytes_h2d": offload.prefill.bytes_h2d, "load_s": load_s,
                "host_expert_bytes": offload.host_bytes()}

    for prefetch in task["prefetch"]:
        for budget in task["budgets"]:
            system = f"torch_lru[{'prefetch' if prefetch else 'no-prefetch'}]"
            try:
                offload.set_slots(budget["slots"])
                offload.prefetch = prefetch
            except Exception as exc:
                for mode in task["modes"]:
                    emit(_error(task, system, budget, mode, exc))
                continue
            _measure_modes(task, model, system, budget, deadline, "torch_lru", emit, extra_fn=counters,
                           before_fn=offload.reset_counters, record_routing=budget is task["budgets"][0])


def _offloaded_bytes(model) -> tuple[int, dict]:
    """Bytes of the parameters accelerate keeps off the main device (moved on every forward)."""
    dmap = dict(getattr(model, "hf_device_map", {}) or {})
    main = {v for v in dmap.values() if v not in ("cpu", "disk")} or {"cpu"}
    off = [k for k, v in dmap.items() if v not in main]
    total = 0
    for name, p in model.named_parameters():
        if any(k == "" or name == k or name.startswith(k + ".") for k in off):  # "" is the whole model
            total += p.numel() * p.element_size()
    return total, dmap


def worker_accelerate(task: dict, emit: Callable[[dict], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    deadline = Deadline(task["deadline"])
    device = _torch_device(task)
    gpu = device.type == "cuda"
    for budget in task["budgets"]:
        if not deadline.fits("accelerate"):
            for mode in task["modes"]:
                emit(_skip(task, "accelerate", budget, mode, "time limit"))
            continue
        model, offload_dir = None, None
        t0 = time.time()
        try:
            t = time.perf_counter()
            if gpu:
                max_memory = {0: int(budget["device_budget_bytes"]), "cpu": int(task["host_budget_bytes"])}
                kw = {}
            else:  # the CPU is the main device; what does not fit goes to disk
                max_memory = {"cpu": int(budget["device_budget_bytes"])}
                offload_dir = tempfile.mkdtemp(prefix="accelerate-offload-")
                kw = {"offload_folder": offload_dir}
            model = AutoModelForCausalLM.from_pretrained(task["model"]["hf_dir"], dtype=_torch_dtype(task),
                                                         device_map="auto", max_memory=max_memory, **kw).eval()
            load_s = time.perf_counter() - t
            moved, dmap = _offloaded_bytes(model)
            placement: dict[str, int] = {}
            for v in dmap.values():
                placement[str(v)] = placement.get(str(v), 0) + 1
            extra = {"bytes_h2d_per_token": float(moved), "bytes_h2d_source": "offloaded parameters (moved every forward)",
                     "load_s": load_s, "max_memory": {str(k): v for k, v in max_memory.items()},
                     "placement_counts": placement, "offload_to": "cpu" if gpu else "disk"}
            if gpu and not any(v not in ("cpu", "disk") for v in dmap.values()):
                extra["note"] = "nothing fits on the GPU at this budget: accelerate runs the model on the CPU"
            elif moved == 0:
                extra["note"] = "the whole model fits in this budget (at this depth): accelerate offloads nothing"
            _measure_modes(task, model, "accelerate", budget, deadline, "accelerate_run", emit,
                           extra_fn=lambda: dict(extra), n_new=task["accelerate_new_tokens"])
        except Exception as exc:
            for mode in task["modes"]:
                emit(_error(task, "accelerate", budget, mode, exc))
        finally:
            del model
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
            if offload_dir:
                shutil.rmtree(offload_dir, ignore_errors=True)
            deadline.done("accelerate", time.time() - t0)


def worker_build(task: dict, emit: Callable[[dict], None]) -> None:
    built = common.build_model(task["name"], task["config"], task["workdir"], seed=0, std=task["std"])
    emit({"kind": "build", "status": "ok", "hf_dir": str(built.hf_dir), "jaxmoe_dir": str(built.jaxmoe_dir),
          "build_s": built.build_s})


WORKERS = {"build": worker_build, "bandwidth": worker_bandwidth, "jaxmoe": worker_jaxmoe, "reference": worker_reference,
           "torch_lru": worker_torch_lru, "accelerate": worker_accelerate}


def worker_main(task_path: str) -> None:
    task = json.loads(Path(task_path).read_text())
    with open(task["out"], "a") as f:
        def emit(rec):
            f.write(json.dumps(rec, default=common._json_default) + "\n")
            f.flush()

        WORKERS[task["kind"]](task, emit)


# -- the driver ----------------------------------------------------------------------------------------


def _worker_env(device: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
    else:
        env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "64")
        env.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
    return env



def run_task(task: dict, args, workdir: Path, log: Callable[[str], None]) -> list[dict]:
    """Run one worker (in this process, or a child stopped at its deadline); its records."""
    out = workdir / f"task-{task['kind']}-{time.time_ns()}.jsonl"
    task = dict(task, out=str(out))
    records: list[dict] = []
    if args.inprocess:
        try:
            WORKERS[task["kind"]](task, records.append)
        except Exception as exc:
            records.append({"kind": task["kind"], "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-3000:]})
        return records
    path = workdir / f"task-{time.time_ns()}.json"
    path.write_text(json.dumps(task, default=common._json_default))
    timeout = max(5.0, task["deadline"] - time.time() + args.grace)
    env = _worker_env("cpu" if task["kind"] == "build" else args.device)  # building needs no accelerator
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "stopped at its deadline"
    if out.is_file():
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if proc.returncode != 0:
        tail = "\n".join((output or "").splitlines()[-15:])
        log(f"  worker {task['kind']}: {status}\n{tail}")
        records.append({"kind": task["kind"], "status": "error" if status != "stopped at its deadline" else "stopped",
                        "reason": status, "output_tail": tail[-3000:], "model": task.get("model", {}).get("name")})
    return records


def _prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, min(vocab, 32000), n).tolist()


def _budgets(config, fractions: list[float], kv_length: int) -> list[dict]:
    from jaxmoe.offload import plan as planning

    out = []
    for f in fractions:
        plan = planning.plan_from_budget(config, expert_budget=f, kv_length=kv_length)
        fp = planning.footprint(config, plan)
        out.append({"expert_budget": f, "slots": plan.layers[0].slots, "device_budget_bytes": fp["total"],
                    "footprint": fp})
    return out


def _schedules_for(config, files: list[str]) -> tuple[list[str], list[str]]:
    from jaxmoe.offload import plan as planning

    ok, notes = [], []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{f}: unreadable ({exc})")
            continue
        if doc.get("model") == planning.model_identity(config):
            ok.append(str(Path(f).resolve()))
        else:
            notes.append(f"{f}: planned for another model or depth; not run on this one")
    return ok, notes


def _split(now: float, end: float, weights: list[float]) -> float:
    """Deadline of the first of `weights` when [now, end] is shared in proportion."""
    return now + max(0.0, end - now) * weights[0] / sum(weights)


def _steps(args, budgets: list[dict], schedules: list[str]) -> list[tuple[str, float, dict]]:
    """(name, share of the model's time, task fields) in order. jaxmoe runs one process per budget:
    its peak device memory is a process-lifetime figure, and compilation is per budget anyway."""
    first = "lru" if "lru" in args.policies else args.policies[0]
    core = [{"policy": first, "prefetch": True}, {"policy": first, "prefetch": False}]
    rest = [{"policy": p, "prefetch": f} for p in args.policies if p != first for f in (True, False)]
    steps = []
    if "torch_lru" in args.systems:
        steps.append(("torch_lru", STEP_WEIGHTS["torch_lru"],
                      dict(kind="torch_lru", prefetch=[True, False] if args.torch_no_prefetch else [True])))
    if "jaxmoe" in args.systems:
        steps += [(f"jaxmoe_core@{b['expert_budget']:g}", STEP_WEIGHTS["jaxmoe_core"] / len(budgets),
                   dict(kind="jaxmoe", variants=core, budgets=[b])) for b in budgets]
    if "accelerate" in args.systems:
        steps.append(("accelerate", STEP_WEIGHTS["accelerate"], dict(kind="accelerate")))
    if "reference" in args.systems:
        steps.append(("reference", STEP_WEIGHTS["reference"], dict(kind="reference", repeats=args.reference_repeats)))
    if "jaxmoe" in args.systems:
        steps += [(f"jaxmoe_rest@{b['expert_budget']:g}", STEP_WEIGHTS["jaxmoe_rest"] / len(budgets),
                   dict(kind="jaxmoe", variants=rest, budgets=[b])) for b in budgets if rest]
        if schedules:
            steps.append(("jaxmoe_schedule", STEP_WEIGHTS["jaxmoe_rest"] / len(budgets),
                          dict(kind="jaxmoe", variants=[{"schedule": f} for f in schedules], budgets=[])))
    return steps


def run_model(name: str, spec: tuple, args, doc: dict, model_end: float, workdir: Path, trace, log) -> None:
    hf_cfg, layers, _ = spec
    layers = args.layers or layers
    config_dict = common.hf_config(hf_cfg, layers)
    full_layers = common.hf_config(hf_cfg)["num_hidden_layers"]
    std = 0.15 if args.scale == "smoke" else 0.02
    config = common.jaxmoe_config(config_dict)
    from jaxmoe.models.transformer import param_count

    nbytes = param_count(config) * np.dtype(config.jnp_dtype).itemsize
    meta = {"name": name, "preset": hf_cfg if isinstance(hf_cfg, str) else None,
            "layers": config_dict["num_hidden_layers"], "full_layers": full_layers, "weights": f"random normal, std {std}",
            "checkpoint_bytes": nbytes, "expert_bytes": config.expert_bytes(), "num_experts": config.num_experts,
            "moe_layer_ids": list(config.moe_layer_ids), "top_k": config.top_k, "dtype": config.dtype,
            "total_expert_bytes": len(config.moe_layer_ids) * config.num_experts * config.expert_bytes()}
    if config_dict["num_hidden_layers"] < full_layers:
        meta["depth_cut"] = (f"{config_dict['num_hidden_layers']} of {full_layers} layers: host memory, the pinned-host "
                             "limit, disk and the time limit; per-token time and bytes scale with depth")
    doc["models"][name] = meta
    need = 2 * nbytes / (args.build_gb_per_s * 1e9) + 30.0  # writing, converting, and a first measurement
    if time.time() + need > model_end:
        meta["error"] = f"skipped: building needs about {need:.0f}s, {model_end - time.time():.0f}s left"
        log(f"[{name}] {meta['error']}")
        return
    log(f"[{name}] building a random checkpoint ({config_dict['num_hidden_layers']} of {full_layers} layers, "
        f"{nbytes / 1e9:.1f} GB)")
    # In a child process on a GPU run, so a build slower than expected is stopped at the model's deadline.
    build = run_task({"kind": "build", "name": name, "config": config_dict, "workdir": str(workdir / "models"),
                      "std": std, "deadline": model_end - 10.0}, args, workdir, log)
    built = next((r for r in build if r.get("kind") == "build" and r.get("status") == "ok"), None)
    if built is None:
        meta["error"] = f"build failed or stopped: {build}"
        log(f"[{name}] {meta['error']}")
        if not args.keep_checkpoints:
            for partial in (workdir / "models").glob(f"{name}-*"):
                shutil.rmtree(partial, ignore_errors=True)
        return
    built = common.SyntheticModel(name, Path(built["hf_dir"]), Path(built["jaxmoe_dir"]), config_dict, built["build_s"])
    meta["build_s"] = built.build_s
    kv_length = max(256, 1 << (args.prompt_tokens + args.new_tokens - 1).bit_length())
    budgets = _budgets(config, args.budgets, kv_length)
    meta["budgets"] = budgets
    modes = ["router"]
    if trace is not None and config.top_k == trace.top_k and config.num_experts >= trace.num_experts:
        modes.append("replay")
    meta["routing_modes"] = modes
    schedules, meta["schedule_notes"] = _schedules_for(config, args.schedule)
    base = {"model": {"name": name, "hf_dir": str(built.hf_dir), "jaxmoe_dir": str(built.jaxmoe_dir), "dtype": config.dtype},
            "device": args.device, "modes": modes, "replay": str(args.replay) if "replay" in modes else None,
            "prompt": _prompt(config.vocab_size, args.prompt_tokens), "new_tokens": args.new_tokens,
            "warmup_tokens": args.warmup_tokens, "repeats": args.repeats, "kv_length": kv_length,
            "budgets": budgets, "accelerate_new_tokens": args.accelerate_new_tokens,
            "host_budget_bytes": args.host_budget_gib * 2**30}
    steps = _steps(args, budgets, schedules)
    for i, (step, _, extra) in enumerate(steps):
        deadline = _split(time.time(), model_end, [w for _, w, _ in steps[i:]])
        log(f"[{name}] {step}: until +{deadline - time.time():.0f}s")
        t = time.time()
        records = run_task(dict(base, deadline=deadline, **extra), args, workdir, log)
        doc["records"].extend(records)
        doc["steps"].append({"model": name, "step": step, "seconds": time.time() - t, "records": len(records)})
        refresh(doc, args)
    if not args.keep_checkpoints:
        shutil.rmtree(built.hf_dir.parent, ignore_errors=True)


# -- results ---------------------------------------------------------------------------------------


SYSTEM_FIELDS = ("decode_tokens_per_s", "ttft_s", "bytes_h2d_per_token", "device_bytes_peak", "hit_rate",
                 "prefetch_precision", "prefetch_recall", "device_bytes_peak_source", "device_bytes_planned",
                 "decode_tokens_per_s_runs", "new_tokens", "cache_hits", "cache_misses", "load_s",
                 "prefill_bytes_h2d", "max_memory", "placement_counts", "offload_to", "bytes_h2d_source",
                 "warmup_compile_s", "compile_s", "repeats", "schedule", "note")


def _peak_bandwidth(doc: dict) -> float | None:
    bw = doc.get("h2d") or {}
    rows = [r["gb_per_s"] for r in bw.get("jax", []) + bw.get("torch", [])]
    return max(rows) * 1e9 if rows else None


def _matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarise(doc: dict) -> list[dict]:
    """One entry per (model, routing, budget): systems, floors, ratios."""
    bw = _peak_bandwidth(doc)
    trace = common.RoutingTrace.read(doc["settings"]["replay"]) if doc["settings"].get("replay") else None
    out = []
    recs = [r for r in doc["records"] if "system" in r]
    for name, meta in doc["models"].items():
        for mode in meta.get("routing_modes", []):
            mine = [r for r in recs if r["model"] == name and r["routing"] == mode]
            ref = next((r for r in mine if r["system"] == "transformers[resident]" and r.get("status") == "ok"), None)
            if mode == "replay" and trace is not None:
                config_layers = meta.get("moe_layer_ids") or list(range(meta["layers"]))
                start, n = doc["settings"]["prompt_tokens"], doc["settings"]["new_tokens"] - 1
                decode_routing = {l: trace.layer_sequence(l, start, n) for l in config_layers}
                routing_source = f"trace positions {start}..{start + n - 1}"
            else:
                decode_routing, routing_source = None, None
                for r in sorted((r for r in mine if r.get("decode_routing")),
                                key=lambda r: r["system"] != "transformers[resident]"):
                    decode_routing = {int(l): seq for l, seq in r["decode_routing"].items()}
                    routing_source = f"recorded from {r['system']}"
                    break
            budgets = sorted({r["expert_budget"] for r in mine if r["expert_budget"] is not None})
            for b in budgets:
                at = [r for r in mine if r["expert_budget"] == b]
                bmeta = next((x for x in meta.get("budgets", []) if abs(x["expert_budget"] - b) < 1e-9), {})
                entry = {"device": doc["machine"]["device"], "model": name, "routing": mode, "expert_budget": b,
                         "slots_per_layer": bmeta.get("slots"), "device_budget_bytes": bmeta.get("device_budget_bytes"),
                         "systems": {}, "skipped": {}, "errors": {}}
                for r in at:
                    sysname = r["system"]
                    if r.get("status") == "ok":
                        s = {k: r[k] for k in SYSTEM_FIELDS if k in r}
                        if ref is not None:
                            n_cmp = min(len(ref["token_ids"]), len(r["token_ids"]))
                            s["tokens_compared"] = n_cmp
                            s["tokens_match_reference"] = _matching_prefix(ref["token_ids"], r["token_ids"])
                        if bw and r.get("bytes_h2d_per_token"):
                            s["bandwidth_bound_tokens_per_s"] = bw / r["bytes_h2d_per_token"]
                        entry["systems"][sysname] = s
                    elif r.get("status") == "skipped":
                        entry["skipped"][sysname] = r.get("reason")
                    else:
                        entry["errors"][sysname] = r.get("reason")
                slots = bmeta.get("slots")
                if decode_routing and slots:
                    o = common.oracle_traffic(decode_routing, slots, meta["expert_bytes"], warm="best")
                    o["routing_source"] = routing_source
                    o["tokens_per_s"] = (bw / o["bytes_per_token"] if bw and o["bytes_per_token"] > 0 else None)
                    entry["oracle"] = o
                    entry["bandwidth_floor_tokens_per_s"] = o["tokens_per_s"]
                    if o["tokens_per_s"]:
                        entry["gap_to_oracle"] = {k: v["decode_tokens_per_s"] / o["tokens_per_s"]
                                                  for k, v in entry["systems"].items()}
                if bw:
                    entry["h2d_gb_per_s"] = bw / 1e9
                entry["ratios"] = _ratios(entry)
                out.append(entry)
            if ref is not None:
                out.append({"device": doc["machine"]["device"], "model": name, "routing": mode, "expert_budget": None,
                            "reference": True, "systems": {"transformers[resident]": {
                                k: ref[k] for k in SYSTEM_FIELDS if k in ref}}})
    return out


RATIO_BASES = {"accelerate": "accelerate", "torch_lru": "torch_lru[prefetch]",
               "torch_lru[no-prefetch]": "torch_lru[no-prefetch]"}


def _ratios(entry: dict) -> dict[str, float]:
    """jaxmoe's tokens/s over each baseline's: "jaxmoe" is its best variant at this budget (named in
    `jaxmoe_best`), "jaxmoe[lru,prefetch]" the default one."""
    systems = entry["systems"]
    jx = {k: v for k, v in systems.items() if k.startswith("jaxmoe[") and "schedule" not in k}
    if not jx:
        return {}
    entry["jaxmoe_best"] = max(jx, key=lambda k: jx[k]["decode_tokens_per_s"])
    out = {}
    for label, key in (("jaxmoe", entry["jaxmoe_best"]), ("jaxmoe[lru,prefetch]", "jaxmoe[lru,prefetch]")):
        for short, base in RATIO_BASES.items():
            if key in jx and base in systems and systems[base]["decode_tokens_per_s"]:
                out[f"{label}/{short}"] = jx[key]["decode_tokens_per_s"] / systems[base]["decode_tokens_per_s"]
    return out


def markdown(doc: dict) -> str:
    dev = doc["machine"]["device"]
    s = doc["settings"]
    lines = [f"Batch 1, greedy, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens "
             f"(accelerate {s['accelerate_new_tokens']}); {dev}; random weights"
             + ("; CPU: correctness only, not speed" if doc["machine"]["platform"] == "cpu" else ""),
             "",
             "| model | routing | expert budget | system | decode tok/s | TTFT s | H2D MB/token | device peak GiB | of oracle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in doc["results"]:
        model = e["model"]
        meta = doc["models"].get(model, {})
        label = f"{model} ({meta.get('layers')}/{meta.get('full_layers')} layers)"
        budget = "resident" if e.get("reference") else f"{e['expert_budget']:.0%}"
        for sysname, v in e["systems"].items():
            peak = v.get("device_bytes_peak")
            gap = (e.get("gap_to_oracle") or {}).get(sysname)
            lines.append(f"| {label} | {e['routing']} | {budget} | {sysname} | {v['decode_tokens_per_s']:.2f} | "
                         f"{v['ttft_s']:.3f} | {v.get('bytes_h2d_per_token', 0) / 1e6:.1f} | "
                         f"{'-' if peak is None else f'{peak / 2**30:.2f}'} | {'-' if gap is None else f'{gap:.2f}'} |")
        o = e.get("oracle")
        if o:
            speed = f"{o['tokens_per_s']:.2f}" if o.get("tokens_per_s") else "unbounded (moves nothing)"
            lines.append(f"| {label} | {e['routing']} | {budget} | oracle (Belady, perfect prediction) | "
                         f"{speed} | - | {o['bytes_per_token'] / 1e6:.1f} | - | 1.00 |")
    bw = _peak_bandwidth(doc)
    lines += ["", "Decode tok/s: steady state after the first token, median of "
              f"{s['repeats']} runs after a warm-up. H2D MB/token: host->device bytes per decode token. "
              "Oracle: a Belady cache of the same size with perfect prediction over the same decode routing, "
              f"moving its bytes at the measured peak {'-' if bw is None else f'{bw / 1e9:.1f}'} GB/s with no compute; "
              "'of oracle' is a system's tok/s over the oracle's."]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(e["model"], e["routing"]) for e in doc["results"] if not e.get("reference")})
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, mode) in zip(axes[0], groups):
        entries = sorted((e for e in doc["results"] if e["model"] == model and e["routing"] == mode and not e.get("reference")),
                         key=lambda e: e["expert_budget"])
        names = sorted({k for e in entries for k in e["systems"]})
        for sysname in names:
            pts = [(e["expert_budget"], e["systems"][sysname]["decode_tokens_per_s"]) for e in entries if sysname in e["systems"]]
            ax.plot(*zip(*pts), marker="o", label=sysname)
        oracle = [(e["expert_budget"], e["oracle"]["tokens_per_s"]) for e in entries
                  if e.get("oracle") and e["oracle"].get("tokens_per_s")]
        if oracle:
            ax.plot(*zip(*oracle), "k--", label="oracle floor (Belady)")
        ax.set_title(f"{model}, {mode} routing", fontsize=9)
        ax.set_xlabel("expert budget (share of expert bytes)")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{doc['machine']['device']}" + (" (CPU: correctness run, not speed)" if doc["machine"]["platform"] == "cpu" else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def problems(doc: dict) -> list[str]:
    """One line per measurement that did not happen: skipped for time, failed, or a stopped worker."""
    out = []
    for r in doc["records"]:
        if r.get("status", "ok") != "ok":
            what = r.get("system") or r.get("kind")
            where = f"{r.get('model')}/{r.get('routing')}/{r.get('expert_budget')}" if "system" in r else str(r.get("model"))
            out.append(f"{what} {where}: {r.get('status')}: {r.get('reason')}")
    out += [f"{name}: {m['error']}" for name, m in doc["models"].items() if m.get("error")]
    return out


def refresh(doc: dict, args) -> None:
    bw = _peak_bandwidth(doc)
    doc["h2d_peak_gb_per_s"] = None if bw is None else bw / 1e9
    doc["problems"] = problems(doc)
    doc["results"] = summarise(doc)
    doc["markdown"] = markdown(doc)
    doc["elapsed_s"] = time.time() - doc["_start"]
    common.write_json(args.out, {k: v for k, v in doc.items() if not k.startswith("_")})


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), required=True)
    ap.add_argument("--scale", choices=("full", "smoke"), default=None,
                    help="full: real shapes (default on gpu); smoke: tiny models (default on cpu)")
    ap.add_argument("--models", default=None, help="comma-separated model names (default: all of the scale)")
    ap.add_argument("--layers", type=int, default=None, help="depth of every model (default: per model, see GPU_MODELS)")
    ap.add_argument("--budgets", default=None,
                    help="expert budgets, shares of all expert bytes, in the order run (default 0.5,0.25,0.75; smoke 0.25,0.5)")
    ap.add_argument("--policies", default=None, help="jaxmoe policies (default: lru,lfu,lcp,static; smoke: lru,lcp)")
    ap.add_argument("--systems", default="reference,torch_lru,jaxmoe,accelerate",
                    help="which of reference,torch_lru,jaxmoe,accelerate to run")
    ap.add_argument("--torch-no-prefetch", action=argparse.BooleanOptionalAction, default=None,
                    help="also run torch_lru without speculative loading, after its prefetch runs (default: smoke only)")
    ap.add_argument("--replay", default=None,
                    help=f"routing trace for replay, 'none' to skip (default: {_TRACE} when it exists)")
    ap.add_argument("--schedule", action="append", default=[], help="a jaxmoe planner schedule (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--accelerate-new-tokens", type=int, default=None)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--reference-repeats", type=int, default=None,
                    help="repeats of transformers[resident], the token reference (default gpu 1)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default gpu 560)")
    ap.add_argument("--grace", type=float, default=15.0, help="seconds a worker may overrun its share before it is stopped")
    ap.add_argument("--build-gb-per-s", type=float, default=0.25,
                    help="assumed checkpoint write+convert speed, to skip a model that cannot be built in its time")
    ap.add_argument("--host-budget-gib", type=float, default=None,
                    help="accelerate's max_memory['cpu'] on a GPU run (default 75%% of host memory)")
    ap.add_argument("--workdir", default=None, help="checkpoints and worker files (default: a temporary directory)")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--inprocess", action=argparse.BooleanOptionalAction, default=None,
                    help="run workers in this process (default on cpu) instead of one child process each")
    ap.add_argument("--tag", default=None, help="output name suffix (cpu default: smoke)")
    ap.add_argument("--out", default=None, help="output JSON path (default bench/results/baselines_<device>[_<tag>].json)")
    args = ap.parse_args(argv)
    gpu = args.device == "gpu"
    args.scale = args.scale or ("full" if gpu else "smoke")
    smoke = args.scale == "smoke"
    args.budgets = [float(x) for x in (args.budgets or ("0.25,0.5" if smoke else "0.5,0.25,0.75")).split(",")]
    args.policies = [p for p in (args.policies or ("lru,lcp" if smoke else ",".join(POLICIES))).split(",") if p]
    for p in args.policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.prompt_tokens = args.prompt_tokens or (24 if smoke else 128)
    args.new_tokens = args.new_tokens or (12 if smoke else 128)
    args.accelerate_new_tokens = args.accelerate_new_tokens or (args.new_tokens if smoke or not gpu else 8)
    args.repeats = args.repeats or (1 if smoke else 3)
    args.reference_repeats = args.reference_repeats or (args.repeats if smoke or not gpu else 1)
    args.time_limit = args.time_limit or (560.0 if gpu else 3600.0)
    args.inprocess = (not gpu) if args.inprocess is None else args.inprocess
    args.torch_no_prefetch = smoke if args.torch_no_prefetch is None else args.torch_no_prefetch
    if args.host_budget_gib is None:
        host = common.machine_info("cpu")["host_memory_bytes"] or 64 * 2**30
        args.host_budget_gib = round(0.75 * host / 2**30, 1)
    if args.replay is None:
        args.replay = DEFAULT_TRACE
    elif args.replay == "none":
        args.replay = None
    elif not Path(args.replay).is_file():
        raise SystemExit(f"--replay {args.replay}: no such file")
    else:
        args.replay = Path(args.replay)
    table = SMOKE_MODELS if smoke else GPU_MODELS
    names = args.models.split(",") if args.models else list(table)
    for n in names:
        if n not in table:
            raise SystemExit(f"unknown model {n!r} at scale {args.scale}; choose from {', '.join(table)}")
    args.models = names
    args.tag = args.tag if args.tag is not None else ("smoke" if smoke else None)
    suffix = f"_{args.tag}" if args.tag else ""
    args.out = Path(args.out) if args.out else common.RESULTS / f"baselines_{args.device}{suffix}.json"
    return args


def main(argv=None) -> dict:
    start = time.time()
    args = parse_args(argv)
    if args.device == "gpu" and not args.inprocess:
        import jax

        # The driver only writes and converts checkpoints: keep its JAX off the GPU (no preallocation).
        jax.config.update("jax_platforms", "cpu")
    end = start + args.time_limit

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="jaxmoe-baselines-"))
    workdir.mkdir(parents=True, exist_ok=True)
    trace = common.RoutingTrace.read(args.replay) if args.replay else None
    doc: dict[str, Any] = {
        "benchmark": "baselines",
        "correctness_only": args.device == "cpu" or args.scale == "smoke",
        "machine": common.machine_info(args.device),
        "versions": common.versions(),
        "settings": {
            "device": args.device, "scale": args.scale, "batch": 1, "sampling": "greedy",
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "accelerate_new_tokens": args.accelerate_new_tokens, "warmup_tokens": args.warmup_tokens,
            "repeats": args.repeats, "budgets": args.budgets, "policies": args.policies,
            "systems": args.systems, "replay": str(args.replay) if args.replay else None,
            "replay_tokens": trace.num_tokens if trace else None, "schedules": args.schedule,
            "time_limit_s": args.time_limit, "inprocess": args.inprocess,
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB",
                                                   "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")},
            "worker_env": {k: _worker_env(args.device).get(k) for k in ("XLA_FLAGS", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")},
            "conventions": {
                "decode_tokens_per_s": "steady state: (new tokens - 1) / (last token time - first token time)",
                "bytes_h2d_per_token": "host->device bytes during decode / decode steps (demand + prefetch); "
                                       "accelerate: its offloaded parameter bytes, all moved every forward",
                "oracle": "Belady eviction, perfect prediction, same slots per layer, best initial cache, over the "
                          "decode routing actually used; tokens_per_s = peak bandwidth / its bytes per token",
                "gap_to_oracle": "system tokens/s / oracle tokens/s",
                "replay": "position p -> trace token p mod T; model layer l -> trace layer l mod L_trace",
            },
        },
        "models": {}, "records": [], "steps": [], "h2d": None, "_start": start,
    }
    log(f"device: {doc['machine']['device']}; writing {args.out}")
    if trace is None:
        log("no routing trace: replay mode is off (--replay FILE turns it on)")
    refresh(doc, args)

    sizes = [1, 4] if args.scale == "smoke" else [16, 64, 256, 1024]
    bw = run_task({"kind": "bandwidth", "device": args.device, "sizes_mb": sizes, "deadline": start + 60}, args, workdir, log)
    doc["h2d"] = next((r for r in bw if r.get("kind") == "bandwidth" and "jax" in r), {"error": bw})
    peak = _peak_bandwidth(doc)
    log(f"host->device: {peak / 1e9 if peak else float('nan'):.1f} GB/s peak")

    table = SMOKE_MODELS if args.scale == "smoke" else GPU_MODELS
    for i, name in enumerate(args.models):
        weights = [table[n][2] for n in args.models[i:]]
        model_end = _split(time.time(), end, weights)
        run_model(name, table[name], args, doc, model_end, workdir, trace, log)
    refresh(doc, args)
    png = plot(doc, args.out.with_suffix(".png"))
    print(doc["markdown"])
    log(f"wrote {args.out}" + (f" and {png}" if png else ""))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a child process started by run_task
        worker_main(sys.argv[2])
    else:
        main()
