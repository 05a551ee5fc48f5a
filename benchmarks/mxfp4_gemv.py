"""GPU: the MXFP4 GEMV (quant/kernel_mxfp4.py) on gpt-oss-120b's expert shape, next to a bf16 GEMV.

    python benchmarks/mxfp4_gemv.py --out $OUT/mxfp4_gemv.json       # CUDA + Triton needed; about 2 minutes
    python benchmarks/mxfp4_gemv.py --no-sweep                       # the default launch shape only

gpt-oss-120b (the published config.json): hidden 2880, expert ffn (intermediate_size) 2880, 128 experts, top-4;
w1 and w3 are 2880 x 2880 each (the hub interleaves them as gate_up_proj 5760 x 2880), w2 2880 x 2880. In one run:
1. the card's memory bandwidth, measured: a 1 GiB device-to-device copy (read + write bytes / time);
2. one 2880 x 2880 product at batch 1, 4 and 8 (rows of x, bf16): a check against the slow twin, then its time
   with the default launch shape (what the runtime uses) and, at batch 1, the best of a small sweep; the
   bandwidth over the bytes it must read (codes, scales, x) and write, as a fraction of the copy's; a bf16 GEMV
   of the same shape (cuBLAS through F.linear) beside it;
3. one decode step's experts of one layer as the runtime launches them (MXFP4ExpertFormat.grouped_swiglu, top-4,
   from a slot buffer of all 128 experts: w1 + w3 in one launch, the clamped SwiGLU, w2), its bandwidth over the
   4 experts' bytes, next to 4 bf16 experts one after another (two F.linear each: gate_up, down).
Times replay a CUDA graph of calls on COPIES copies of the weight at different addresses (more bytes than the L2
holds, so every call reads from memory), without Python's launch cost. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from moe_offload.experts import ExpertBatch, ExpertSlots, slot_stride
from moe_offload.quant.kernel_mxfp4 import DEFAULT_CONFIG, MXFP4Config, _sm_count, mxfp4_gemv, splits_for
from moe_offload.quant.mxfp4 import MXFP4ExpertFormat, MXFP4Weight
from quant_kernels import graph_us, measured_bandwidth     # benchmarks/ is the script's folder

HIDDEN, FFN, EXPERTS, TOP_K = 2880, 2880, 128, 4      # gpt-oss-120b
DEVICE = "cuda"
TARGET = 0.60         # of the measured memory bandwidth, at batch 1 (issue 31)
COPIES = 24           # 24 x 4.4 MB > the 50-60 MB L2 of an H100/H200


def graph_time_us(calls) -> float:
    """Median microseconds of one call, the calls (each on its own copy) replayed as one CUDA graph (quant_kernels.py's
    timing: warm-up, then WINDOWS windows of REPLAYS replays)."""
    return graph_us(lambda call: call(), calls)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, read plus written bytes."""
    return measured_bandwidth() / 1e9


