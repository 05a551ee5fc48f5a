"""The CPU expert kernels (quant/cpu_kernels.py) against their slow twin, dequantize-then-matmul in fp32.

Tolerances are bounds on fp32 rounding, not fitted: with u = 2^-24, a sum of n terms computed in any order is
off by at most about n u times the sum of the terms' magnitudes. The kernel's HQQ output is
sum_g s_g (sum_k q_k x_k - z_g sum_k x_k): each term passes through at most group_size + groups + a few
roundings (with the decoding of s and z); the reference rounds each weight (q - z) s twice and sums K
products. So |kernel - reference| <= (group_size + groups + K + 8) u M, M = sum_g |s_g| sum_k (q_k + |z_g|) |x_k|,
computed in fp64 from the same codes. Dense: (2 K + 32) u sum_k |w_k x_k| (16 lanes of K / 16 terms, then a
sum of the lanes, against K). The SwiGLU's bound carries the first two products' bounds through silu (slope
at most 1.1) and the product, then through w2, and adds w2's own. These worst cases lie about 1000x above the
errors seen (which grow as sqrt(n), not n), yet one code of a 2-bit (300, 320) weight read one off is 47x
over its bound: a misread code, scale or zero cannot hide under them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from moe_offload.config import QuantSpec
from moe_offload.experts import DenseExpertFormat, Expert
from moe_offload.quant import cpu_kernels
from moe_offload.quant import pack as bitpack
from moe_offload.quant.weight import HQQExpertFormat, PackedFormat, QuantizedWeight

from conftest import SHARED_FIXTURES, requires_fixture, slow_beyond_pairs

U = 2.0 ** -24           # fp32's unit roundoff
BF16_U = 2.0 ** -8       # bf16's, for outputs rounded to bf16
SILU_SLOPE = 1.1         # max |silu'(a)| = 1.0998...
FIXTURE = SHARED_FIXTURES / "reference-moe"
SETTINGS = [(2, 16), (3, 64), (4, 64), (8, 64), (3, 32), (4, 16), (2, 128)]     # (bits, group size)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Every test here but the fallback's runs the compiled kernels: no compiler is a failure, not a skip."""
    assert cpu_kernels.backend() == "c", cpu_kernels.backend()


