"""HQQ matrix products on the GPU, in Triton (an optional, GPU-only dependency): the entry points.

    y = hqq_linear(x, weight)          # x (..., K) on CUDA, weight a QuantizedWeight there -> (..., N)
    hqq_gemv(x, weight, out)           # 1 to MAX_GEMV_ROWS rows of x, into out
    hqq_grouped_gemv(x, weight, slots, out, slot_stride, ...)   # many experts' products in one launch

Up to MAX_GEMV_ROWS rows of x (decode) run a fused dequantize-and-multiply GEMV; more rows (prefill), and groups
the GEMV does not tile, dequantize the matrix with a second kernel and use cuBLAS. The parts, by job:

    kernel_config.py       launch configuration and tiling rules (KernelConfig, default_config, ...): plain Python
    kernel_gemv.py         the GEMV kernel and its helpers; its docstring explains how it works
    kernel_dequantize.py   the dequantize kernel, and the scale-and-zero decoding both kernels share
    kernel_ptx.py          the inline-PTX helpers (HFMA2, F2FP, DP4A, SHFL) and their interpreter stand-ins

On compute capability 9.0 and up a GEMV is a programmatic dependent launch that reads its weight before the kernel
before it has finished, so that kernel must not write the weight (kernel_gemv.py's docstring). Checked on the CPU
with TRITON_INTERPRET=1 (tests/test_quant_kernels.py, tests/test_kernel_config.py) and timed on the GPU by
benchmarks/quant_kernels.py; design and measurements: docs/quantization.md.
"""

from __future__ import annotations

import functools
import os

import torch

from .kernel_config import (MAGIC, MAX_GEMV_ROWS, MAX_SPLITS, PAIR_MAGIC, KernelConfig, _masks_groups, codes_per_step,
                            decodes_in_pairs, default_config, gemv_tiles, quantizes_x, weight_eviction, x_bytes,
                            x_lanes)

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: nothing here is defined (weight.py falls back to dequantize-then-matmul)
    AVAILABLE = False

if AVAILABLE:
    from .kernel_dequantize import _dequantize_kernel
    from .kernel_gemv import _gemv_kernel


_ACCUMULATORS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []     # accumulators a larger launch replaced: never freed (see _accumulators)


