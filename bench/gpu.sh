#!/usr/bin/env bash
# Every GPU benchmark in one command, about 9 minutes on one H100; JSON lands in bench/results/.
# Each script refuses to run when JAX (or torch) has no GPU: pip install ".[cuda,bench]" first.
cd "$(dirname "$0")/.."
status=0
python -m bench.offload_gpu || status=1
python -m bench.baselines --device gpu --time-limit 330 || status=1
if [ -n "${OUT:-}" ]; then cp bench/results/*_gpu*.json "$OUT"/ 2>/dev/null || true; fi
exit $status
