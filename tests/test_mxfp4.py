"""MXFP4 (quant/mxfp4.py): the byte layout against transformers' own dequantization of gpt-oss's tensors,
exact round trips of published values, and rounding to the nearest code."""

from __future__ import annotations

import pytest
import torch

from moe_offload.experts import Biased, Expert
from moe_offload.quant.mxfp4 import FP4_VALUES, GROUP, MXFP4ExpertFormat, MXFP4Weight, dequantize, quantize


def published(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes and scales shaped like one expert matrix of a hub checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols // 2), generator=generator, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(118, 130, (rows, cols // GROUP), generator=generator, dtype=torch.int32).to(torch.uint8)
    return codes, scales


def test_dequantize_reads_the_hub_layout_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    codes, scales = published(64, 96)
    expected = convert_moe_packed_tensors(codes.view(1, 64, 3, 16), scales.view(1, 64, 3), dtype=torch.float32)
    assert torch.equal(dequantize(codes, scales), expected[0].t())      # transformers returns (in, out)


def test_quantizing_published_values_gives_them_back_exactly():
    weight = dequantize(*published(64, 96, seed=1))
    assert torch.equal(dequantize(*quantize(weight)), weight)


def test_each_weight_rounds_to_the_nearest_code_of_its_group_scale():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 3
    codes, scales = quantize(weight)
    approximation = dequantize(codes, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(GROUP, dim=1)          # each weight's power of two
    grid = torch.tensor(FP4_VALUES)[None, None, :] * step[..., None]
    nearest = (weight[..., None] - grid).abs().amin(dim=-1)
    assert torch.allclose((weight - approximation).abs(), nearest)
    assert (weight.abs().view(8, 2, GROUP).amax(-1) / torch.exp2(scales.float() - 127)).ge(4).all()   # tightest scale


def test_expert_format_packs_one_buffer_that_views_back_as_weights_and_biases():
    hidden, ffn = 64, 32
    generator = torch.Generator().manual_seed(3)
    fmt = MXFP4ExpertFormat(hidden, ffn, torch.float32, biases=True)
    weights = [dequantize(*published(*shape, seed=i)) for i, shape in enumerate([(ffn, hidden), (hidden, ffn), (ffn, hidden)])]
    biases = [torch.randn(n, generator=generator) for n in (ffn, hidden, ffn)]
    buffer = fmt.pack(Expert(*(Biased(w, b) for w, b in zip(weights, biases))))
    assert buffer.shape == (fmt.nbytes,) and fmt.nbytes < 3 * hidden * ffn * 0.6 + 1024     # 4.25 bits a weight
    expert = fmt.view(buffer)
    assert all(isinstance(w.weight, MXFP4Weight) and torch.equal(w.weight.dequantize(), v) for w, v in zip(expert, weights))
    assert all(torch.equal(w.bias, b) for w, b in zip(expert, biases))
    x = torch.randn(5, hidden, generator=generator)
    assert torch.equal(expert.w1.linear(x), x @ weights[0].t() + biases[0])


def test_expert_format_refuses_widths_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="multiples of 32"):
        MXFP4ExpertFormat(64, 48, torch.float32)
