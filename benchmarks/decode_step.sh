#!/usr/bin/env bash
# The decode step on a lent GPU, in one call: GPU tests, then `moe-offload bench` on Mixtral-8x7B's shapes, 4/2,
# 12 GiB, every row issue 27 asks for, then the seed's own machine (12 GiB GPU, 11 GiB of host RAM, the rest
# on disk). Logs and report JSON go to $OUT (default: ./out).
#
#     bash benchmarks/decode_step.sh [quick]      # quick: fewer tokens, replayed routing only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MOE_OFFLOAD_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench="python3 -m moe_offload.cli bench --synthetic mixtral-8x7b --quant 4/2 --budget 12GiB --prefill-tokens 2048"
if [ "${1:-}" = quick ]; then
    timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_step_gpu.py tests/test_ops.py 2>&1 \
        | tail -30 | tee "$OUT/gpu_tests.txt"
    timeout 300 $bench --routing replay --modes full,no-cache --new-tokens 64 --repeats 1 --warmup-tokens 8 \
        --prefill-repeats 1 --profile 8 --out "$OUT/bench_quick.json" 2>&1 | grep -v Warning | tail -25
    exit
fi
timeout 420 $bench --routing replay,own --modes full,no-prefetch,no-cache --new-tokens 128 --repeats 2 \
    --warmup-tokens 16 --prefill-repeats 2 --profile 16 --out "$OUT/bench_12gib.json" 2>&1 | grep -v Warning | tail -30
timeout 150 $bench --cpu-memory 11GiB --routing replay --modes full --no-compute-only --no-resident --new-tokens 64 \
    --repeats 1 --warmup-tokens 8 --prefill-repeats 1 --out "$OUT/bench_seed_machine.json" 2>&1 | grep -v Warning | tail -8
