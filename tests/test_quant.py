"""HQQ quantization (quant/hqq.py), bit packing (quant/pack.py) and quantized weights (quant/weight.py).

The `hqq` package is the reference for the quantizer: our error must match its error for the
same settings on real weight matrices of the shipped model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from moe_offload.config import QUANT_BITS, ConfigError, QuantConfig, QuantSpec
from moe_offload.experts import Expert
from moe_offload.quant import pack as bitpack
from moe_offload.quant.hqq import quantize
from moe_offload.quant.weight import HQQExpertFormat, PackedFormat

from conftest import SHIPPED_MODEL, slow_beyond_each

REAL_MATRICES = ("model.layers.1.block_sparse_moe.experts.2.w1.weight",   # (320, 256)
                 "model.layers.5.block_sparse_moe.experts.6.w2.weight",   # (256, 320)
                 "model.layers.3.self_attn.q_proj.weight")                 # (256, 256)
PAPER_SETTINGS = ((2, 16), (3, 64), (4, 64), (8, 64))


def real_matrix(name: str) -> torch.Tensor:
    with safe_open(SHIPPED_MODEL / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name).float()


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("rows,k", [(1, 48), (7, 16), (64, 96), (83, 208)])
def test_pack_then_unpack_is_exact_for_every_bit_width(bits, rows, k):
    q = torch.randint(0, 2 ** bits, (rows, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = bitpack.pack(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (-(-k * bits // 32), bitpack.padded_rows(rows))   # no bit wasted but the last word's
    unpacked = bitpack.unpack(packed, bits, k)
    assert torch.equal(unpacked[:rows], q) and (unpacked[rows:] == q[-1]).all()   # the pad repeats the last row


def test_pack_puts_code_k_of_a_row_at_bits_k_times_width_and_straddles_words_at_3_bits():
    q = torch.tensor([[1, 2, 3, 0, 7, 5, 6, 4, 1, 2, 3]], dtype=torch.uint8)     # 33 bits: code 10 spans words 0 and 1
    packed = bitpack.pack(q, 3)
    stream = sum(int(code) << (3 * k) for k, code in enumerate(q[0]))
    low, high = stream & 0xFFFFFFFF, stream >> 32
    assert packed[:, 0].tolist() == [low - 2 ** 32 if low >= 2 ** 31 else low, high]


def test_pack_stores_words_with_the_rows_innermost_and_uses_the_sign_bit():
    q = torch.full((40, 32), 3, dtype=torch.uint8)           # every 2-bit code set: all 32 bits of a word
    q[5, 16:] = 0
    packed = bitpack.pack(q, 2)
    assert packed.shape == (2, 64)                           # (words per row, rows padded to 64)
    assert (packed[0] == -1).all() and packed[1, 5] == 0 and (packed[1, :5] == -1).all()


@pytest.mark.parametrize("bits, group, name", slow_beyond_each(PAPER_SETTINGS, REAL_MATRICES))
def test_our_hqq_error_matches_the_hqq_package_on_real_weights(name, bits, group):
    from hqq.core.quantize import Quantizer

    weight = real_matrix(name)
    ours = (quantize(weight, QuantSpec(bits, group, quant_meta=False)).dequantize() - weight).abs().mean()
    codes, meta = Quantizer.quantize(weight, nbits=bits, group_size=group, axis=1, device="cpu", optimize=True)
    theirs = (Quantizer.dequantize(codes, {**meta, "compute_dtype": torch.float32}) - weight).abs().mean()
    assert abs(ours / theirs - 1) < 0.03, (ours.item(), theirs.item())
    # and HQQ's optimiser is doing something: it beats plain min-max rounding
    assert ours < _min_max_error(weight, bits, group)


def _min_max_error(weight, bits, group):
    groups = weight.reshape(-1, group)
    low, high = groups.min(1, keepdim=True).values, groups.max(1, keepdim=True).values
    step = (high - low) / (2 ** bits - 1)
    return ((torch.round((groups - low) / step) * step + low - groups).abs().mean())


@pytest.mark.parametrize("name", REAL_MATRICES[:2])
def test_paper_setting_with_8_bit_scales_and_zeros_matches_hqq_package(name):
    """2-bit g16, scales and zeros quantized to 8 bits (the paper's expert setting) vs HQQLinear's recipe:
    weights with axis=1, then the scale with 8-bit g128 and the zero with one 8-bit min-max."""
    from hqq.core.quantize import Quantizer

    weight = real_matrix(name)
    ours = (quantize(weight, QuantSpec(2, 16, quant_meta=True)).dequantize() - weight).abs().mean()
    codes, meta = Quantizer.quantize(weight, nbits=2, group_size=16, axis=1, device="cpu", optimize=True)
    for key, settings in (("scale", dict(channel_wise=True, group_size=128)), ("zero", dict(channel_wise=False, group_size=None))):
        q, m = Quantizer.quantize(meta[key], nbits=8, optimize=False, device="cpu", **settings)
        meta[key] = Quantizer.dequantize(q, {**m, "compute_dtype": torch.float32})
    theirs = (Quantizer.dequantize(codes, {**meta, "compute_dtype": torch.float32}) - weight).abs().mean()
    assert abs(ours / theirs - 1) < 0.03, (ours.item(), theirs.item())


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("quant_meta", [False, True])
def test_packed_weight_dequantizes_to_the_quantizer_output(bits, quant_meta):
    spec = QuantSpec(bits, 32, quant_meta, meta_group_size=24)   # a meta run that straddles rows
    weight = torch.randn(37, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    fmt = PackedFormat([(tuple(weight.shape), spec)])
    (packed,) = fmt.view(fmt.pack([weight]))
    rows = packed.padded_rows
    reference = quantize(torch.cat([weight, weight[-1:].expand(rows - 37, -1)]), spec).dequantize()[:37]
    assert torch.equal(packed.dequantize(), reference)


def test_cpu_linear_is_dequantize_then_matmul():
    weight = real_matrix(REAL_MATRICES[0])
    fmt = PackedFormat([(tuple(weight.shape), QuantSpec(3))])
    (packed,) = fmt.view(fmt.pack([weight]))
    x = torch.randn(5, 256)
    assert torch.equal(packed.linear(x), F.linear(x, packed.dequantize()))


def expert_of(layer: int, expert_id: int) -> Expert:
    return Expert(*(real_matrix(f"model.layers.{layer}.block_sparse_moe.experts.{expert_id}.{w}.weight") for w in ("w1", "w2", "w3")))


def test_expert_format_is_one_buffer_of_views_and_independent_of_its_address():
    fmt = HQQExpertFormat(256, 320, QuantSpec(2))
    buffer = fmt.pack(expert_of(0, 1))
    assert buffer.dtype == torch.uint8 and buffer.shape == (fmt.nbytes,)
    expert = fmt.view(buffer)
    start, end = buffer.data_ptr(), buffer.data_ptr() + fmt.nbytes
    for weight in expert:
        for tensor in (weight.packed, weight.scale, weight.zero, weight.meta):
            assert start <= tensor.data_ptr() < end     # a view, no copy
    moved = torch.zeros(fmt.nbytes + 192, dtype=torch.uint8)[192:]
    moved.copy_(buffer)
    x = torch.randn(3, 256)
    again = fmt.view(moved)
    for a, b in zip(expert, again):
        assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(expert.w1.linear(x), again.w1.linear(x))


def test_expert_bytes_shrink_as_the_paper_says():
    """2-bit g16 with 8-bit scales and zeros: 2 + 2 * 8 / 16 = 3 bits a weight, plus 2 x 64 bits of
    meta per 128 groups (0.0625); 4-bit g64 with fp16 scales and zeros: 4 + 32 / 64 = 4.5."""
    weights = 3 * 256 * 320
    assert HQQExpertFormat(256, 320, QuantSpec(2)).nbytes * 8 / weights == pytest.approx(3.0625, abs=0.01)
    assert HQQExpertFormat(256, 320, QuantSpec(4, 64, quant_meta=False)).nbytes * 8 / weights == pytest.approx(4.5, abs=0.05)


def test_quant_text_names_the_experts_group_size():
    """"4/2g32": 2-bit experts in groups of 32 (2.53 bits a weight with their scales, against 3.06 at g16)."""
    wide, default = QuantConfig.parse("4/2g32"), QuantConfig.parse("4/2")
    assert (wide.experts.bits, wide.experts.group_size) == (2, 32) and default.experts.group_size == 16
    assert wide.attention == default.attention
    for shape, bits_a_weight in ((default, 3.0625), (wide, 2.53125)):
        fmt = HQQExpertFormat(4096, 14336, shape.experts)
        assert fmt.nbytes * 8 / (3 * 4096 * 14336) == bits_a_weight
    for bad in ("4/2g", "4/2/1", "4:2", "4/2g33"):
        with pytest.raises(ConfigError):
            QuantConfig.parse(bad)