def random_weights(n: int, k: int, copies: int) -> list[MXFP4Weight]:
    """Codes uniform over all bytes, scales around gpt-oss's (2^-9 .. 2^2)."""
    return [MXFP4Weight(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE),
                        torch.randint(118, 130, (n, k // 32), dtype=torch.uint8, device=DEVICE)) for _ in range(copies)]


def gemv_case(weights, rows: int, config: MXFP4Config | None, bandwidth: float) -> dict:
    n, k = weights[0].shape
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    outs = [torch.empty(rows, n, device=DEVICE, dtype=torch.bfloat16) for _ in weights]
    mxfp4_gemv(x, weights[0], outs[0], config=config)
    expected = x.float() @ weights[0].dequantize().t()
    error = float((outs[0].float() - expected).abs().max() / expected.abs().max())
    us = graph_time_us([lambda w=w, o=o: mxfp4_gemv(x, w, o, config=config) for w, o in zip(weights, outs)])
    moved = weights[0].codes.numel() + weights[0].scales.numel() + 2 * rows * (n + k)
    gbps = moved / us / 1e3
    return dict(rows=rows, config=list(config or DEFAULT_CONFIG), splits=splits_for(n, k, 1, config or DEFAULT_CONFIG,
                _sm_count(x.device)), us=round(us, 2), gbps=round(gbps, 1), of_copy=round(gbps / bandwidth, 3),
                max_rel_error=error)


def bf16_case(n: int, k: int, rows: int, bandwidth: float) -> dict:
    copies = max(2, (60 << 20) // (n * k * 2) + 1)
    weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    us = graph_time_us([lambda w=w: F.linear(x, w) for w in weights])
    gbps = (n * k * 2 + 2 * rows * (n + k)) / us / 1e3
    return dict(rows=rows, us=round(us, 2), gbps=round(gbps, 1), of_copy=round(gbps / bandwidth, 3))


def grouped_case(bandwidth: float) -> dict:
    """One layer's decode step, top-4 of 128 experts in their slot buffer, as MXFP4ExpertFormat runs it."""
    fmt = MXFP4ExpertFormat(HIDDEN, FFN, torch.bfloat16, biases=True, swiglu=(1.702, 7.0))
    slots = ExpertSlots(fmt, EXPERTS, slot_stride(fmt.nbytes), DEVICE)
    slots.memory.random_(0, 256)
    for s in range(EXPERTS):                      # sane scales and biases (random bytes would give NaN/inf)
        for slot in fmt.slots[1:6:2]:
            slot.view(slots.memory[s, :fmt.nbytes]).random_(118, 130)
        for slot in fmt.slots[6:]:
            slot.view(slots.memory[s, :fmt.nbytes]).normal_(0, 0.02)
    x = torch.randn(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 0.1
    tables = [torch.randperm(EXPERTS, device=DEVICE)[:TOP_K].to(torch.int32) for _ in range(COPIES)]
    batches = [ExpertBatch(slots.memory, slots.experts, t, None) for t in tables]
    us = graph_time_us([lambda b=b: fmt.grouped_swiglu(b, x, TOP_K) for b in batches])
    gbps = TOP_K * fmt.nbytes / us / 1e3
    dense = [(torch.randn(2 * FFN, HIDDEN, device=DEVICE, dtype=torch.bfloat16),
              torch.randn(HIDDEN, FFN, device=DEVICE, dtype=torch.bfloat16)) for _ in range(TOP_K * 2)]
    def bf16_step(offset):
        for gate_up, down in dense[offset:offset + TOP_K]:
            h = F.linear(x, gate_up)
            F.linear(F.silu(h[:, :FFN]) * h[:, FFN:], down)
    bf16_us = graph_time_us([lambda: bf16_step(0), lambda: bf16_step(TOP_K)])
    bf16_gbps = TOP_K * 3 * HIDDEN * FFN * 2 / bf16_us / 1e3
    return dict(experts=TOP_K, expert_bytes=fmt.nbytes, us=round(us, 2), gbps=round(gbps, 1),
                of_copy=round(gbps / bandwidth, 3), bf16_us=round(bf16_us, 2), bf16_gbps=round(bf16_gbps, 1),
                bf16_of_copy=round(bf16_gbps / bandwidth, 3))


SWEEP = dict(block_n=(8, 16, 32), block_g=(4, 8, 16), splits=(0, 2), warps=(4, 8))   # 36 shapes, ~1 min of compiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--no-sweep", action="store_true", help="the default launch shape only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s")
    weights = random_weights(FFN, HIDDEN, COPIES)
    result = dict(device=torch.cuda.get_device_name(), copy_gbps=round(bandwidth, 1), shape=[FFN, HIDDEN],
                  target_of_copy=TARGET, mxfp4={}, bf16={}, sweep=[])
    for rows in (1, 4, 8):
        case = result["mxfp4"][rows] = gemv_case(weights, rows, None, bandwidth)
        dense = result["bf16"][rows] = bf16_case(FFN, HIDDEN, rows, bandwidth)
        print(f"batch {rows}: mxfp4 {case['us']:7.2f} us {case['gbps']:7.1f} GB/s ({case['of_copy']:.0%} of copy, "
              f"err {case['max_rel_error']:.1e}) | bf16 {dense['us']:7.2f} us {dense['gbps']:7.1f} GB/s "
              f"({dense['of_copy']:.0%})")
    if not args.no_sweep:
        for values in itertools.product(*SWEEP.values()):
            config = MXFP4Config(**dict(zip(SWEEP, values)))
            try:
                result["sweep"].append(gemv_case(weights, 1, config, bandwidth))
            except Exception as error:        # a shape the compiler refuses (registers, shared memory)
                result["sweep"].append(dict(config=list(config), error=str(error)[:200]))
        timed = [c for c in result["sweep"] if "us" in c]
        best = min(timed, key=lambda c: c["us"])
        result["best_batch1"] = best
        print(f"batch 1 best of {len(timed)}: {best['config']} {best['us']:.2f} us {best['gbps']:.1f} GB/s "
              f"({best['of_copy']:.0%} of copy)")
    grouped = result["grouped_step"] = grouped_case(bandwidth)
    print(f"one layer's step, top-{TOP_K} grouped: {grouped['us']:.2f} us {grouped['gbps']:.1f} GB/s "
          f"({grouped['of_copy']:.0%}) | bf16 experts one by one {grouped['bf16_us']:.2f} us ({grouped['bf16_of_copy']:.0%})")
    result["meets_target"] = result.get("best_batch1", result["mxfp4"][1])["of_copy"] >= TARGET
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
