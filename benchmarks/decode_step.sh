#!/usr/bin/env bash
# The decode step on a lent GPU, in one call of under ten minutes: the GPU tests of the step and the provider, then
# `moe-offload bench` on Mixtral-8x7B's shapes, 4/2, 12 GiB, replayed routing (the ablation, compute-only, every
# expert resident, profiles of launches and syncs), then the seed's own machine (12 GiB GPU, 11 GiB of host RAM,
# the rest of the experts on disk), then the fused ops' GPU tests in the time left (they compile many kernels: on
# 2026-12-08, with a cold Triton cache, the step's tests and these did not finish in 150 s together). Logs and
# report JSON go to $OUT (default: ./out).
#
#     MOE_OFFLOAD_COMMIT=$(git rev-parse HEAD) bash benchmarks/decode_step.sh
#
# Pass the commit from the checkout you send: the device's copy of the tree may carry another in its git.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MOE_OFFLOAD_COMMIT=${MOE_OFFLOAD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the step's own tests first (20 s on a warm H100); the fused ops' tests compile many kernels, so they run last
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_step_gpu.py tests/test_offload_gpu.py 2>&1 \
    | tail -30 | tee "$OUT/gpu_tests.txt"
bench="python3 -m moe_offload.cli bench --synthetic mixtral-8x7b --quant 4/2 --budget 12GiB --prefill-tokens 2048 --routing replay"
timeout 330 $bench --modes full,no-prefetch,no-cache --new-tokens 96 --repeats 2 --warmup-tokens 16 --prefill-repeats 2 \
    --profile 16 --out "$OUT/bench_12gib.json" 2>&1 | grep -v Warning | grep -v '^{' | tail -30
timeout 90 $bench --cpu-memory 11GiB --modes full --no-compute-only --no-resident --new-tokens 48 --repeats 1 \
    --warmup-tokens 8 --prefill-repeats 1 --out "$OUT/bench_seed_machine.json" 2>&1 | grep -v Warning | grep -v '^{' | tail -6
timeout $((SECONDS < 580 ? 590 - SECONDS : 10)) python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_ops.py 2>&1 | tail -10 \
    | tee "$OUT/ops_gpu_tests.txt"
