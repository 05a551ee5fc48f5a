"""The Triton MXFP4 GEMV (quant/kernel_mxfp4.py) against its slow twin, dequantize-then-matmul (quant/mxfp4.py).

On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1, tiny shapes; skipped without Triton): random codes
and scales, then the tiny gpt-oss checkpoint the family tests write with MXFP4 experts as the hub stores them, its
decode run through the grouped kernels. The `gpu` tests run it compiled, on gpt-oss-120b's expert shape
(`python -m pytest -m gpu tests/test_mxfp4_kernel.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moe_offload.experts import ExpertBatch, ExpertSlots, slot_stride  # noqa: E402
from moe_offload.model import clamped_swiglu  # noqa: E402
from moe_offload.quant.kernel_mxfp4 import (MAX_ROWS, MXFP4Config, mxfp4_gemv, mxfp4_grouped_gemv,  # noqa: E402
                                            mxfp4_linear)
from moe_offload.quant.mxfp4 import MXFP4ExpertFormat, MXFP4Weight, dequantize  # noqa: E402

from test_mxfp4 import published  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")

CONFIGS = {   # the default; K split over 3 programs (the last ragged), a loop step of 2 groups; 8 rows a program
    "default": None,
    "split_k": MXFP4Config(block_n=16, block_g=2, splits=3, warps=4),
    "narrow": MXFP4Config(block_n=8, block_g=4, splits=0, warps=2),
}


def twin(x: torch.Tensor, weight: MXFP4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact product, in fp64."""
    y = x.double() @ weight.dequantize().double().t()
    return y if bias is None else y + bias.double()


@interpreted
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(37, 192), (64, 96)])        # a ragged block of rows; whole ones
def test_interpreted_gemv_matches_the_slow_twin(rows, config, shape):
    weight = MXFP4Weight(*published(*shape, seed=rows))
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    expected = twin(x, weight)
    actual = mxfp4_linear(x, weight, CONFIGS[config])
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert (actual.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


@interpreted
@pytest.mark.parametrize("config", CONFIGS)
def test_interpreted_gemv_adds_the_bias_once_and_rounds_once_to_bf16(config):
    weight = MXFP4Weight(*published(37, 192, seed=2))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 192, generator=generator).to(torch.bfloat16)
    bias = torch.randn(37, generator=generator).to(torch.bfloat16)
    out = torch.empty(2, 37, dtype=torch.bfloat16)
    mxfp4_gemv(x, weight, out, bias, CONFIGS[config])
    expected = twin(x.float(), weight, bias.float())
    # one rounding to bf16 of each fp32 sum, bias included: within 2^-7 of each value (Triton's interpreter truncates
    # where the GPU rounds to nearest, 2^-8: the gpu test), not a second rounding after the bias
    assert ((out.double() - expected).abs() <= 2 ** -7 * expected.abs() + 1e-6 * expected.abs().max()).all()


@interpreted
def test_more_rows_than_the_gemv_takes_dequantize_then_matmul():
    weight = MXFP4Weight(*published(37, 96))
    x = torch.randn(MAX_ROWS + 1, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mxfp4_linear(x, weight), F.linear(x, weight.dequantize()))


@interpreted
def test_extreme_scales_and_every_code_decode_exactly():
    """Every one of the 16 codes in every position of a group, under scales from 2^-100 to 2^100: a one-hot x picks
    single weights, which must come out exactly."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)       # each byte once, 16 rows
    scales = torch.tensor([27, 100, 127, 200, 227, 127, 120, 130] * 2, dtype=torch.uint8).view(16, 1)
    weight = MXFP4Weight(codes, scales)
    for start in (0, 8, 16, 24):
        x = torch.eye(32)[start:start + 8]
        assert torch.equal(mxfp4_linear(x, weight), dequantize(codes, scales)[:, start:start + 8].t())


def expert_slots(hidden: int, ffn: int, experts: int, dtype: torch.dtype, swiglu=(1.702, 1.0)):
    """A layer's slot buffer of random published experts with biases, on the CPU, and the format."""
    fmt = MXFP4ExpertFormat(hidden, ffn, dtype, biases=True, swiglu=swiglu)
    slots = ExpertSlots(fmt, experts, slot_stride(fmt.nbytes), "cpu")
    generator = torch.Generator().manual_seed(4)
    for e in range(experts):
        buffer = torch.zeros(fmt.nbytes, dtype=torch.uint8)
        for i, (rows, cols) in enumerate([(ffn, hidden), (hidden, ffn), (ffn, hidden)]):
            codes, scales = published(rows, cols, seed=10 * e + i)
            fmt.slots[2 * i].view(buffer).copy_(codes)
            fmt.slots[2 * i + 1].view(buffer).copy_(scales)
        for slot in fmt.slots[6:]:
            slot.view(buffer).copy_(torch.randn(slot.shape, generator=generator) * 0.5)
        slots.memory[e, :fmt.nbytes].copy_(buffer)
    return fmt, slots


