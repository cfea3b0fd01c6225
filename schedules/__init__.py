"""Offline side of jaxmoe (installed as `jaxmoe.schedules`): routing traces, hardware profiles, the
trace-driven cache simulator and the planner that fixes every cache shape before jit compilation.

- `trace`: record and read routing traces (the `jaxmoe-trace` JSONL format, and public traces).
- `stats`: popularity, reuse, cross-layer predictability, expert activation matrices.
- `profile`: measured or estimated host->device bandwidth and per-layer compute times.
- `costmodel`: seconds per decode token from transfers and compute, with overlap.
- `simulate`: replays traces through the runtime's own cache controllers and policies.
- `planner`: per-layer slots and split ratios under a memory budget; writes schedules.
- `cli`: the `jaxmoe trace | trace-stats | profile | simulate | plan` subcommands.
"""