def random_quantized(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    fmt = PackedFormat([((n, k), spec)])
    (w,) = fmt.view(fmt.pack([weight]))
    return w


def random_x(rows: int, k: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Reference:
    """A weight's slow twin: dequantized in fp32, with what bounds the kernel's distance from it."""

    def __init__(self, weight: QuantizedWeight | torch.Tensor):
        self.weight = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.float()
        self.magnitudes = magnitudes(weight)
        k = weight.shape[1]
        if isinstance(weight, QuantizedWeight):
            self.depth = weight.spec.group_size + k // weight.spec.group_size + k + 8
        else:
            self.depth = 2 * k + 32

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, N): how far the kernel's x W^T may lie from dequantize-then-matmul's, both in fp32."""
        return self.depth * U * (x.double().abs() @ self.magnitudes.t())


def magnitudes(weight: QuantizedWeight | torch.Tensor) -> torch.Tensor:
    """(N, K) fp64: (q + |z|) |s| per element of an HQQ weight (what its terms can reach), |w| of a dense one."""
    if not isinstance(weight, QuantizedWeight):
        return weight.double().abs()
    n, k = weight.shape
    scale, zero = (t[:n].double() for t in weight.scales_and_zeros())
    q = bitpack.unpack(weight.packed, weight.spec.bits, k)[:n].double()
    group = weight.spec.group_size
    return (q + zero.abs().repeat_interleave(group, 1)) * scale.abs().repeat_interleave(group, 1)


def assert_linear_close(weight, x: torch.Tensor, threads: int = 1, reference: Reference | None = None):
    reference = reference or Reference(weight)
    y, expected, bound = cpu_kernels.cpu_linear(weight, x, threads), reference.linear(x), reference.bound(x)
    if x.dtype == torch.bfloat16:          # and y rounded to bf16 once
        assert y.dtype == torch.bfloat16
        bound = bound + BF16_U * (expected.abs().double() + bound)
    assert_within(y, expected, bound)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor):
    excess = (actual.double() - expected.double()).abs() - bound
    assert excess.max() <= 0, f"worst error exceeds its bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("bits, group, quant_meta, n, k",     # n, k: rows not whole blocks, > one panel
                         slow_beyond_pairs(SETTINGS, [True, False], [(83, 384), (300, 256), (40, 128)]))
def test_hqq_linear_matches_dequantize_then_matmul(bits, group, quant_meta, n, k):
    weight = random_quantized(n, k, QuantSpec(bits, group, quant_meta))
    reference = Reference(weight)
    for rows in range(1, 9):
        assert_linear_close(weight, random_x(rows, k, seed=rows), reference=reference)


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_take_panels_of_uneven_rows(threads):
    weight = random_quantized(300, 128, QuantSpec(4, 64))     # 10 blocks of 32 rows
    assert_linear_close(weight, random_x(2, 128), threads)


@pytest.mark.parametrize("meta_group_size", [40, 100, 7])     # runs of scales and zeros that cut 16-row vectors
def test_hqq_linear_reads_scale_runs_that_cross_vectors(meta_group_size):
    weight = random_quantized(83, 128, QuantSpec(2, 16, meta_group_size=meta_group_size))
    assert_linear_close(weight, random_x(3, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 101), (64, 64), (130, 300), (5, 31)])     # K not whole vectors
def test_dense_linear_matches_matmul(dtype, n, k):
    weight = random_x(n, k, seed=7, dtype=dtype)
    reference = Reference(weight)
    for rows in range(1, 9):
        assert_linear_close(weight, random_x(rows, k, seed=rows), reference=reference)


def test_bf16_x_gives_bf16_y_rounded_once():
    assert_linear_close(random_quantized(83, 192, QuantSpec(4)), random_x(4, 192, dtype=torch.bfloat16))


def test_more_rows_than_one_pass_takes_are_taken_a_pass_at_a_time():
    assert_linear_close(random_quantized(83, 192, QuantSpec(3)), random_x(cpu_kernels.MAX_ROWS * 2 + 3, 192))


def swiglu_bound(references: Expert, x: torch.Tensor) -> torch.Tensor:
    """(rows, hidden): how far the kernel's w2 (silu(w1 x) * (w3 x)) may lie from the fp32 reference's."""
    w1, w2, w3 = references
    gate, up = w1.linear(x).double(), w3.linear(x).double()
    gate_error, up_error = w1.bound(x), w3.bound(x)
    silu = F.silu(gate)
    # silu's own rounding (exp, add, divide) and the product's, and the reference's: 8 u of |h| covers them
    h_error = SILU_SLOPE * gate_error * (up.abs() + up_error) + silu.abs() * up_error + 8 * U * (silu * up).abs()
    h = (silu * up).abs() + h_error
    return h_error @ w2.magnitudes.t() + w2.bound(h.float())


def reference_swiglu(references: Expert, x: torch.Tensor) -> torch.Tensor:
    w1, w2, w3 = references
    return w2.linear(F.silu(w1.linear(x)) * w3.linear(x))


def assert_swiglu_close(fmt, buffer: torch.Tensor, x: torch.Tensor, threads: int):
    references = Expert(*(Reference(w) for w in fmt.view(buffer)))
    y = cpu_kernels.cpu_swiglu(fmt, buffer, x, threads)
    expected, bound = reference_swiglu(references, x), swiglu_bound(references, x)
    if x.dtype == torch.bfloat16:          # and y rounded to bf16 once
        assert y.dtype == torch.bfloat16
        bound = bound + BF16_U * (expected.abs().double() + bound)
    assert_within(y, expected, bound)


def random_expert(hidden: int, ffn: int, seed: int = 0) -> Expert:
    generator = torch.Generator().manual_seed(seed)
    return Expert(torch.randn(ffn, hidden, generator=generator) / hidden ** 0.5,
                  torch.randn(hidden, ffn, generator=generator) / ffn ** 0.5,
                  torch.randn(ffn, hidden, generator=generator) / hidden ** 0.5)


def fixture_expert(layer: int, expert_id: int) -> Expert:
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert_id}"
    with safe_open(FIXTURE / "model.safetensors", framework="pt") as f:
        return Expert(*(f.get_tensor(f"{prefix}.{name}.weight") for name in ("w1", "w2", "w3")))


EXPERT_FORMATS = ["hqq2", "hqq3", "hqq4", "hqq8", "bf16", "fp32"]     # HQQ at the paper's group sizes


def expert_format(name: str, hidden: int, ffn: int):
    if name.startswith("hqq"):
        return HQQExpertFormat(hidden, ffn, QuantSpec(int(name[3:])))
    return DenseExpertFormat(hidden, ffn, {"bf16": torch.bfloat16, "fp32": torch.float32}[name])


@pytest.mark.parametrize("name", EXPERT_FORMATS)
def test_swiglu_on_a_random_expert_matches_the_reference(name):
    hidden, ffn = 128, 320          # ffn: 10 blocks of 32 rows, more than one panel
    fmt = expert_format(name, hidden, ffn)
    buffer = fmt.pack(random_expert(hidden, ffn))
    for rows in (1, 2, 5, 8):
        assert_swiglu_close(fmt, buffer, random_x(rows, hidden, seed=rows), threads=2)


@requires_fixture(FIXTURE)
@pytest.mark.parametrize("name", EXPERT_FORMATS)
def test_swiglu_on_real_experts_matches_the_reference(name):
    fmt = expert_format(name, 256, 320)
    buffer = fmt.pack(fixture_expert(5, 6))
    x = random_x(3, 256)
    assert_swiglu_close(fmt, buffer, x, threads=1)
    assert_swiglu_close(fmt, buffer, x.bfloat16(), threads=1)


def test_swiglu_reads_the_buffer_in_place():
    hidden, ffn = 64, 128
    fmt = HQQExpertFormat(hidden, ffn, QuantSpec(4))
    buffer = fmt.pack(random_expert(hidden, ffn))
    x = random_x(1, hidden)
    before = cpu_kernels.cpu_swiglu(fmt, buffer, x)
    fmt.view(buffer).w2.scale.zero_()          # every scale of w2 now the run's minimum: a different y
    assert not torch.equal(cpu_kernels.cpu_swiglu(fmt, buffer, x), before)


def test_unsupported_layouts_fall_back_to_torch():
    assert not cpu_kernels.supports(HQQExpertFormat(64, 128, QuantSpec(3, 16)))
    assert not cpu_kernels.supports(DenseExpertFormat(64, 128, torch.float16))
    assert all(cpu_kernels.supports(expert_format(name, 64, 128)) for name in EXPERT_FORMATS)
    weight = random_quantized(40, 64, QuantSpec(3, 16))     # 3-bit groups of 16 end mid-word
    assert cpu_kernels.describe(weight) is None
    x = random_x(2, 64)
    assert torch.equal(cpu_kernels.cpu_linear(weight, x), Reference(weight).linear(x))
    half = random_x(8, 64).half()
    assert cpu_kernels.describe(half) is None


def test_bad_arguments_get_one_clear_error():
    weight = random_quantized(40, 64, QuantSpec(4))
    with pytest.raises(ValueError, match=r"expected x of shape \(rows, 64\)"):
        cpu_kernels.cpu_linear(weight, random_x(2, 32))
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        cpu_kernels.cpu_linear(weight, random_x(2, 64), threads=0)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The kernels' loader forgotten, its cache in tmp_path; put back as it was after the test."""
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


def fake_compiler(folder, script: str) -> str:
    """An executable that stands in for cc: `script` runs with $out the file after -o."""
    path = folder / "fake-cc"
    path.write_text('#!/bin/sh\nout=""\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n' + script)
    path.chmod(0o755)
    return str(path)


def test_without_a_compiler_every_call_falls_back_with_one_reason(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    reason = cpu_kernels.backend()
    assert reason.startswith("torch: no C compiler found (no-such-compiler)") and "\n" not in reason
    weight = random_quantized(40, 64, QuantSpec(2))
    x = random_x(2, 64)
    assert torch.equal(cpu_kernels.cpu_linear(weight, x), Reference(weight).linear(x))


def test_a_failed_build_leaves_no_file_behind(fresh_build, monkeypatch):
    broken = 'echo half > "$out"\necho "x.c:1: error: broken" >&2\nexit 1\n'     # half a file, then a failure
    monkeypatch.setenv("CC", fake_compiler(fresh_build, broken))
    reason = cpu_kernels.backend()
    assert reason.startswith("torch: ") and "could not build cpu_expert.c" in reason and "broken" in reason
    assert not list((fresh_build / "cpu_kernels").iterdir())


def test_a_build_is_renamed_into_place_whole(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", fake_compiler(fresh_build, 'echo "not a library" > "$out"\n'))
    assert cpu_kernels.backend().startswith("torch: ")          # it loads what was built: not a library here
    built = list((fresh_build / "cpu_kernels").iterdir())
    assert [p.suffix for p in built] == [".so"] and built[0].read_text() == "not a library\n"


def test_the_environment_can_ask_for_torch(fresh_build, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CPU_KERNELS", "torch")
    assert cpu_kernels.backend() == "torch: MOE_OFFLOAD_CPU_KERNELS=torch"
    hidden, ffn = 64, 96
    fmt = HQQExpertFormat(hidden, ffn, QuantSpec(2))
    buffer = fmt.pack(random_expert(hidden, ffn))
    x = random_x(2, hidden)
    references = Expert(*(Reference(w) for w in fmt.view(buffer)))
    assert torch.equal(cpu_kernels.cpu_swiglu(fmt, buffer, x), reference_swiglu(references, x))
