"""Train the bundled demo model: a small Mixtral-family MoE language model on Python stdlib sources.

    python -m jaxmoe.demo.train [--out DIR] [--steps N] [--seed S]

The defaults reproduce jaxmoe/demo/model/ (about 22 minutes on one CPU core). The corpus is the
standard library's own .py files, which every machine with Python has offline; the last 5% of the
sorted file list is held out for the loss and routing statistics. The router's load-balancing loss
is weighted lightly on purpose so that expert usage stays skewed, as in real MoE checkpoints,
which is what makes expert offloading and caching worth measuring on this model.

torch is not a jaxmoe dependency: it and the other training libraries are imported by the
functions that train, so importing this module needs none of them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxmoe.demo import DEMO_DIR, MODEL_DIR

if TYPE_CHECKING:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
# Pre-tokenization for code: a newline with the next line's indentation, a word or a punctuation run
# each with at most one trailing space, or leftover spaces. GPT-2's split puts the space before the
# word instead, which leaves prompts such as "def " ending in a lone space token the model rarely saw.
CODE_SPLIT = r"[ \t]*\n[ \t\n]*|\w+ ?|[^\s\w]+ ?|[ \t]+"
SEQ_LEN = 256
BATCH_SIZE = 16
PEAK_LR = 2e-3
WARMUP_STEPS = 100
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
AUX_LOSS_COEF = 0.005
HELD_OUT_FRACTION = 0.05
DEFAULT_STEPS = 1500
DEFAULT_SEED = 0
# One thread: at this size two barely help, and on a shared 2-core machine two-thread kernels stall
# whenever either thread is descheduled (5-10x slower steps were measured under load).
TORCH_THREADS = 1
# The per-expert loop beats the grouped_mm default several times over on CPU at this size.
EXPERTS_IMPL = "eager"
PROMPTS = ("def ", "import ")
# Test suites would dominate the corpus with repetitive asserts; pydoc_data (prose) and encodings
# (codec tables) are generated data that would teach the model little Python.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data", "encodings"})


def collect_corpus() -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib .py file outside EXCLUDED_DIRS, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [(p.relative_to(root).as_posix(), p.read_bytes().decode("utf-8", errors="replace")) for p in paths]


def split_corpus(docs: list, held_out_fraction: float) -> tuple[list, list]:
    n_held = max(1, round(len(docs) * held_out_fraction))
    return docs[:-n_held], docs[-n_held:]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text round-trips; EOT doubles as bos, eos and pad."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CODE_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """One token stream with EOT after every document, so the model learns where files end."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eot = tokenizer.eos_token_id
    return np.fromiter((t for enc in encodings for t in (*enc.ids, eot)), dtype=np.int32)


def build_config(tokenizer: PreTrainedTokenizerFast, aux_loss_coef: float) -> MixtralConfig:
    from transformers import MixtralConfig

    eot = tokenizer.eos_token_id
    return MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=aux_loss_coef,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