def _accumulators(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed uint64 accumulators (_add_partial), one per output value, that every GEMV leaves zeroed again.
    Kernels that share them must run in order (one stream), as the model's matmuls do.

    When a launch needs more, a larger buffer takes over, and the one it replaces is kept, never freed: a CUDA
    graph captured earlier (a smaller decode bucket, step.py) holds its address and adds into it on every replay.
    Freed, its memory would go to other tensors, and those replays would read their bytes as partial sums and
    counts (rows never written, or garbage: NaN downstream) and zero them."""
    sums = _ACCUMULATORS.get(device)
    if sums is None or sums.numel() < count:
        if sums is not None:
            _OUTGROWN.append(sums)
        sums = _ACCUMULATORS[device] = torch.zeros(max(count, 1 << 16), dtype=torch.int64, device=device)
    return sums.view(torch.uint64)


@functools.cache
def _sm_count(device: torch.device) -> int | None:
    """The GPU's streaming multiprocessors (None off CUDA: the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


@functools.cache
def _dependent_launch(device: torch.device) -> bool:
    """Whether GEMVs launch before the kernel before them has finished (programmatic dependent launch: compute
    capability 9.0 and up, Triton 3.4 and up, never in the interpreter)."""
    return (os.environ.get("TRITON_INTERPRET") != "1" and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _meta_arg(weight) -> torch.Tensor:
    return weight.scale if weight.meta is None else weight.meta     # not read without QUANT_META


def hqq_gemv(x: torch.Tensor, weight, out: torch.Tensor, config: KernelConfig | None = None) -> None:
    """out (M, N) = x (M, K) @ weight.T for 1 to MAX_GEMV_ROWS rows, in out's dtype; x and out contiguous."""
    _launch_gemv(x, weight, out, config, x.shape[0])


def hqq_grouped_gemv(x: torch.Tensor, weight, slots: torch.Tensor, out: torch.Tensor, slot_stride: int,
                     matrices: int = 1, matrix_stride: int = 0, x_per_row: int = 1) -> None:
    """Many experts' products in one launch: out[p, j] (N,) = (matrix j of the expert in slot slots[p]) @
    x[p // x_per_row], for every pair p of the int32 device table `slots` and j < matrices.

    `weight` is matrix 0 as it sits in slot 0 of a layer's slot buffer (views into it); the same matrix of slot s
    lies s * slot_stride bytes further, matrix j of a slot j * matrix_stride bytes after matrix 0 (w1 and w3 of an
    expert: the same shape and spec). Each product is the one hqq_gemv computes for one row of x, bit for bit.
    x (rows, K) and out (pairs, matrices, N) contiguous."""
    _launch_gemv(x, weight, out, None, 1, (slots, slot_stride, matrix_stride, matrices, x_per_row))


def _launch_gemv(x, weight, out, config, rows_of_x, grouped=None) -> None:
    n, k = weight.shape
    spec = weight.spec
    padded = weight.padded_rows         # the rows programs are launched for, as one_wave_groups counts them
    config = config or default_config(spec.bits, spec.group_size, padded, k, rows_of_x, _sm_count(x.device))
    pdl = config.dependent_launch and _dependent_launch(x.device)
    if config.unrolled and weight.meta is not None and config.rows_per_thread not in (1, 2) and config.rows_per_thread % 4:
        raise ValueError(f"rows_per_thread must be 1, 2 or a multiple of 4 when unrolled (a thread's 8-bit scale "
                         f"codes are whole 32-bit words), not {config.rows_per_thread}")
    groups = k // spec.group_size
    splits = -(-groups // (config.groups_per_split * config.warps))
    blocks = -(-padded // (32 * config.rows_per_thread))
    meta = _meta_arg(weight)
    integer_x = quantizes_x(spec.bits, spec.group_size, rows_of_x, config)
    paired = decodes_in_pairs(spec.bits) and not integer_x
    if splits > MAX_SPLITS:
        raise ValueError(f"{splits} programs would add partial sums into each row, at most {MAX_SPLITS} can: give "
                         f"each more groups (KernelConfig.groups_per_split)")
    slots, slot_stride, matrix_stride, matrices, x_per_row = grouped or (meta, 0, 0, 1, 1)
    products = slots.shape[0] * matrices if grouped else 1
    _gemv_kernel[(blocks, splits, products)](
        x, weight.packed, weight.scale, weight.zero, meta, _accumulators(x.device, rows_of_x * padded * products), out,
        PAIR_MAGIC if paired else MAGIC,
        n, k, padded, groups, config.groups_per_split, splits,
        slots, slot_stride, matrix_stride, matrices, x_per_row,
        BITS=spec.bits, GROUP=spec.group_size, STEP=codes_per_step(spec.bits), PAIRED=paired,
        X_LANES=x_lanes(spec.bits, spec.group_size) if integer_x else 0, X_BYTES=x_bytes(spec.bits),
        META_GROUP=spec.meta_group_size,
        QUANT_META=weight.meta is not None, X_ROWS=rows_of_x, ROWS_PER_THREAD=config.rows_per_thread,
        THREADS=32 * config.warps, UNROLLED_GROUPS=config.groups_per_split if config.unrolled else 0,
        # grouped: the slot table is read after the wait, so nothing can be loaded before it
        EARLY_GROUPS=min(config.early_groups, config.groups_per_split) if config.unrolled and not grouped else 0,
        PDL=pdl, MASK_GROUPS=_masks_groups(integer_x, groups, config), EVICTION=weight_eviction(spec.bits, rows_of_x),
        GROUPED=grouped is not None,
        num_warps=config.warps, **({"launch_pdl": True} if pdl else {}),   # a launch option of Triton 3.4+
        **({"maxnreg": config.max_registers} if config.max_registers else {}),
    )


def dequantize_transposed(weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a (K, N) matrix in `dtype`, by the dequantize kernel."""
    n, k = weight.shape
    spec = weight.spec
    meta = _meta_arg(weight)
    out = torch.empty((k, n), device=weight.packed.device, dtype=dtype)
    block_n = 128
    _dequantize_kernel[(k // spec.group_size, triton.cdiv(weight.padded_rows, block_n))](
        weight.packed, weight.scale, weight.zero, meta, out, n, weight.padded_rows, weight.packed.shape[0],
        BITS=spec.bits, GROUP=spec.group_size, META_GROUP=spec.meta_group_size, QUANT_META=weight.meta is not None,
        BLOCK_N=block_n,
    )
    return out


def hqq_linear(x: torch.Tensor, weight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; `config` overrides the GEMV's default tiling (benchmarks)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.data_ptr() % 16:       # the GEMV reads x 8 bytes at a time
        x2 = x2.clone(memory_format=torch.contiguous_format)
    if x2.shape[0] <= MAX_GEMV_ROWS and gemv_tiles(weight.spec.bits, weight.spec.group_size):
        out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
        hqq_gemv(x2, weight, out, config)
    else:
        out = x2 @ dequantize_transposed(weight, x2.dtype)
    return out.view(*x.shape[:-1], n)
