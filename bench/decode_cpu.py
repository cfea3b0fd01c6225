"""Steady-state greedy decode speed on CPU: jaxmoe against transformers' own `generate`.

    python bench/decode_cpu.py                        # demo model, random ~110M and ~140M Mixtral shapes
    python bench/decode_cpu.py --models random        # only the random ~110M Mixtral-shaped model
    python bench/decode_cpu.py --models demo,random --new-tokens 128 --repeats 5

Both sides get the same weights, the same prompt token ids and the same number of new tokens,
greedy, with no early stop (transformers: `eos_token_id=None` in a copied generation config;
jaxmoe: the engine's stop-token set emptied). Only decode steps are timed on both sides:

* jaxmoe: `Engine.generate(...).decode_tokens_per_s` (time from the first token, which prefill
  produces, to the last, compile time subtracted) after one warm-up request; median over repeats.
* transformers: a LogitsProcessor stamps the clock after every forward; decode time is last stamp
  minus first (the first stamp follows prefill), i.e. N-1 decode steps, as on the jaxmoe side.
  Run with `torch.set_num_threads(2)` and with 1 thread (--torch-threads), each with both of
  transformers' CPU expert implementations (`grouped_mm`, its default, and `eager`, a loop over
  the hit experts); the fastest configuration is the baseline. (With other processes busy on this
  2-core machine, torch at 2 threads can slow down 20x, so 1 thread keeps the baseline honest.)
  Repeats alternate between all runners so background load hits both sides alike.

Models: `random` is a seeded random MixtralConfig (8 layers, hidden 512, 8 experts of
intermediate 1024, top-2, 8 heads, 4 kv heads, float32) with the demo's vocabulary size, 4096:
111M parameters, as near 100M as these dimensions allow (the layers alone hold 107M).
`random-v32k` is the same with Mixtral's own 32000-token untied vocabulary (140M; its LM head is a
third of the bytes a decode step reads). Both are built with transformers and converted with
`jaxmoe.convert.convert`; `demo` is the bundled model at jaxmoe/demo/model/.

Also measured, to tell what limits decode: this machine's memory bandwidth (numpy sum and copy,
one and two threads, on an array larger than the L3 and on one the size of a decode step's
weights), the weight bytes one decode step must read (non-expert weights, the top-k experts of
each MoE layer, one embedding row, the LM head; from the config) and hence the GB/s each side
achieves, and jitted XLA vs torch float32 matrix-vector products of an expert's and the LM
head's shapes, one call at a time (dispatch included) and streamed over a stack of weights
larger than the caches; and the routed-expert part of a decode step alone in three formulations
(gather + einsum and dynamic slices, both from stacked [E, I, D] arrays, which jaxmoe used
before, and jaxmoe's lax.switch over per-expert buffers).
Writes bench/results/decode_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "decode_cpu.json"
TORCH_THREADS = 2
RANDOM = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
RANDOM_SEED = 0
RANDOM_MODELS = {"random": RANDOM, "random-v32k": {**RANDOM, "vocab_size": 32000}}
MODELS = ("demo", *RANDOM_MODELS)


# ------------------------------------------------------------------------------------ machine


def machine_info() -> dict:
    import common

    cpu = common.cpu_model()
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = (index / "size").read_text().strip()
        except OSError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "caches_per_core_or_shared": caches,
        "platform": platform.platform(),
    }


def versions() -> dict:
    import flax
    import jax
    import jaxlib
    import torch
    import transformers

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _best(fn, repeats: int) -> float:
    """Fastest of `repeats` timings of fn() (bandwidth: the least disturbed run)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bandwidth(sizes: dict[str, int], repeats: int = 5) -> dict:
    """GB/s (1e9 bytes/s) of numpy reads (sum) and copies (read + write counted) per array size."""
    out = {}
    for label, nbytes in sizes.items():
        n = nbytes // 4
        a = np.ones(n, np.float32)
        b = np.empty_like(a)
        halves = [(a[: n // 2], b[: n // 2]), (a[n // 2:], b[n // 2:])]
        pool = ThreadPoolExecutor(2)
        res = {"bytes": int(a.nbytes)}
        res["read_1thread_GBps"] = a.nbytes / _best(lambda: a.sum(), repeats) / 1e9
        res["copy_1thread_GBps"] = 2 * a.nbytes / _best(lambda: np.copyto(b, a), repeats) / 1e9
        res["read_2threads_GBps"] = a.nbytes / _best(
            lambda: list(pool.map(lambda h: h[0].sum(), halves)), repeats) / 1e9
        res["copy_2threads_GBps"] = 2 * a.nbytes / _best(
            lambda: list(pool.map(lambda h: np.copyto(h[1], h[0]), halves)), repeats) / 1e9
        pool.shutdown()
        out[label] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
        del a, b, halves
    return out


# -------------------------------------------------------------------------------------- matvec


def _median_call_s(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matvec_bench(d: int, i: int, v: int, torch_threads: list[int], stack_bytes: int = 256 << 20) -> dict:
    """Float32 vector-matrix products of one expert's and the LM head's shapes, XLA vs torch.

    `call_us`: one jitted (or eager torch) call at a time on one cache-warm weight, dispatch
    included. `streamed_GBps`: weight bytes per second over `stack_bytes` of distinct matrices
    (beyond the L2), XLA as one jitted function over a list of separate arrays (no slicing, so no
    copies), torch as a Python loop of the same products.
    """
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    # (name, x shape, weight shape, "t": y = x @ w.T | "n": y = x @ w)
    cases = [
        ("expert gate/up [1,D]x[I,D]^T (x @ w.T)", (1, d), (i, d), "t"),
        ("expert down [1,I]x[I,D] (x @ w)", (1, i), (i, d), "n"),
        ("expert down [1,I]x[D,I]^T (x @ w.T: jaxmoe, torch)", (1, i), (d, i), "t"),
        ("lm_head [1,D]x[D,V] (x @ w)", (1, d), (d, v), "n"),
        ("lm_head [1,D]x[V,D]^T (x @ w.T: jaxmoe, torch)", (1, d), (v, d), "t"),
    ]
    out = {}
    for name, xs, ws, kind in cases:
        x = rng.standard_normal(xs, dtype=np.float32)
        w = rng.standard_normal(ws, dtype=np.float32) * 0.05
        wbytes = w.nbytes

        def prod(a, b):
            return a @ (b.T if kind == "t" else b)

        f = jax.jit(prod)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        jax_s = _median_call_s(lambda: f(jx, jw).block_until_ready(), 200)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        torch_s = {}
        for t in torch_threads:
            torch.set_num_threads(t)
            with torch.inference_mode():
                torch_s[t] = _median_call_s(lambda: prod(tx, tw), 200)

        count = max(3, stack_bytes // wbytes)
        mats = [w + np.float32(0.001 * j) for j in range(count)]

        @jax.jit
        def streamed(xv, ws_):
            total = jnp.float32(0)
            for m in ws_:
                total = total + prod(xv, m)[0, 0]
            return total

        jmats = [jnp.asarray(m) for m in mats]
        jax_stream_s = _median_call_s(lambda: streamed(jx, jmats).block_until_ready(), 5)
        tmats = [torch.from_numpy(m) for m in mats]

        def torch_stream():
            with torch.inference_mode():
                for m in tmats:
                    prod(tx, m)

        torch_stream_s = {}
        for t in torch_threads:
            torch.set_num_threads(t)
            torch_stream_s[t] = _median_call_s(torch_stream, 5)
        out[name] = {
            "weight_bytes": int(wbytes),
            "xla_call_us": round(jax_s * 1e6, 1),
            **{f"torch_{t}thr_call_us": round(torch_s[t] * 1e6, 1) for t in torch_threads},
            "stack_matrices": int(count),
            "xla_streamed_GBps": round(count * wbytes / jax_stream_s / 1e9, 2),
            **{f"torch_{t}thr_streamed_GBps": round(count * wbytes / torch_stream_s[t] / 1e9, 2)
               for t in torch_threads},
        }
        del mats, jmats, tmats
    return out


# The forms one matrix-vector product can take; XLA on CPU streams them at different speeds.
CHAIN_FORMS = {"w @ x, w [r, d]": "wx", "x @ w.T, w [r, d]": "xwt", "x @ w, w [d, r]": "xw"}


def matvec_chain_bench(d: int, sizes_mb=(2, 4), total_bytes: int = 768 << 20) -> dict:
    """What one decode step's chain of dependent matrix-vector products can stream on this CPU.

    Per size and form: float32 matrices of that many MB with one side d, `total_bytes` of distinct
    ones (so reads come from DRAM), multiplied in a chain inside one jitted function (each product
    feeds the next, as layers and experts do); GB/s of weights. Measured with XLA on every core,
    with XLA pinned to one core (a subprocess with its affinity set before jax starts), and with
    numpy (its BLAS, multi-threaded) for comparison.
    """
    out = {"d": d, "sizes_mb": list(sizes_mb), "xla_all_cores_GBps": _chain_xla(d, sizes_mb, total_bytes)}
    out["xla_one_core_GBps"] = json.loads(_on_one_core(
        f"json.dumps(decode_cpu._chain_xla({d}, {list(sizes_mb)}, {total_bytes}))"))
    out["numpy_all_cores_GBps"] = _chain_numpy(d, sizes_mb, total_bytes)
    return out


def _product(form: str, x, w):
    return {"wx": lambda: w @ x, "xwt": lambda: x @ w.T, "xw": lambda: x @ w}[form]()


def _chain_xla(d: int, sizes_mb, total_bytes: int) -> dict:
    import jax
    import jax.numpy as jnp

    result = {}
    for mb in sizes_mb:
        r = (mb << 20) // (4 * d)
        count, k = total_bytes // (r * d * 4), 16
        rng = np.random.default_rng(0)
        mats = [rng.standard_normal((r, d), dtype=np.float32) for _ in range(count)]
        for label, form in CHAIN_FORMS.items():
            ws = [jnp.asarray(m.T.copy() if form == "xw" else m) for m in mats]

            @jax.jit
            def chain(ms, x):
                for m in ms:
                    x = x + 1e-3 * jnp.resize(_product(form, x, m), x.shape)
                return x

            x = jnp.ones((d,), jnp.float32)
            groups = [ws[i:i + k] for i in range(0, count - k + 1, k)]
            chain(groups[0], x).block_until_ready()
            t = time.perf_counter()
            for _ in range(3):
                for g in groups:
                    x = chain(g, x)
            x.block_until_ready()
            result[f"{mb}MB {label}"] = round(3 * len(groups) * k * r * d * 4 / (time.perf_counter() - t) / 1e9, 2)
            del ws, groups
        del mats
    return result


def _chain_numpy(d: int, sizes_mb, total_bytes: int) -> dict:
    result = {}
    for mb in sizes_mb:
        r = (mb << 20) // (4 * d)
        count = total_bytes // (r * d * 4)
        rng = np.random.default_rng(0)
        mats = [rng.standard_normal((r, d), dtype=np.float32) for _ in range(count)]
        x = np.ones((d,), np.float32)
        t = time.perf_counter()
        for _ in range(3):
            for m in mats:
                x = x + 1e-3 * np.resize(m @ x, x.shape)
        result[f"{mb}MB w @ x, w [r, d]"] = round(3 * count * r * d * 4 / (time.perf_counter() - t) / 1e9, 2)
        del mats
    return result


def _experts_gather_einsum(x, weights, ids, gate, up, down):
    """Decode experts from stacked [E, I, D] arrays by gathering [N, k, I, D], then einsums."""
    import jax
    import jax.numpy as jnp

    g, u, d = gate[ids], up[ids], down[ids]
    h = jax.nn.silu(jnp.einsum("nd,nkid->nki", x, g)) * jnp.einsum("nd,nkid->nki", x, u)
    y = jnp.einsum("nki,nkid->nkd", h, d)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _experts_dynamic_slice(x, weights, ids, gate, up, down):
    """Decode experts from stacked [E, I, D] arrays, each (token, expert) pair's matrices taken with
    a dynamic slice (which XLA on CPU copies before each dot)."""
    import jax
    import jax.numpy as jnp

    rows = []
    for t in range(ids.shape[0]):
        acc = jnp.zeros(x.shape[-1:], jnp.float32)
        for j in range(ids.shape[1]):
            g, u, d = (jax.lax.dynamic_index_in_dim(w, ids[t, j], keepdims=False) for w in (gate, up, down))
            acc = acc + weights[t, j] * ((jax.nn.silu(g @ x[t]) * (u @ x[t])) @ d)
        rows.append(acc)
    return jnp.stack(rows).astype(x.dtype)


def expert_path_bench(layers: int, e: int, i: int, d: int, k: int, repeats: int = 15) -> dict:
    """The routed-expert part of one decode step alone (random weights of the model's shapes,
    router-dependent expert choice, layers chained), per formulation: gather + einsum and dynamic
    slices from stacked [E, I, D] arrays (jaxmoe's earlier layouts), and
    jaxmoe.models.moe.experts_selected (lax.switch over per-expert buffers, no copy, gate and up
    as one matrix). Median ms per step and GB/s of the selected experts' bytes. Routing depends
    only on the fixed input, so the same experts are read every call: cache-warm figures, which
    compare the formulations, not the machine's DRAM speed (matvec_chain_bench measures that)."""
    import jax
    import jax.numpy as jnp

    from jaxmoe.models import moe

    rng = np.random.default_rng(0)
    separate = [[tuple(jnp.asarray(rng.standard_normal((i, d), dtype=np.float32) * 0.03) for _ in range(3))
                 for _ in range(e)] for _ in range(layers)]
    stacks = [tuple(jnp.stack(m) for m in zip(*experts)) for experts in separate]
    fused = [[(jnp.concatenate([g, u]), dn.T.copy()) for g, u, dn in experts] for experts in separate]  # jaxmoe's layout
    routers = [jnp.asarray(rng.standard_normal((d, e), dtype=np.float32)) for _ in range(layers)]
    x0 = jnp.asarray(rng.standard_normal((1, d), dtype=np.float32))

    def chain(fn):
        @jax.jit
        def step(x, experts, routers):
            for layer_experts, r in zip(experts, routers):
                xn = x * jax.lax.rsqrt(jnp.mean(x * x) + 1e-6)
                w, ids = moe.route(xn @ r, k, True)
                x = x + fn(xn, w, ids, layer_experts)
            return x
        return step

    selected_gb = layers * k * 3 * i * d * 4 / 1e9
    out = {"shapes": {"layers": layers, "experts": e, "I": i, "D": d, "top_k": k}, "selected_bytes": int(selected_gb * 1e9)}
    ref = chain(moe.experts_dense)(x0, fused, routers)
    for name, fn, experts in (
            ("gather_einsum (stacked)", lambda x, w, ids, st: _experts_gather_einsum(x, w, ids, *st), stacks),
            ("dynamic_slice (stacked)", lambda x, w, ids, st: _experts_dynamic_slice(x, w, ids, *st), stacks),
            ("switch over per-expert buffers (jaxmoe)", moe.experts_selected, fused)):
        f = chain(fn)
        y = f(x0, experts, routers).block_until_ready()
        s_ = _median_call_s(lambda: f(x0, experts, routers).block_until_ready(), repeats)
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        out[name] = {"ms": round(s_ * 1e3, 2), "GBps": round(selected_gb / s_, 2), "max_rel_err_vs_reference": err}
    return out


# -------------------------------------------------------------------------------------- models


def partition_lag(engine, prompt: list[int], steps: int = 48) -> dict:
    """How late XLA's second CPU thread joins a product split over both cores, from a profile of
    `steps` decode steps. XLA runs a large product as a loop split in two: the calling thread
    starts its half and wakes a pool thread for the other; `lag` is the time from the product's
    start to the other thread's start of work (its next `ThreadpoolListener::StartRegion`), during
    which one core streams weights alone. Products: events named `*dot_fusion*` of 20 us or more."""
    import glob

    import jax

    with tempfile.TemporaryDirectory(prefix="xprof-") as tmp:
        jax.profiler.start_trace(tmp)
        t = time.perf_counter()
        r = engine.generate(prompt_ids=prompt, max_new_tokens=steps + 1)
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(sorted(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True))[-1])
    threads = {}
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                threads[line.name] = [(ev.start_ns, ev.duration_ns, ev.name) for ev in line.events]
    lags, dots = [], 0
    for name, events in threads.items():
        others = sorted(s for other, evs in threads.items() if other != name
                        for s, _, n in evs if n == "ThreadpoolListener::StartRegion")
        for start, dur, n in events:
            if "dot_fusion" not in n or dur < 20_000:
                continue
            dots += 1
            joined = next((s for s in others if s >= start), None)
            if joined is not None and joined < start + dur:
                lags.append((joined - start) / 1e3)
    n_steps = len(r.token_ids) - 1
    return {
        "profiled_decode_steps": n_steps,
        "profiled_step_ms": round(1e3 * wall / max(1, len(r.token_ids)), 3),
        "products_per_step": round(dots / max(1, n_steps), 1),
        "products_joined_by_second_thread_per_step": round(len(lags) / max(1, n_steps), 1),
        "lag_us_median": round(statistics.median(lags), 1) if lags else None,
        "lag_us_p90": round(float(np.percentile(lags, 90)), 1) if lags else None,
        "lag_ms_per_step": round(sum(lags) / 1e3 / max(1, n_steps), 3),
        "note": partition_lag.__doc__.split("\n\n")[0].replace("\n", " "),
    }


def one_core_decode(jm_dir: Path, prompt: list[int], n: int, repeats: int = 3) -> float:
    """jaxmoe's decode tok/s with the process pinned to one core (affinity set before jax starts,
    so XLA sizes its thread pool to one): what the second core adds, next to torch's 1 vs 2 threads."""
    return float(_on_one_core(
        f"statistics.median(decode_cpu.JaxmoeRunner(decode_cpu.Path({str(jm_dir)!r}), {prompt!r}, {n})"
        f"._generate().decode_tokens_per_s for _ in range({repeats}))", setup="decode_cpu._quiet()"))


def _on_one_core(expression: str, setup: str = "pass") -> str:
    """Print `expression` (Python, with this module imported as decode_cpu) in a subprocess whose
    affinity is set to one core before jax starts; returns what it printed."""
    import subprocess

    code = (f"import os, sys, json, statistics; os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
            f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import decode_cpu; {setup}; print({expression})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]


def build_random_model(name: str, workdir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(**RANDOM_MODELS[name], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(RANDOM_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = workdir / f"hf-{name}"
    model.save_pretrained(out, safe_serialization=True)
    return out


def prompt_for(name: str, hf_dir: Path, length: int, vocab: int) -> list[int]:
    if name == "demo":
        import json as json_module

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir))  # the demo model's own code: a stdlib source
        ids = tok(Path(json_module.__file__).read_text())["input_ids"]
        if len(ids) >= length:
            return list(ids[:length])
    return np.random.default_rng(1).integers(3, vocab, size=length).tolist()


def step_bytes(c, cache_len: int, context_len: int) -> dict:
    """Bytes one decode step must read: weights (from the config), and the KV cache."""
    isz = {"float32": 4, "bfloat16": 2, "float16": 2}[c.dtype]
    d, hd = c.hidden_size, c.head_dim
    attn = d * c.num_heads * hd + 2 * d * c.num_kv_heads * hd + c.num_heads * hd * d
    if c.qkv_bias:
        attn += c.num_heads * hd + 2 * c.num_kv_heads * hd
    layers = 0
    for moe in c.moe_layers:
        layers += 2 * d + attn
        if moe:
            layers += d * c.num_experts + c.top_k * 3 * d * c.moe_intermediate_size
            if c.shared_expert_intermediate_size:
                layers += 3 * d * c.shared_expert_intermediate_size + d
        else:
            layers += 3 * d * c.intermediate_size
    weights = (d + layers + d + c.vocab_size * d) * isz  # embedding row, layers, final norm, head
    kv_per_pos = 2 * c.num_layers * c.num_kv_heads * hd * isz
    return {"weights": int(weights), "kv_cache_jaxmoe": int(kv_per_pos * cache_len),
            "kv_cache_mean_transformers": int(kv_per_pos * context_len)}


class JaxmoeRunner:
    """jaxmoe side: Engine.from_dir, stop tokens emptied, warm-up (compiling) request on start."""

    def __init__(self, jm_dir: Path, prompt: list[int], n: int):
        import jax

        from jaxmoe.engine import Engine

        t = time.perf_counter()
        self.engine = Engine.from_dir(jm_dir)
        self.load_s = time.perf_counter() - t
        self.engine.config = self.engine.config.replace(eos_token_ids=())  # never stop early
        self.prompt, self.n = prompt, n
        self.param_count = int(sum(x.size for x in jax.tree.leaves(self.engine.state)))
        self.warmup = self._generate()
        self.runs = []

    def _generate(self):
        r = self.engine.generate(prompt_ids=self.prompt, max_new_tokens=self.n)
        assert len(r.token_ids) == self.n, (len(r.token_ids), self.n)
        return r

    def run(self) -> None:
        self.runs.append(self._generate())

    def report(self) -> dict:
        first = self.warmup
        assert all(r.token_ids == first.token_ids for r in self.runs)
        tps = [r.decode_tokens_per_s for r in self.runs]
        return {
            "decode_tok_s": statistics.median(tps),
            "decode_tok_s_runs": [round(x, 2) for x in tps],
            "compile_s": round(first.compile_s, 2),
            "warmup_decode_tok_s": round(first.decode_tokens_per_s, 2),
            "prefill_s_median": round(statistics.median(r.prefill_s for r in self.runs), 4),
            "cache_length": first.cache_length,
            "prompt_bucket": first.prompt_bucket,
            "load_s": round(self.load_s, 2),
            "tokens": first.token_ids,
        }


class TransformersRunner:
    """transformers side: from_pretrained (float32, the given experts implementation), greedy
    generate with a copied generation config (no EOS, no sampling), warm-up run on start."""

    def __init__(self, hf_dir: Path, prompt: list[int], n: int, impl: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, LogitsProcessor

        self.threads = threads
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                          experts_implementation=impl).eval()
        gc = copy.deepcopy(self.model.generation_config)
        gc.eos_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = None, False, n, None
        gc.pad_token_id = gc.pad_token_id if gc.pad_token_id is not None else 0
        gc.temperature = gc.top_p = gc.top_k = None
        self.gc, self.n, self.prompt = gc, n, prompt
        self.inputs = torch.tensor([prompt], dtype=torch.long)

        class Clock(LogitsProcessor):
            """Stamps the clock once per generated token, right after that step's forward."""

            def __init__(self):
                self.stamps = []

            def __call__(self, input_ids, scores):
                self.stamps.append(time.perf_counter())
                return scores

        self.clock_cls = Clock
        self.warmup = self._generate()
        self.runs = []

    def _generate(self):
        import torch
        from transformers import LogitsProcessorList

        torch.set_num_threads(self.threads)
        clock = self.clock_cls()
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(input_ids=self.inputs, attention_mask=torch.ones_like(self.inputs),
                                      generation_config=self.gc, logits_processor=LogitsProcessorList([clock]))
        assert len(clock.stamps) == self.n, (len(clock.stamps), self.n)
        # decode: n-1 steps from the first stamp (after prefill's forward) to the last
        return out[0, len(self.prompt):].tolist(), (self.n - 1) / (clock.stamps[-1] - clock.stamps[0]), clock.stamps[0] - t

    def run(self) -> None:
        self.runs.append(self._generate())

    def report(self) -> dict:
        tokens = self.warmup[0]
        assert all(r[0] == tokens for r in self.runs)
        tps = [r[1] for r in self.runs]
        return {"decode_tok_s": statistics.median(tps), "decode_tok_s_runs": [round(x, 2) for x in tps],
                "warmup_decode_tok_s": round(self.warmup[1], 2),
                "prefill_s_median": round(statistics.median(r[2] for r in self.runs), 4),
                "torch_threads": self.threads,
                "experts_implementation": self.model.config._experts_implementation,
                "attn_implementation": self.model.config._attn_implementation, "tokens": tokens}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def bench_model(name: str, hf_dir: Path, workdir: Path, args) -> dict:
    from jaxmoe.convert import convert

    jm_dir = workdir / f"jm-{name}"
    t = time.perf_counter()
    convert(hf_dir, jm_dir, progress=False)
    convert_s = time.perf_counter() - t
    from jaxmoe import checkpoint as ckpt

    cfg = ckpt.load_config(jm_dir)
    prompt = prompt_for(name, hf_dir, args.prompt_len, cfg.vocab_size)
    configs = [(impl, t) for t in args.torch_threads for impl in args.hf_experts]
    print(f"[{name}] loading and warming up jaxmoe and transformers {configs} ...", flush=True)
    jm_runner = JaxmoeRunner(jm_dir, prompt, args.new_tokens)
    hf_runners = {f"{impl}/{t}thr": TransformersRunner(hf_dir, prompt, args.new_tokens, impl, t) for impl, t in configs}
    for r in range(args.repeats):  # interleaved, so both sides see the same background load
        print(f"[{name}] repeat {r + 1}/{args.repeats}", flush=True)
        jm_runner.run()
        for runner in hf_runners.values():
            runner.run()
    jm = jm_runner.report()
    jm["param_count"] = jm_runner.param_count
    print(f"[{name}] profiling jaxmoe decode steps, then jaxmoe on one core ...", flush=True)
    lag = partition_lag(jm_runner.engine, prompt)
    jm_one_core = one_core_decode(jm_dir, prompt, args.new_tokens)
    config = jm_runner.engine.config
    hf = {impl: runner.report() for impl, runner in hf_runners.items()}
    del jm_runner, hf_runners
    best_impl = max(hf, key=lambda k: hf[k]["decode_tok_s"])
    ref = hf[best_impl]
    default = f"grouped_mm/{TORCH_THREADS}thr"  # transformers' default experts implementation, 2 threads
    mismatch = {impl: first_mismatch(jm["tokens"], r["tokens"]) for impl, r in hf.items()}
    bytes_ = step_bytes(config, jm["cache_length"], len(prompt) + args.new_tokens // 2)
    gb = bytes_["weights"] / 1e9
    result = {
        "hf_dir": str(hf_dir.relative_to(ROOT)) if hf_dir.is_relative_to(ROOT) else "(temporary)",
        "load_average_after": load_average(),
        "config": {k: v for k, v in config.to_json().items() if k not in ("moe_layers",)},
        "param_count": jm.pop("param_count"),
        "convert_s": round(convert_s, 2),
        "prompt_len": len(prompt),
        "new_tokens": args.new_tokens,
        "bytes_per_decode_step": bytes_,
        "jaxmoe": {k: v for k, v in jm.items() if k != "tokens"},
        "transformers": {impl: {k: v for k, v in r.items() if k != "tokens"} for impl, r in hf.items()},
        "transformers_baseline": best_impl,
        "jaxmoe_tok_s": round(jm["decode_tok_s"], 2),
        "transformers_tok_s": round(ref["decode_tok_s"], 2),
        "ratio": round(jm["decode_tok_s"] / ref["decode_tok_s"], 3),
        "ratio_vs_transformers_default_2threads": (round(jm["decode_tok_s"] / hf[default]["decode_tok_s"], 3)
                                                   if default in hf else None),
        "ratio_vs_each_transformers_config": {impl: round(jm["decode_tok_s"] / r["decode_tok_s"], 3)
                                              for impl, r in hf.items()},
        "jaxmoe_weights_GBps": round(gb * jm["decode_tok_s"], 2),
        "transformers_weights_GBps": round(gb * ref["decode_tok_s"], 2),
        "compile_s": jm["compile_s"],
        "xla_partition_lag": lag,
        "jaxmoe_one_core_tok_s": round(jm_one_core, 2),
        "second_core_speedup": {"jaxmoe": round(jm["decode_tok_s"] / jm_one_core, 3),
                                **{f"transformers {impl}": round(hf[f"{impl}/2thr"]["decode_tok_s"]
                                                                 / hf[f"{impl}/1thr"]["decode_tok_s"], 3)
                                   for impl in args.hf_experts
                                   if f"{impl}/2thr" in hf and f"{impl}/1thr" in hf}},
        "tokens_match": all(m is None for m in mismatch.values()),
        "first_mismatch_index": mismatch,
        "jaxmoe_tokens": jm["tokens"],
        "transformers_tokens": ref["tokens"],
        "prompt_ids": prompt,
    }
    return result


# ---------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all; demo only when jaxmoe/demo/model exists)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf-experts", default="grouped_mm,eager",
                   help="transformers experts implementations to time")
    p.add_argument("--torch-threads", default=f"{TORCH_THREADS},1",
                   help="torch thread counts to time transformers with; the fastest configuration is the baseline")
    p.add_argument("--skip-micro", action="store_true", help="skip the bandwidth and matvec measurements")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.hf_experts = [s for s in args.hf_experts.split(",") if s]
    args.torch_threads = [int(s) for s in args.torch_threads.split(",") if s]
    return args


def _quiet() -> None:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> None:
    args = parse_args(argv)
    _quiet()
    from jaxmoe.demo import MODEL_DIR

    demo_ready = (MODEL_DIR / "config.json").is_file() and any(MODEL_DIR.glob("*.safetensors"))
    models = args.models.split(",") if args.models else [m for m in MODELS if m != "demo" or demo_ready]
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if "demo" in models and not demo_ready:
        sys.exit(f"--models demo: no trained demo model at {MODEL_DIR} (run `python -m jaxmoe.demo.train`)")

    import torch

    torch.set_num_threads(TORCH_THREADS)
    report = {
        "benchmark": "decode_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "statistic": "median over repeats after one warm-up run", "greedy": True,
                     "early_stop": False, "torch_threads": args.torch_threads,
                     "transformers_experts_implementations": args.hf_experts,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "timing": "decode steps only: N-1 steps from the first new token (after prefill) to the last"},
        "load_average_start": load_average(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="decode_cpu-") as tmp:
        workdir = Path(tmp)
        for name in models:
            hf_dir = MODEL_DIR if name == "demo" else build_random_model(name, workdir)
            report["models"][name] = bench_model(name, hf_dir, workdir, args)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.skip_micro:
        print("memory bandwidth ...", flush=True)
        step_gb = max(m["bytes_per_decode_step"]["weights"] for m in report["models"].values())
        report["memory_bandwidth"] = memory_bandwidth({"1GiB (beyond L3)": 1 << 30,
                                                       "decode-step weights size": max(step_gb, 1 << 20)})
        print("matvec ...", flush=True)
        c = report["models"].get("random-v32k", next(iter(report["models"].values())))["config"]
        report["matvec_f32"] = {
            "shapes": {"D": c["hidden_size"], "I": c["moe_intermediate_size"], "V": c["vocab_size"]},
            "results": matvec_bench(c["hidden_size"], c["moe_intermediate_size"], c["vocab_size"], args.torch_threads),
        }
        print("matvec chains ...", flush=True)
        report["matvec_chain_f32"] = matvec_chain_bench(c["hidden_size"])
        print("expert paths ...", flush=True)
        report["expert_paths"] = expert_path_bench(c["num_layers"], c["num_experts"], c["moe_intermediate_size"],
                                                   c["hidden_size"], c["top_k"])
    report["load_average_end"] = load_average()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    print(f"\n{'model':11} {'params':>8} {'MB/step':>8} {'jaxmoe tok/s':>13} {'hf tok/s':>9} {'ratio':>6} "
          f"{'jm GB/s':>8} {'hf GB/s':>8} {'compile':>8} {'match':>6}")
    for name, m in report["models"].items():
        print(f"{name:11} {m['param_count'] / 1e6:7.1f}M {m['bytes_per_decode_step']['weights'] / 1e6:8.1f} "
              f"{m['jaxmoe_tok_s']:13.1f} {m['transformers_tok_s']:9.1f} {m['ratio']:5.2f}x "
              f"{m['jaxmoe_weights_GBps']:8.2f} {m['transformers_weights_GBps']:8.2f} {m['compile_s']:7.1f}s "
              f"{str(m['tokens_match']):>6}")
        print("         transformers (experts impl/torch threads): "
              + ", ".join(f"{k} {v['decode_tok_s']:.1f}" for k, v in m["transformers"].items())
              + f" tok/s; baseline = fastest ({m['transformers_baseline']})")
        if "second_core_speedup" in m:
            print(f"         one core: jaxmoe {m['jaxmoe_one_core_tok_s']:.1f} tok/s; second core speeds up "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in m["second_core_speedup"].items()))
        lag = m.get("xla_partition_lag")
        if lag and lag["lag_us_median"] is not None:
            print(f"         XLA products split over both cores: {lag['products_per_step']:.0f}/step, second thread "
                  f"joins after {lag['lag_us_median']:.0f} us median (p90 {lag['lag_us_p90']:.0f}), "
                  f"{lag['lag_ms_per_step']:.2f} ms/step of one core alone (profiled step {lag['profiled_step_ms']:.2f} ms)")
    if "memory_bandwidth" in report:
        print("\nmemory bandwidth GB/s (numpy):")
        for label, r in report["memory_bandwidth"].items():
            print(f"  {label:26} read 1t {r['read_1thread_GBps']:6.1f}  2t {r['read_2threads_GBps']:6.1f}   "
                  f"copy 1t {r['copy_1thread_GBps']:6.1f}  2t {r['copy_2threads_GBps']:6.1f}")
    if "expert_paths" in report:
        print("\nrouted experts of one decode step alone (ms, GB/s of the selected experts' bytes):")
        for name, r in report["expert_paths"].items():
            if isinstance(r, dict) and "ms" in r:
                print(f"  {name:30} {r['ms']:8.2f} ms {r['GBps']:6.1f} GB/s")
    if "matvec_chain_f32" in report:
        r = report["matvec_chain_f32"]
        print(f"\nchained f32 matvecs from DRAM (one side {r['d']}), GB/s: XLA all cores / XLA one core:")
        for case, gbps in r["xla_all_cores_GBps"].items():
            print(f"  {case:28} {gbps:6.1f} / {r['xla_one_core_GBps'][case]:6.1f}")
        print("  numpy: " + ", ".join(f"{case} {v}" for case, v in r["numpy_all_cores_GBps"].items()))
    if "matvec_f32" in report:
        threads = report["settings"]["torch_threads"]
        head = " / ".join(f"torch {t}thr" for t in threads)
        print(f"\nf32 matvec: per call us (XLA / {head}), streamed GB/s over a stack > L2 (same order):")
        for name, r in report["matvec_f32"]["results"].items():
            calls = " / ".join(f"{r[f'torch_{t}thr_call_us']:7.1f}" for t in threads)
            streams = " / ".join(f"{r[f'torch_{t}thr_streamed_GBps']:5.1f}" for t in threads)
            print(f"  {name:46} {r['xla_call_us']:7.1f} / {calls} us   {r['xla_streamed_GBps']:5.1f} / {streams} GB/s")
    print(f"\nload average start {report['load_average_start']} end {report['load_average_end']}")


if __name__ == "__main__":
    main()
