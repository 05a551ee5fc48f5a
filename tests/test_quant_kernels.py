"""The Triton dequantize-and-multiply kernel against its slow twin, dequantize-then-matmul.

On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1, tiny shapes; skipped when Triton
is not installed: it is a GPU-only dependency). The `gpu` tests run it compiled, on Mixtral's
expert shapes.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moe_offload.config import QUANT_BITS, QuantSpec  # noqa: E402
from moe_offload.quant.kernel_config import (MAX_GEMV_ROWS, MAX_SPLITS, KernelConfig, decodes_in_pairs,  # noqa: E402
                                             quantizes_x, x_bytes)
from moe_offload.quant.kernels import hqq_linear  # noqa: E402
from moe_offload.quant.weight import PackedFormat  # noqa: E402

from conftest import slow_beyond_pairs, slow_except  # noqa: E402

# In the interpreter an overflow or NaN in numpy means a kernel computed on garbage, as when the meta index of
# the grid's last block once read past the meta (its lanes were masked at the store, so only this showed it).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@functools.cache
def quantized(n: int, k: int, spec: QuantSpec, device="cpu", seed: int = 0):
    """A random (n, k) weight, quantized on `device`, its buffer there."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    fmt = PackedFormat([((n, k), spec)])
    (w,) = fmt.view(fmt.pack([weight], device).to(device))
    return w


def as_the_kernel_rounds_it(x: torch.Tensor, bits: int, group_size: int, config: KernelConfig | None = None):
    """x as the GEMV multiplies it: with one byte of integer x (kernel_config.x_bytes), each x_k rounded (ties to even)
    to a step of 1/127 of its group's largest |x|, in fp32 as the kernel does; else x (two bytes keep about 2^-16
    of each group's largest |x|, within the tolerances here)."""
    if not (quantizes_x(bits, group_size, x.shape[0], config) and x_bytes(bits) == 1):
        return x
    groups = x.float().reshape(x.shape[0], -1, group_size)
    largest = groups.abs().amax(-1, keepdim=True)
    high = torch.round(groups * (127 / largest.clamp_min(1e-30)))
    return (high * (largest / 127)).reshape(x.shape)


