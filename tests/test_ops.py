"""The decode step's small kernels (ops.py) against their torch twins, in Triton's interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must be set before triton is imported
pytest.importorskip("triton")

from moe_offload import ops  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("heads, kv_heads, dim, max_len, position, window", [
    (4, 2, 16, 600, 0, None),         # the first token: one key
    (4, 2, 16, 600, 300, None),       # keys in two ranges, the second ragged
    (8, 8, 24, 600, 599, None),       # no grouping, a head size that is not a power of 2, the last position
    (6, 2, 16, 600, 450, 100),        # a sliding window that starts inside a range
])
def test_decode_attention_kernel_matches_sdpa_over_the_visible_keys(heads, kv_heads, dim, max_len, position, window):
    generator = torch.Generator().manual_seed(position)
    q = torch.randn(2, heads, 1, dim, generator=generator)
    keys, values = (torch.randn(2, kv_heads, max_len, dim, generator=generator) for _ in range(2))
    expected = ops.decode_attention(q, keys, values, torch.tensor([position]), window)      # the torch twin
    actual = ops._triton_decode_attention(q, keys, values, torch.tensor([position]), window or 0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
