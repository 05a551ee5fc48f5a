"""Diagnostics for the quantized GEMV (not a benchmark): timings of variants on w1's shape, and one launch to profile."""
import sys
import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from moe_offload.config import QuantSpec
from moe_offload.quant.kernels import KernelConfig, default_config, hqq_linear
from moe_offload.quant.weight import PackedFormat


@triton.jit
def read_words(w_ptr, out_ptr, R, GROUPS_PER_WARP, BLOCK_R: tl.constexpr, WARPS: tl.constexpr, GROUP: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    warp = tl.arange(0, WARPS)
    acc = tl.zeros((WARPS, BLOCK_R), dtype=tl.int32)
    for i in range(GROUPS_PER_WARP):
        g = (tl.program_id(1) * WARPS + warp) * GROUPS_PER_WARP + i
        for j in tl.static_range(GROUP):
            k = (g * GROUP + j)[:, None]
            acc ^= tl.load(w_ptr + ((k // 16) * (R // 32) + r[None, :] // 32) * 512 + (k % 16) * 32 + r[None, :] % 32,
                           mask=(r < R)[None, :], other=0)
    tl.store(out_ptr + tl.program_id(1) * R + r, tl.sum(acc, 0), mask=r < R)


def ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    torch.manual_seed(0)
    n, k = 14336, 4096
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weights = {}
    for name, spec in (("2-bit g16 meta", QuantSpec(2)), ("2-bit g16 fp16", QuantSpec(2, 16, quant_meta=False)), ("4-bit g64 meta", QuantSpec(4))):
        fmt = PackedFormat([((n, k), spec)])
        (w,) = fmt.view(fmt.pack([torch.randn(n, k, device="cuda") / 64]).cuda())
        weights[name] = w
    if "--one" in sys.argv:
        hqq_linear(x, weights["2-bit g16 meta"])
        torch.cuda.synchronize()
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, w in weights.items():
        d = default_config(n, k, w.spec.bits, w.spec.group_size, sms)
        for cfg in (d, KernelConfig(32, 4, 1), KernelConfig(32, 8, 2), KernelConfig(64, 4, 1), KernelConfig(32, 2, 1), KernelConfig(128, 4, 1)):
            t = ms(lambda: hqq_linear(x, w, cfg)) * 1e3
            print(f"{name:16s} {str(cfg):60s} {t:7.1f} us  {w.nbytes / t / 1e6:6.2f} TB/s", flush=True)
    w = weights["2-bit g16 meta"]
    rows = w.packed_rows
    for block_r, warps, per_warp in ((32, 8, 1), (64, 4, 1), (128, 4, 1), (128, 4, 4), (64, 8, 2)):
        splits = 256 // (warps * per_warp)
        out = torch.empty(splits * rows, dtype=torch.int32, device="cuda")
        grid = (triton.cdiv(rows, block_r), splits)
        t = ms(lambda: read_words[grid](w.packed, out, rows, per_warp, BLOCK_R=block_r, WARPS=warps, GROUP=16, num_warps=warps)) * 1e3
        print(f"read words only block_r {block_r} warps {warps} per_warp {per_warp}: {t:6.1f} us {w.packed.numel() * 4 / t / 1e6:.2f} TB/s", flush=True)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    print(f"bf16 F.linear {ms(lambda: torch.nn.functional.linear(x, dense)) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