CPU_CASES = {   # (rows of x, config)
    "gemv": (1, None),
    # programs add partial sums; the last split is ragged; two groups loaded before the wait for the kernel before
    "gemv_split_k": (1, KernelConfig(2, 2, 4, unrolled=True, early_groups=2)),
    "gemv_loop": (1, KernelConfig(2, 2, 4, unrolled=False)),
    "gemv_one_program": (1, KernelConfig(8, 1, 6, unrolled=True)),    # a thread's codes in two words
    "gemv_three_rows": (3, None),                            # rows of x share the decoded codes
    "gemv_eight_rows_split_k": (8, KernelConfig(2, 2, 4, unrolled=False)),
    "dequantize_then_matmul": (9, None),
}
CPU_SHAPES = {   # (N, K): padded rows and a ragged block of rows; whole blocks (two at 2 rows a thread)
    "ragged": (37, 192),
    "aligned": (128, 64),
}
CPU_SPECS = {   # meta runs that a thread's rows share, or not; a group the GEMV does not tile (dequantize + matmul)
    "runs_of_128": lambda bits: QuantSpec(bits, 32, quant_meta=bits != 4),
    "runs_of_6": lambda bits: QuantSpec(bits, 64, meta_group_size=6),
    "groups_of_16": lambda bits: QuantSpec(bits, 16),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("bits, case, shape, spec", slow_beyond_pairs(QUANT_BITS, CPU_CASES, CPU_SHAPES, CPU_SPECS))
def test_interpreted_kernel_matches_dequantize_then_matmul(bits, case, shape, spec):
    m, config = CPU_CASES[case]
    n, k = CPU_SHAPES[shape]
    w = quantized(n, k, CPU_SPECS[spec](bits))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    expected = F.linear(as_the_kernel_rounds_it(x, bits, w.spec.group_size, config), w.dequantize())
    actual = hqq_linear(x, w, config)
    assert actual.shape == expected.shape
    tolerance = interpreted_tolerance(bits, w.spec.group_size, m, config)
    assert (actual - expected).abs().max() <= tolerance * expected.abs().max()


def interpreted_tolerance(bits: int, group_size: int, rows_of_x: int, config: KernelConfig | None) -> float:
    """Of the largest output. Codes decoded in pairs are summed in fp16 after x is rounded to fp16 (this
    fp32 x; bf16 x is exact there): each product and sum rounds at 2^-11. With more than MAX_GEMV_ROWS rows
    it is dequantize-then-matmul. Integer x in two bytes carries about 2^-16 of each group's largest |x|, 2^-14
    where a code sits 2 bits up its byte and its x is quantized at a quarter (3 bits; measured up to 8e-5); in one
    byte (2 bits) the expected product takes x as the kernel rounds it (as_the_kernel_rounds_it), and what is
    left is fp32's rounding; codes decoded to 2^(23 - p) + code, 2^(23 - p) <= 2^8 (kernel_gemv.WINDOW_BITS), about
    2^-16 of the output."""
    if quantizes_x(bits, group_size, rows_of_x, config):
        return 2e-4
    paired = decodes_in_pairs(bits) and rows_of_x <= MAX_GEMV_ROWS
    return 5e-3 if paired else 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_up_to_max_splits_programs_add_into_a_row_and_leave_the_same_bits_each_call():
    w = quantized(37, 16 * MAX_SPLITS, QuantSpec(2, 16))
    x = torch.randn(1, 16 * MAX_SPLITS, generator=torch.Generator().manual_seed(1))
    config = KernelConfig(2, 1, 1, unrolled=False)          # one group a program: MAX_SPLITS partial sums a row
    expected = F.linear(x, w.dequantize())
    actual = hqq_linear(x, w, config)
    assert (actual - expected).abs().max() <= interpreted_tolerance(2, 16, 1, config) * expected.abs().max()
    assert torch.equal(hqq_linear(x, w, config), actual)   # the accumulators were left zeroed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_more_than_max_splits_programs_a_row_is_refused():
    w = quantized(37, 16 * (MAX_SPLITS + 1), QuantSpec(2, 16))
    with pytest.raises(ValueError, match=f"{MAX_SPLITS + 1} programs would add partial sums into each row"):
        hqq_linear(torch.randn(1, 16 * (MAX_SPLITS + 1)), w, KernelConfig(2, 1, 1, unrolled=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # inf times a code of 0, on purpose
def test_rows_whose_partial_sums_are_not_finite_or_too_large_come_out_nan():
    w = quantized(32, 64, QuantSpec(8, 16))          # codes as fp32: the 1e12 stays finite up to the sums
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[0, 0] = float("inf")
    x[1, 0] = 1e12                          # |partial sums| of 2^26 and more do not fit the accumulators
    config = KernelConfig(1, 1, 1, unrolled=False)
    actual = hqq_linear(x, w, config)
    assert torch.isnan(actual[:2]).all()
    expected = F.linear(x[2:], w.dequantize())
    assert (hqq_linear(x[2:], w, config) - expected).abs().max() <= 1e-4 * expected.abs().max()   # zeroed again


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integer_x_scales_each_group_of_x_on_its_own(bits):
    """Small values next to groups of zeros keep the integer path's precision, and an outlier of 3000 in
    another group adds its own product without changing the others' sums (with one scale for all of x, the
    small values would lose all but a few bits)."""
    n, k = 32, 256
    w = quantized(n, k, QuantSpec(bits, 32))

    def expected_product(x):
        return F.linear(as_the_kernel_rounds_it(x, bits, 32).double(), w.dequantize().double())

    small = torch.randn(1, k, generator=torch.Generator().manual_seed(1)) * 0.1
    small[0, :64] = 0
    expected = expected_product(small)
    actual = hqq_linear(small, w).double()
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    outlier = small.clone()
    outlier[0, 40] = 3000.0
    added = hqq_linear(outlier, w).double() - actual
    assert (added - (expected_product(outlier) - expected)).abs().max() <= 1e-3 * expected.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_one_byte_x_errs_at_most_half_a_step_of_each_group_times_the_weights():
    """At 2 bits (one byte of x) the product differs from that of x itself by at most sum over groups of half
    a step (1/254 of the group's largest |x|) times the group's sum of |w|, with a little room for fp32."""
    n, k, group = 64, 512, 16
    w = quantized(n, k, QuantSpec(2, group))
    assert x_bytes(2) == 1
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).double()
    x[0, :16] *= 100                                     # a group of large values beside ordinary ones
    weight = w.dequantize().double()
    exact = F.linear(x, weight)
    half_steps = x.reshape(-1, group).abs().amax(-1) / 254
    bound = (weight.abs().reshape(n, -1, group).sum(-1) * half_steps).sum(-1)
    error = (hqq_linear(x.float(), w).double() - exact).abs()[0]
    assert (error <= bound * 1.001 + 1e-6).all()
    assert error.max() > bound.max() / 100      # the bound is not loose by orders of magnitude


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_three_bit_groups_of_128_take_codes_as_floats():
    """At 3 bits a group of 128 has more planes (36) than a warp has lanes: the GEMV decodes its codes as floats."""
    w = quantized(32, 256, QuantSpec(3, 128))
    assert not quantizes_x(3, 128, 1)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x, w.dequantize())
    assert (hqq_linear(x, w) - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("bits", [2, 4])
def test_paired_codes_keep_large_activations_finite(bits):
    """fp16 sums of a group of 64 with every |x| near 4000 (kernel_gemv._group_pair_sums's bound) and every code
    at the far end of its range: the worst case for overflow. Two rows of x: one row takes integer x."""
    n, k = 32, 128
    fmt = PackedFormat([((n, k), QuantSpec(bits, 64))])
    (w,) = fmt.view(fmt.pack([torch.randn(n, k) / k ** 0.5]))
    w.packed.zero_()                          # every code 0: q - 2^(bits - 1) at its most negative
    x = torch.full((2, k), 3900.0)
    expected = F.linear(x, w.dequantize())
    actual = hqq_linear(x, w)
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max() <= 5e-3 * expected.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_gemv_refuses_rows_per_thread_that_split_a_word_of_scale_codes():
    w = quantized(64, 64, QuantSpec(2, 16))
    with pytest.raises(ValueError, match="rows_per_thread must be 1, 2 or a multiple of 4"):
        hqq_linear(torch.randn(1, 64), w, KernelConfig(3, 1, 4, unrolled=True))


MIXTRAL_SHAPES = ((14336, 4096), (4096, 14336))   # w1/w3 and w2 of one expert


@pytest.mark.gpu
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("shape", MIXTRAL_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 8, 100])
def test_gpu_kernel_matches_dequantize_then_matmul(bits, shape, m):
    spec = QuantSpec(bits)
    w = quantized(*shape, spec, device="cuda")
    x = torch.randn(m, shape[1], device="cuda").to(torch.bfloat16)
    expected = F.linear(as_the_kernel_rounds_it(x.float(), bits, spec.group_size), w.dequantize(torch.float32))
    actual = w.linear(x)        # dispatches to the kernel on CUDA
    assert actual.dtype == torch.bfloat16 and actual.shape == (m, shape[0])
    assert (actual.float() - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert torch.equal(w.linear(x), actual)   # deterministic: the same bits every call


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("rows, warps, columns, early", [(1, 2, 128, 1), (2, 1, 128, 1), (4, 4, 256, 3), (4, 8, 64, 1)],
                         ids=["1x2", "2x1", "4x4", "4x8"])
def test_gpu_integer_x_tilings_match_dequantize_then_matmul(bits, rows, warps, columns, early):
    """The shuffles of integer x take element t of a (threads, 1) tensor to be thread t's (kernel_config.quantizes_x):
    other row, warp and column counts than the default's, at 2 bits (groups of 16) and 3 (groups of 64)."""
    spec = QuantSpec(bits)
    config = KernelConfig(rows, warps, max(1, columns // spec.group_size), unrolled=True, early_groups=early)
    assert quantizes_x(bits, spec.group_size, 1, config)
    w = quantized(14336, 4096, spec, device="cuda")
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    expected = F.linear(as_the_kernel_rounds_it(x.float(), bits, spec.group_size, config), w.dequantize(torch.float32))
    assert (hqq_linear(x, w, config).float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.gpu
def test_gpu_kernel_result_does_not_depend_on_the_buffer_address():
    spec = QuantSpec(2)
    fmt = PackedFormat([((4096, 14336), spec)])
    buffer = fmt.pack([torch.randn(4096, 14336) / 120], "cuda")
    (a,) = fmt.view(buffer.cuda())
    elsewhere = torch.empty(fmt.nbytes + 4096, dtype=torch.uint8, device="cuda")[4096:]
    elsewhere.copy_(buffer)
    (b,) = fmt.view(elsewhere)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(a.linear(x), b.linear(x))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_gpu_chained_gemvs_read_the_output_of_the_one_before(bits):
    """w2(w1(x)) four times over in one CUDA graph (back to back: on 9.0 and up each GEMV launches before the one
    before has finished) gives the bits of the same calls with the device synchronised after each."""
    w1 = quantized(14336, 4096, QuantSpec(bits), device="cuda")
    w2 = quantized(4096, 14336, QuantSpec(bits), device="cuda", seed=1)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)

    def chain(y, sync=False):
        for w in (w1, w2) * 4:
            y = hqq_linear(y, w)
            if sync:
                torch.cuda.synchronize()
        return y

    stepped = chain(x, sync=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chained = chain(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(stepped).all()
    assert torch.equal(chained, stepped)


@pytest.mark.gpu
def test_gpu_quantized_model_agrees_with_the_cpu_path():
    """The shipped model at 4/2 in bf16 on CUDA (kernels) against fp32 on the CPU (dequantize-then-matmul)."""
    from moe_offload.config import QuantConfig, RuntimeConfig
    from moe_offload.engine import Engine
    from moe_offload.perplexity import perplexity

    from conftest import EVAL_TEXT, SHIPPED_MODEL

    results = {}
    for device, dtype in (("cuda", "bfloat16"), ("cpu", "float32")):
        engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device=device, dtype=dtype, quant=QuantConfig.parse("4/2")),
                             progress=False)
        token_ids = engine.tokenizer.encode(EVAL_TEXT.read_text()[:20000])
        results[device] = perplexity(engine, token_ids, 512, max_windows=2).perplexity
    assert abs(results["cuda"] / results["cpu"] - 1) < 0.02, results


@pytest.mark.gpu
def test_gpu_decode_path_agrees_with_prefill_on_perplexity():
    """Batch-1 decode runs the GEMV (at 2 bits with one byte of x), prefill dequantize-then-cuBLAS: the shipped
    model at 4/2 predicts one window of the eval text as well token by token as all at once."""
    from moe_offload.config import QuantConfig, RuntimeConfig
    from moe_offload.engine import Engine
    from moe_offload.generate import prefill

    from conftest import EVAL_TEXT, SHIPPED_MODEL

    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cuda", dtype="bfloat16",
                                       quant=QuantConfig.parse("4/2")), progress=False)
    ids = engine.tokenizer.encode(EVAL_TEXT.read_text()[:20000])[:256]
    targets = torch.tensor(ids[1:], device="cuda")
    all_at_once = prefill(engine.model, engine.cache, ids, "cuda", last_only=False)[:-1]
    one_by_one = torch.cat([engine.model(torch.tensor([[token]], device="cuda"), engine.cache, position)[0]
                            for position, token in enumerate(ids[:-1])])
    nll = [F.cross_entropy(logits, targets).item() for logits in (all_at_once, one_by_one)]
    assert abs(nll[1] / nll[0] - 1) < 0.01, nll


GROUPED_SPECS = {"2-bit g16": QuantSpec(2, 16), "3-bit g32": QuantSpec(3, 32), "4-bit g64 fp16 meta": QuantSpec(4, 64, quant_meta=False)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("spec", slow_except(GROUPED_SPECS, "2-bit g16"))     # the experts' format at --quant 4/2
def test_grouped_gemv_is_each_experts_gemv_bit_for_bit(spec):
    """One launch over a slot buffer (w1 and w3 of two tokens' top-2 experts) gives what one GEMV per expert
    and matrix gives, bit for bit: the slot table only moves the weight's pointers."""
    from moe_offload.experts import Expert, ExpertSlots, slot_stride
    from moe_offload.quant.kernels import hqq_gemv, hqq_grouped_gemv
    from moe_offload.quant.weight import HQQExpertFormat

    hidden, ffn, top_k = 64, 128, 2
    fmt = HQQExpertFormat(hidden, ffn, GROUPED_SPECS[spec])
    generator = torch.Generator().manual_seed(0)
    slots = ExpertSlots(fmt, 3, slot_stride(fmt.nbytes), "cpu")
    for slot in range(3):
        expert = Expert(*(torch.randn(shape, generator=generator) / shape[1] ** 0.5
                          for shape in ((ffn, hidden), (hidden, ffn), (ffn, hidden))))
        slots.memory[slot, :fmt.nbytes] = fmt.pack(expert)
    x = torch.randn(2, hidden, generator=generator)
    table = torch.tensor([2, 0, 1, 2], dtype=torch.int32)          # token 0: slots 2, 0; token 1: slots 1, 2
    out = torch.empty(4, 2, ffn)
    hqq_grouped_gemv(x, slots.experts[0].w1, table, out, slots.memory.stride(0), matrices=2,
                     matrix_stride=fmt.w3_offset, x_per_row=top_k)
    for pair, slot in enumerate(table.tolist()):
        for j, weight in enumerate((slots.experts[slot].w1, slots.experts[slot].w3)):
            expected = torch.empty(1, ffn)
            hqq_gemv(x[pair // top_k:pair // top_k + 1].contiguous(), weight, expected)
            assert torch.equal(out[pair, j], expected[0]), (pair, j)
    down = torch.empty(4, hidden)
    hqq_grouped_gemv(out[:, 0].contiguous(), slots.experts[0].w2, table, down, slots.memory.stride(0))
    for pair, slot in enumerate(table.tolist()):
        expected = torch.empty(1, hidden)
        hqq_gemv(out[pair:pair + 1, 0].contiguous(), slots.experts[slot].w2, expected)
        assert torch.equal(down[pair], expected[0]), pair


def test_outgrown_gemv_accumulators_stay_allocated_for_the_graphs_that_captured_them():
    """A larger GEMV launch replaces the shared accumulators; a CUDA graph captured before (a smaller decode bucket)
    still adds into the old buffer on every replay, so that buffer must never go back to the allocator."""
    import gc
    import weakref

    from moe_offload.quant import kernels

    device = torch.device("cpu")
    kernels._accumulators(device, 1)
    old = weakref.ref(kernels._ACCUMULATORS[device])
    grown = kernels._accumulators(device, kernels._ACCUMULATORS[device].numel() + 1)
    gc.collect()
    assert old() is not None and old().data_ptr() != grown.data_ptr()