def seed_everything(seed: int) -> np.random.Generator:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_windows(tokens: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    import torch

    starts = rng.integers(0, len(tokens) - SEQ_LEN, size=BATCH_SIZE)
    return torch.from_numpy(np.stack([tokens[s : s + SEQ_LEN] for s in starts]).astype(np.int64))


def cosine_with_warmup(steps: int):
    def lr_factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_factor


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """Decay matrices only: shrinking RMSNorm gains toward zero only hurts."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def train(model: MixtralForCausalLM, tokens: np.ndarray, steps: int, rng: np.random.Generator) -> float:
    """Returns the wall time in seconds."""
    import torch

    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps))
    model.train()
    start = time.time()
    for step in range(steps):
        batch = random_windows(tokens, rng)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.time() - start
            counts = expert_counts(out.router_logits, model.config)
            balance = " ".join(f"{s['entropy_bits'] / s['uniform_bits']:.0%}" for s in routing_stats(counts))
            print(
                f"step {step:5d}/{steps}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  routing entropy/uniform {balance}  "
                f"{elapsed:.0f}s ({elapsed / (step + 1):.2f} s/step)",
                flush=True,
            )
    model.eval()
    return time.time() - start


def save_model(model: MixtralForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    from transformers import GenerationConfig

    eot = tokenizer.eos_token_id
    model.config.output_router_logits = False  # inference default; the aux loss is for training only
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    add_transformers_v4_keys(out, model.config.rope_parameters["rope_theta"])
    check_saved_layout(out)


def add_transformers_v4_keys(out: Path, rope_theta: float) -> None:
    """Let transformers 4.x (which the project also supports) read the folder as 5.x does.

    4.x takes rope_theta from the top level (else silently uses Mixtral's 1e6) and has no
    TokenizersBackend class; 5.x accepts both additions.
    """
    edits = {
        "config.json": {"rope_theta": rope_theta},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"},
    }
    for name, extra in edits.items():
        path = out / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}, indent=2, sort_keys=True) + "\n")


def check_saved_layout(out: Path) -> None:
    """The converter expects the legacy per-expert Mixtral names, which transformers 5 writes back on save."""
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    expected = {f"model.layers.0.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")}
    expected.add("model.layers.0.block_sparse_moe.gate.weight")
    missing = expected - keys
    if missing or dtypes != {"F32"}:
        sys.exit(f"unexpected safetensors layout in {out}: missing {sorted(missing)}, dtypes {sorted(dtypes)}")


def check_round_trip(tokenizer, texts: list[str]) -> None:
    for text in texts:
        if tokenizer.decode(tokenizer(text, verbose=False)["input_ids"]) != text:
            sys.exit("the saved tokenizer does not round-trip the held-out text")


def evaluate(model: MixtralForCausalLM, tokens: np.ndarray) -> tuple[float, np.ndarray]:
    """Next-token loss (nats, without the aux loss) over non-overlapping held-out windows, and expert_counts."""
    import torch

    cfg = model.config
    n_windows = (len(tokens) - 1) // SEQ_LEN
    windows = torch.from_numpy(tokens[: n_windows * SEQ_LEN].astype(np.int64)).view(n_windows, SEQ_LEN)
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), dtype=np.int64)
    loss_sum = 0.0
    with torch.no_grad():
        for batch in windows.split(BATCH_SIZE):
            out = model(input_ids=batch, output_router_logits=True)
            logits = out.logits[:, :-1].reshape(-1, cfg.vocab_size)
            loss_sum += torch.nn.functional.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum").item()
            counts += expert_counts(out.router_logits, cfg)
    return loss_sum / windows[:, 1:].numel(), counts


def expert_counts(router_logits: tuple[torch.Tensor, ...], cfg: MixtralConfig) -> np.ndarray:
    """(layers, experts) number of top-k assignments; softmax is monotonic, so top-k of the logits."""
    counts = np.zeros((len(router_logits), cfg.num_local_experts), dtype=np.int64)
    for layer, logits in enumerate(router_logits):
        chosen = logits.detach().topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
        counts[layer] = np.bincount(chosen.numpy(), minlength=cfg.num_local_experts)
    return counts


def routing_stats(counts: np.ndarray) -> list[dict]:
    uniform_bits = math.log2(counts.shape[1])
    layers = []
    for layer, c in enumerate(counts):
        usage = c / c.sum()
        nonzero = usage[usage > 0]
        layers.append(
            {
                "layer": layer,
                "entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),
                "uniform_bits": uniform_bits,
                "top_expert_share": float(usage.max()),
                "usage": [round(float(u), 6) for u in usage],
            }
        )
    return layers


def generate_samples(model: MixtralForCausalLM, tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    samples = {}
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        samples[prompt] = tokenizer.decode(ids[0], skip_special_tokens=True)
    return samples


def routing_table(layers: list[dict]) -> str:
    rows = [
        "| layer | entropy (bits) | of uniform | top expert share | least-used share | experts under 1% |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in layers:
        rows.append(
            f"| {s['layer']} | {s['entropy_bits']:.3f} / {s['uniform_bits']:.0f} "
            f"| {s['entropy_bits'] / s['uniform_bits']:.0%} | {s['top_expert_share']:.1%} | {min(s['usage']):.1%} "
            f"| {sum(u < 0.01 for u in s['usage'])} |"
        )
    return "\n".join(rows)


def write_report(path: Path, stats: dict, samples: dict[str, str]) -> None:
    n_experts = len(stats["layers"][0]["usage"])
    lines = [
        "# Demo model: routing statistics",
        "",
        f"Mixtral-family MoE, {stats['parameters'] / 1e6:.2f}M parameters, {n_experts} experts per layer, top-2 routing,",
        f"trained {stats['train_steps']} steps ({stats['train_seconds'] / 60:.1f} min, seed {stats['seed']}) on "
        f"{stats['corpus']['source']}.",
        f"Held-out loss {stats['held_out_loss']:.3f} (perplexity {stats['held_out_perplexity']:.1f}) on "
        f"{stats['corpus']['held_out_tokens']:,} tokens from the last {stats['corpus']['held_out_files']} files.",
        "",
        "Expert usage is the fraction of top-2 assignments each expert receives on the held-out text;",
        f"uniform routing would have an entropy of log2({n_experts}) bits.",
        "",
        routing_table(stats["layers"]),
        "",
        "## Greedy samples (transformers `generate`, 64 new tokens)",
        "",
    ]
    for prompt, text in samples.items():
        lines += [f"Prompt `{prompt!r}`:", "", "```python", text, "```", ""]
    lines.append("Reproduce with `python -m jaxmoe.demo.train` (defaults).")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=MODEL_DIR, help="output model folder (default: the bundled demo)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of 16 x 256 tokens")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for python, numpy and torch")
    p.add_argument("--aux-loss-coef", type=float, default=AUX_LOSS_COEF, help="router load-balancing loss weight")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    args = parse_args(argv)
    torch.set_num_threads(TORCH_THREADS)
    t0 = time.time()
    rng = seed_everything(args.seed)

    docs = collect_corpus()
    train_docs, held_docs = split_corpus(docs, HELD_OUT_FRACTION)
    tokenizer = train_tokenizer([text for _, text in train_docs])
    train_tokens = encode_documents(tokenizer, [text for _, text in train_docs])
    held_tokens = encode_documents(tokenizer, [text for _, text in held_docs])
    print(
        f"corpus: {len(train_docs)} train files ({len(train_tokens):,} tokens), "
        f"{len(held_docs)} held out ({len(held_tokens):,} tokens), from {held_docs[0][0]} on",
        flush=True,
    )

    model = MixtralForCausalLM(build_config(tokenizer, args.aux_loss_coef))
    model.set_experts_implementation(EXPERTS_IMPL)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    train_seconds = train(model, train_tokens, args.steps, rng)

    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, args.out)
    # Measure the saved checkpoint, not the in-memory model, so the report describes what ships.
    model = MixtralForCausalLM.from_pretrained(args.out, experts_implementation=EXPERTS_IMPL)
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    check_round_trip(tokenizer, [text for _, text in held_docs])
    held_loss, counts = evaluate(model, held_tokens)
    samples = generate_samples(model, tokenizer)

    stats = {
        "layers": routing_stats(counts),
        "held_out_loss": held_loss,
        "held_out_perplexity": math.exp(held_loss),
        "train_steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "seed": args.seed,
        "parameters": n_params,
        "router_aux_loss_coef": args.aux_loss_coef,
        "batch": {"size": BATCH_SIZE, "seq_len": SEQ_LEN, "peak_lr": PEAK_LR},
        "corpus": {
            "source": f"Python {platform.python_version()} standard library .py sources",
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "train_files": len(train_docs),
            "held_out_files": len(held_docs),
            "held_out_from": held_docs[0][0],
            "train_tokens": int(len(train_tokens)),
            "held_out_tokens": int(len(held_tokens)),
        },
    }
    (args.out / "routing_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    # The committed report sits beside the package; other output folders get their own copy.
    report = DEMO_DIR / "ROUTING.md" if args.out.resolve() == MODEL_DIR else args.out / "ROUTING.md"
    write_report(report, stats, samples)

    print(routing_table(stats["layers"]))
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f})")
    for prompt, text in samples.items():
        print(f"--- {prompt!r}\n{text}")
    print(f"wrote {args.out} and {report} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
