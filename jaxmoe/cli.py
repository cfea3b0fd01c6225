"""The `jaxmoe` command: convert, generate."""

from __future__ import annotations

import argparse
import json
import sys

from jaxmoe.config import DTYPES


def _convert(args) -> None:
    from jaxmoe.convert import convert

    config = convert(args.hf_dir, args.out_dir, dtype=args.dtype, progress=not args.quiet)
    print(f"converted {config.family} ({config.num_layers} layers, {config.num_experts} experts, {config.dtype}) -> {args.out_dir}")


def _generate(args) -> None:
    import jaxmoe

    # load converts a Hugging Face directory itself: an offloaded load sets JAX's memory limits
    # first, and conversion starts JAX.
    engine = jaxmoe.load(args.model_dir, progress=True, **_offload_options(args))

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = engine.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        stream=stream,
    )
    sys.stdout.write("\n")
    summary = (
        f"{len(result.prompt_token_ids)} prompt tokens, {len(result.token_ids)} new ({result.stop_reason}); "
        f"ttft {result.ttft_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} tok/s, compile {result.compile_s:.1f} s"
    )
    print(summary, file=sys.stderr)
    if args.json:
        out = result.to_json()
        out["model_dir"] = str(engine.model_dir)
        print(json.dumps(out))


def _offload_options(args) -> dict:
    """Offload settings for jaxmoe.load; none of the flags given means fully resident."""
    from jaxmoe.offload.plan import parse_size

    if args.vram_budget and args.expert_budget is not None:
        raise ValueError("give --vram-budget or --expert-budget, not both")
    if not (args.vram_budget or args.expert_budget is not None or args.schedule):
        for flag, given in (("--policy", args.policy), ("--split-ratio", args.split_ratio),
                            ("--no-prefetch", args.no_prefetch)):
            if given:
                raise ValueError(f"{flag} needs --vram-budget, --expert-budget or --schedule")
        return {}
    return dict(
        vram_budget=parse_size(args.vram_budget) if args.vram_budget else None,
        expert_budget=args.expert_budget,
        schedule=args.schedule,
        policy=args.policy,
        split_ratio=args.split_ratio,
        prefetch=not args.no_prefetch,
        kv_length=args.kv_length,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmoe", description="Mixture-of-experts inference on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint into a jaxmoe checkpoint")
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors and tokenizer files")
    p.add_argument("out_dir", help="new directory for the converted checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

    p = sub.add_parser("generate", help="generate text (default model: the bundled demo)")
    p.add_argument("model_dir", nargs="?", help="converted checkpoint or Hugging Face directory (default: demo)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    off = p.add_argument_group("expert offload (default: fully resident)")
    off.add_argument("--vram-budget", metavar="SIZE", help="whole device footprint, e.g. 6GiB or 800MiB")
    off.add_argument("--expert-budget", metavar="FRACTION", type=float, help="share of all expert bytes to cache")
    off.add_argument("--schedule", metavar="FILE", help="per-layer cache plan written by `jaxmoe plan`")
    off.add_argument("--policy", choices=["lru", "lfu", "lcp", "static"], help="cache eviction policy (default lru)")
    off.add_argument("--split-ratio", type=float, help="cached top share of each expert (default 1: whole experts)")
    off.add_argument("--no-prefetch", action="store_true", help="fetch on demand only")
    off.add_argument("--kv-length", type=int, default=2048, help="tokens of KV cache the budget reserves")
    p.set_defaults(run=_generate)

    from jaxmoe.schedules import cli as schedules_cli

    schedules_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"jaxmoe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
