"""GPU: the fused HQQ dequantize-and-multiply kernel on Mixtral-8x7B's expert shapes, against bf16.

    python benchmarks/quant_kernels.py --out $OUT/quant_kernels.json        # CUDA + Triton needed
    python benchmarks/quant_kernels.py --no-sweep --shapes w2 --bits 2 3      # the default tiling of some rows only

In one run, on one card:
1. the card's memory bandwidth, measured: a 1 GiB device-to-device copy (read + write bytes / time);
2. for w1/w3 (14336 x 4096) and w2 (4096 x 14336) at 2, 3 and 4 bits (the paper's group sizes,
   8-bit scales and zeros): a correctness check against dequantize-then-matmul, then the time of
   one batch-1 product with the default tiling (what the runtime uses) and with the best tiling of
   a small sweep, the bandwidth achieved over the bytes the kernel must read (packed codes, scales,
   zeros, meta, x) and write, as a fraction of the measured bandwidth, and a bf16 GEMV of the same
   shape (cuBLAS through F.linear);
3. batch 4, batch 8 (the GEMV's largest) and batch 512 (prefill) times next to bf16, for reference.
Kernel times replay a CUDA graph of one call on each of COPIES copies of the weight at different
addresses (more bytes than the L2 cache holds, so every call reads from memory), without the
Python launch cost; `eager_us` is the same call launched from Python (triton.testing.do_bench,
which empties the L2 cache before every run), launch cost included: what an un-graphed model pays.
On compute capability 9.0 and up the GEMV is a programmatic dependent launch (quant/kernel_gemv.py): in the
graph each call then loads its weight while the call before ends, as in a decode step's chain of
GEMVs (each still waits for the one before to finish before it reads x). `serial_us` is the default
tiling launched without it: every call starts after the one before has finished.
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from moe_offload.config import QuantSpec
from moe_offload.quant.kernel_config import KernelConfig, default_config, early_groups
from moe_offload.quant.kernels import hqq_linear
from moe_offload.quant.weight import PackedFormat

SHAPES = {"w1/w3 14336x4096": (14336, 4096), "w2 4096x14336": (4096, 14336)}
BITS = (2, 3, 4)
TARGET = 0.60   # of the measured memory bandwidth, at batch 1


COPIES = 8          # 8 x 22 MB (the smallest weight here) > the 50-60 MB L2 of an H100/H200
REPLAYS = 20        # replays of the graph a timed window
WINDOWS = 5         # timed windows a case: the median is reported
WARM_UP_S = 0.05    # replays first, for at least this long: the first ones after a pause ran up to ~0.8 us a call
                    # slower (results/gpu-2026-11-28/quant_kernels_atomic_sums.txt; gemv_pdl.txt: docs/lab-notes.md)


def time_ms(fn, rep: int = 100) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_us(call, operands) -> float:
    """Microseconds per call(operand), replaying one CUDA graph that calls it on every operand in turn: the median
    of WINDOWS timed windows after WARM_UP_S of replays."""
    for operand in operands:                  # compile and allocate outside the capture
        call(operand)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for operand in operands:
            call(operand)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for operand in operands:
            call(operand)
    warm_up_end = time.perf_counter() + WARM_UP_S
    while time.perf_counter() < warm_up_end:
        graph.replay()
    windows = []
    for _ in range(WINDOWS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) * 1e3 / (REPLAYS * len(operands)))
    return statistics.median(windows)


def measured_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src)) * 1e-3)


def sweep_configs(default: KernelConfig, bits: int, group_size: int):
    """Other tilings, each loading as many groups early as the default's rule gives it."""
    for rows, warps, columns in itertools.product((2, 4, 8), (1, 2, 4), (64, 128, 256)):
        if columns >= group_size:
            groups = columns // group_size
            yield replace(default, rows_per_thread=rows, warps=warps, groups_per_split=groups,
                          early_groups=early_groups(bits, group_size, 1, groups))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--no-sweep", action="store_true", help="time only the default tiling")
    parser.add_argument("--bits", type=int, nargs="+", choices=BITS, default=BITS, help="only these widths")
    parser.add_argument("--shapes", nargs="+", choices=("w1", "w2"), default=("w1", "w2"),
                        help="only these matrices (w1 stands for w1/w3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    bandwidth = measured_bandwidth()
    print(f"{props.name}: measured memory bandwidth {bandwidth / 1e12:.2f} TB/s (1 GiB device-to-device copy)", flush=True)

    rows = []
    shapes = {name: shape for name, shape in SHAPES.items() if name[:2] in args.shapes}
    for (shape_name, (n, k)), bits in itertools.product(shapes.items(), args.bits):
        spec = QuantSpec(bits)
        fmt = PackedFormat([((n, k), spec)])
        weight = torch.randn(n, k, device=device) / k ** 0.5
        raw = fmt.pack([weight]).to(device)
        (w,) = fmt.view(raw.clone())
        dense = weight.to(torch.bfloat16)
        x1 = torch.randn(1, k, device=device, dtype=torch.bfloat16)

        expected = F.linear(x1.float(), w.dequantize(torch.float32))
        error = ((hqq_linear(x1, w).float() - expected).abs().max() / expected.abs().max()).item()
        if error > 1e-2:
            sys.exit(f"{shape_name} {bits}-bit: kernel differs from dequantize-then-matmul by {error:.3g} (relative)")

        moved = fmt.nbytes + 2 * (k + n)             # the weight's buffer, x and y in bf16
        copies = [fmt.view(raw.clone())[0] for _ in range(COPIES)]
        dense_copies = [dense.clone() for _ in range(COPIES)]
        default = default_config(bits, spec.group_size, n, k, sm_count=props.multi_processor_count)
        default_us = graph_us(lambda q: hqq_linear(x1, q, default), copies)
        serial = replace(default, dependent_launch=False)
        serial_us = graph_us(lambda q: hqq_linear(x1, q, serial), copies)
        best, best_us = default, default_us
        if not args.no_sweep:
            for config in sweep_configs(default, bits, spec.group_size):
                try:
                    us = graph_us(lambda q: hqq_linear(x1, q, config), copies)
                except (triton.runtime.errors.OutOfResources, RuntimeError):
                    continue
                if us < best_us:
                    best, best_us = config, us
        best_us = graph_us(lambda q: hqq_linear(x1, q, best), copies)        # again, after the sweep
        default_ms, best_ms = default_us * 1e-3, best_us * 1e-3
        bf16_ms = graph_us(lambda d: F.linear(x1, d), dense_copies) * 1e-3
        x4 = torch.randn(4, k, device=device, dtype=torch.bfloat16)
        x8 = torch.randn(8, k, device=device, dtype=torch.bfloat16)
        x512 = torch.randn(512, k, device=device, dtype=torch.bfloat16)
        row = dict(
            shape=shape_name, n=n, k=k, bits=bits, group_size=spec.group_size, quant_meta=spec.quant_meta,
            packed_bytes=fmt.nbytes, bf16_bytes=n * k * 2, max_relative_error=error,
            default_config=vars(default), default_us=default_ms * 1e3,
            default_bandwidth_fraction=moved / (default_ms * 1e-3) / bandwidth,
            serial_us=serial_us, serial_bandwidth_fraction=moved / (serial_us * 1e-6) / bandwidth,
            best_config=vars(best), best_us=best_ms * 1e3, best_bandwidth_fraction=moved / (best_ms * 1e-3) / bandwidth,
            bf16_gemv_us=bf16_ms * 1e3, bf16_bandwidth_fraction=(n * k * 2 + 4 * (n + k)) / (bf16_ms * 1e-3) / bandwidth,
            speedup_vs_bf16_default=bf16_ms / default_ms, speedup_vs_bf16_best=bf16_ms / best_ms,
            eager_us=time_ms(lambda: hqq_linear(x1, w)) * 1e3, bf16_eager_us=time_ms(lambda: F.linear(x1, dense)) * 1e3,
            batch4_us=graph_us(lambda q: hqq_linear(x4, q), copies), bf16_batch4_us=graph_us(lambda d: F.linear(x4, d), dense_copies),
            batch8_us=graph_us(lambda q: hqq_linear(x8, q), copies), bf16_batch8_us=graph_us(lambda d: F.linear(x8, d), dense_copies),
            batch512_us=graph_us(lambda q: hqq_linear(x512, q), copies),
            bf16_batch512_us=graph_us(lambda d: F.linear(x512, d), dense_copies),
        )
        rows.append(row)
        print(f"{shape_name:18s} {bits}-bit g{spec.group_size}: default {row['default_us']:7.1f} us "
              f"({row['default_bandwidth_fraction']:.0%} of bw; {row['serial_us']:.1f} us serial), best {row['best_us']:7.1f} us "
              f"({row['best_bandwidth_fraction']:.0%}) {vars(best)}, bf16 {row['bf16_gemv_us']:7.1f} us "
              f"({row['bf16_bandwidth_fraction']:.0%}); eager {row['eager_us']:.1f} vs {row['bf16_eager_us']:.1f} us; "
              f"batch 4 {row['batch4_us']:.1f} vs {row['bf16_batch4_us']:.1f} us; "
              f"batch 8 {row['batch8_us']:.1f} vs {row['bf16_batch8_us']:.1f} us; "
              f"batch 512 {row['batch512_us']:.1f} vs {row['bf16_batch512_us']:.1f} us", flush=True)

    summary = dict(
        benchmark="quant_kernels", card=props.name, measured_bandwidth_bytes_per_s=bandwidth,
        target_bandwidth_fraction=TARGET,
        meets_target_default=all(r["default_bandwidth_fraction"] >= TARGET and r["speedup_vs_bf16_default"] > 1 for r in rows),
        meets_target_best=all(r["best_bandwidth_fraction"] >= TARGET and r["speedup_vs_bf16_best"] > 1 for r in rows),
        rows=rows, torch=torch.__version__, triton=triton.__version__,
        git_commit=os.environ.get("MOE_OFFLOAD_COMMIT")     # the device's copy of the tree may report a stale HEAD
        or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        timing=f"CUDA graph replay over {COPIES} copies of the weight (L2-cold, no launch cost), programmatic dependent "
               "launch where the card has it (serial_us: without); eager_us: do_bench, launch included",
        command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