@interpreted
@pytest.mark.parametrize("swiglu", [(1.702, 1.0), (1.702, 0.0)])      # gpt-oss's clamped SwiGLU; plain
def test_interpreted_grouped_swiglu_matches_each_expert_through_the_twin(swiglu):
    hidden, ffn, top_k = 64, 96, 2
    fmt, slots = expert_slots(hidden, ffn, 4, torch.float32, swiglu)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(5)) * 0.3
    table = torch.tensor([2, 0, 3, 3, 1, 2], dtype=torch.int32)           # pair p: token p // top_k
    batch = ExpertBatch(slots.memory, slots.experts, table, table.tolist())
    actual = fmt.grouped_swiglu(batch, x, top_k)
    alpha, limit = swiglu
    for p, slot in enumerate(table.tolist()):
        expert = slots.experts[slot]
        if limit:
            expected = clamped_swiglu(expert, x[p // top_k][None], alpha, limit)[0]
        else:
            from moe_offload.model import swiglu as plain
            expected = plain(expert, x[p // top_k][None])[0]
        assert (actual[p] - expected).abs().max() <= 1e-5 * expected.abs().max(), p


@interpreted
def test_interpreted_grouped_product_is_the_one_row_gemv_bit_for_bit():
    hidden, ffn = 64, 96
    fmt, slots = expert_slots(hidden, ffn, 3, torch.bfloat16)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    table = torch.tensor([1, 2, 1, 0], dtype=torch.int32)
    first = slots.experts[0]
    gate_up = torch.empty(4, 2, ffn, dtype=torch.bfloat16)
    config = CONFIGS["split_k"]
    mxfp4_grouped_gemv(x, first.w1.weight, table, gate_up, slots.memory.stride(0), bias=first.w1.bias, matrices=2,
                       matrix_stride=fmt.w3_offset, bias_matrix_stride=fmt.b3_offset, x_per_row=2, config=config)
    for p, slot in enumerate(table.tolist()):
        for j, matrix in enumerate((slots.experts[slot].w1, slots.experts[slot].w3)):
            one = torch.empty(1, ffn, dtype=torch.bfloat16)
            mxfp4_gemv(x[p // 2][None], matrix.weight, one, matrix.bias, config)
            assert torch.equal(gate_up[p, j], one[0]), (p, j)


@interpreted
def test_interpreted_grouped_kernels_decode_the_mxfp4_test_checkpoint_as_the_twin_does(tmp_path, monkeypatch):
    """The tiny gpt-oss checkpoint written as the hub stores it (test_families.write_mxfp4_gpt_oss): its published
    buffers through the model's own decode path, grouped kernels (on the CPU, in the interpreter) against every
    expert through the slow twin, logits of a short prefill and decode steps."""
    from test_families import load_engine, logits_through_prefill_and_decode, write_mxfp4_gpt_oss

    folder = write_mxfp4_gpt_oss(tmp_path / "gpt-oss")
    tokens = torch.randint(3, 8192, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = load_engine(folder)
    fmt = engine.model.provider.expert_format
    assert isinstance(fmt, MXFP4ExpertFormat) and fmt.swiglu == (engine.config.swiglu_alpha, engine.config.swiglu_limit)
    expected = torch.cat(logits_through_prefill_and_decode(engine, tokens, prompt=6))
    grouped = []
    monkeypatch.setattr(MXFP4ExpertFormat, "runs_grouped", lambda self, x, top_k: grouped.append(x.shape[0]) or True)
    actual = torch.cat(logits_through_prefill_and_decode(engine, tokens, prompt=6))
    assert grouped and set(grouped) == {6, 1}
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


# --- on the GPU -------------------------------------------------------------------------------------------------

GPT_OSS_120B = (2880, 2880)    # hidden 2880, expert ffn 2880: w1, w3 (2880 x 2880), w2 (2880 x 2880)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gemv_matches_the_slow_twin_on_gpt_oss_120b_expert_shape(rows, dtype):
    codes, scales = published(*GPT_OSS_120B, seed=rows)
    weight = MXFP4Weight(codes.cuda(), scales.cuda())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, GPT_OSS_120B[1], generator=generator).to(device="cuda", dtype=dtype)
    bias = torch.randn(GPT_OSS_120B[0], generator=generator).to(device="cuda", dtype=dtype)
    expected = twin(x.float(), weight, bias.float())
    tolerance = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    out = torch.empty(rows, GPT_OSS_120B[0], device="cuda", dtype=dtype)
    mxfp4_gemv(x, weight, out, bias)
    assert (out.double() - expected).abs().max() <= tolerance * expected.abs().max()
    assert torch.equal(weight.linear(x), mxfp4_linear(x, weight))          # the model's path runs the kernel
    again = torch.empty_like(out)
    mxfp4_gemv(x, weight, again, bias)
    assert torch.equal(again, out)                                          # no atomics: the same bits


@pytest.mark.gpu
def test_gpu_grouped_swiglu_matches_each_expert_through_the_twin():
    hidden, ffn, top_k = 2880, 2880, 4
    fmt, slots = expert_slots(hidden, ffn, 6, torch.bfloat16, swiglu=(1.702, 7.0))
    memory = slots.memory.cuda()
    experts = [fmt.view(memory[s, :fmt.nbytes]) for s in range(memory.shape[0])]
    x = (torch.randn(2, hidden, generator=torch.Generator().manual_seed(5)) * 0.3).to("cuda", torch.bfloat16)
    table = torch.tensor([5, 0, 3, 1, 1, 2, 4, 0], dtype=torch.int32, device="cuda")
    assert fmt.runs_grouped(x, top_k)
    actual = fmt.grouped_swiglu(ExpertBatch(memory, experts, table, table.tolist()), x, top_k)
    for p, slot in enumerate(table.tolist()):
        cpu_expert = slots.experts[slot]          # the twin, in fp32 on the CPU
        expected = clamped_swiglu(cpu_expert, x[p // top_k][None].float().cpu(), 1.702, 7.0)[0]
        assert (actual[p].float().cpu() - expected).abs().max() <= 2e-2 * expected.abs().max(), p


@pytest.mark.gpu
def test_gpu_mxfp4_checkpoint_decodes_as_on_the_cpu_and_offloaded_equals_resident(tmp_path):
    from test_families import assert_offloaded_equals_resident, load_engine, logits_through_prefill_and_decode
    from test_families import write_mxfp4_gpt_oss

    from moe_offload.config import RuntimeConfig
    from moe_offload.engine import Engine

    folder = write_mxfp4_gpt_oss(tmp_path / "gpt-oss")
    tokens = torch.randint(3, 8192, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = torch.cat(logits_through_prefill_and_decode(load_engine(folder), tokens, prompt=24))
    gpu = Engine.load(RuntimeConfig(model=folder, device="cuda", dtype="float32"), progress=False)
    actual = torch.cat(logits_through_prefill_and_decode(gpu, tokens, prompt=24)).cpu()
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_offloaded_equals_resident(folder, slots=2, prefetch=None, device="cuda", dtype="bfloat16")


COMPILE_FOR_SM90 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from moe_offload.quant import kernel_mxfp4 as k
kernel, config = k._mxfp4_gemv_kernel, k.DEFAULT_CONFIG
for x, rows, splits, bias, grouped in [("bf16", 1, 1, False, False), ("bf16", 8, 4, True, False),
                                       ("fp32", 3, 1, False, False), ("bf16", 1, 4, True, True)]:
    pointers = dict(x_ptr=x, codes_ptr="u8", scales_ptr="u8", bias_ptr=x if bias else "u8", out_ptr=x,
                    partial_ptr="fp32" if splits > 1 else x, slots_ptr="i32" if grouped else "u8")
    signature = {name: "*" + pointers[name] if name in pointers else "i64" if "STRIDE" in name else "i32"
                 for name in kernel.arg_names[:15]}
    constexprs = dict(X_ROWS=rows, BLOCK_N=config.block_n, BLOCK_G=config.block_g, SPLITS=splits, HAS_BIAS=bias,
                      GROUPED=grouped)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.warps})
"""


def test_the_mxfp4_kernel_compiles_for_an_h100():
    """The interpreter runs code that the compiler refuses (a constexpr reassigned in a loop, say): compile four
    variants (rows, split K, bias, grouped) for sm_90 with Triton's own ptxas, in a process without the
    interpreter, so a kernel that would fail on a GPU fails here."""
    import os
    import subprocess
    import sys
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
