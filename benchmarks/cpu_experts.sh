#!/usr/bin/env bash
# Experts on the CPU (issue 29) on a lent GPU, in one call of under ten minutes: the GPU tests of the CPU tier, the
# host's read bandwidth (a 16-thread sum over 4 GiB, the ceiling the CPU kernels are held to), then
# `moe-offload bench` on Mixtral-8x7B's shapes, 4/2, replayed routing, copy-only side by side with CPU experts:
# 12 GiB full and no-cache, 6 GiB full, and 10 layers' experts on the CPU. Logs and report JSON go to $OUT.
#
#     MOE_OFFLOAD_COMMIT=$(git rev-parse HEAD) bash benchmarks/cpu_experts.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MOE_OFFLOAD_COMMIT=${MOE_OFFLOAD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
lscpu | grep -E "^Model name|^CPU\(s\)" | tee "$OUT/host.txt"
timeout 150 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_cpu_tier_gpu.py 2>&1 | grep -v Warning | tail -25 | tee "$OUT/cpu_tier_gpu_tests.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/host.txt"
import time, torch
x = torch.ones(2**30, dtype=torch.float32)     # 4 GiB; a float sum (an int16 sum into int64 is compute-bound: 2.9 GB/s)

def seconds():
    started = time.perf_counter()
    x.sum()
    return time.perf_counter() - started

seconds()
best = min(seconds() for _ in range(5))
print(f"host read: {x.numel() * 4 / best / 1e9:.1f} GB/s ({torch.get_num_threads()} threads, a float32 sum over 4 GiB)")
PY
bench="python3 -m moe_offload.cli bench --synthetic mixtral-8x7b --quant 4/2 --prefill-tokens 512 --routing replay --no-resident --no-compute-only --cpu-experts off,auto"
timeout 300 $bench --budget 12GiB --modes full,no-cache --new-tokens 48 --repeats 1 --warmup-tokens 8 --prefill-repeats 1 \
    --out "$OUT/bench_cpu_experts_12gib.json" 2>&1 | grep -v Warning | grep -v '^{' | tail -20
timeout 150 $bench --budget 6GiB --modes full --cpu-moe-layers 0,10 --new-tokens 48 --repeats 1 --warmup-tokens 8 --prefill-repeats 1 \
    --out "$OUT/bench_cpu_experts_6gib.json" 2>&1 | grep -v Warning | grep -v '^{' | tail -12
