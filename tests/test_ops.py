"""The decode step's small kernels (ops.py) against their torch twins, in Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moe_offload import ops  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("heads, kv_heads, dim, max_len, positions, window", [
    (4, 2, 16, 600, [0, 5], None),          # the first token: one key
    (4, 2, 16, 600, [300, 17], None),       # keys in two ranges, the second ragged
    (8, 8, 24, 600, [599, 256], None),      # no grouping, a head size that is not a power of 2, the last position
    (6, 2, 16, 600, [450, 120], 100),       # a sliding window that starts inside a range
])
def test_decode_attention_kernel_matches_sdpa_over_each_rows_visible_keys(heads, kv_heads, dim, max_len, positions, window):
    """Two sequences, each at its own position, in cache rows 2 and 0 of three."""
    generator = torch.Generator().manual_seed(positions[0])
    q = torch.randn(2, heads, 1, dim, generator=generator)
    keys, values = (torch.randn(3, kv_heads, max_len, dim, generator=generator) for _ in range(2))
    positions, rows = torch.tensor(positions), torch.tensor([2, 0])
    expected = ops.decode_attention(q, keys, values, positions, rows, window)      # the torch twin
    actual = ops._triton_decode_attention(q, keys, values, positions, rows, window or 0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("width, scaled", [(256, True), (200, True), (64, False)])
def test_rms_norm_kernel_matches_its_twin(width, scaled):
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(3, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator) if scaled else None
    torch.testing.assert_close(ops._triton_rms_norm(x, weight, 1e-5), ops.rms_norm(x, weight, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("experts, top_k, renormalize", [(8, 2, True), (60, 4, False), (128, 8, True), (8, 6, True)])
def test_route_kernel_picks_the_twins_experts_and_weights(experts, top_k, renormalize):
    logits = torch.randn(5, experts, generator=torch.Generator().manual_seed(experts)) * 2
    weights, ids = ops._triton_route(logits, top_k, renormalize)
    want_weights, want_ids = ops.route(logits, top_k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (6, 3, 24)])
def test_rotate_and_cache_kernel_writes_what_its_twin_writes(heads, kv_heads, dim):
    """Two sequences at their own positions, in cache rows 2 and 0 of three."""
    from moe_offload.model import rotary

    generator = torch.Generator().manual_seed(dim)
    max_len, positions, rows = 40, torch.tensor([17, 3]), torch.tensor([2, 0])
    rope = rotary(torch.arange(max_len), dim, 10000.0)
    # q, k, v as the model hands them over: transposed views of (batch, 1, heads, dim) projections
    q, k, v = (torch.randn(2, 1, n, dim, generator=generator).transpose(1, 2) for n in (heads, kv_heads, kv_heads))
    caches = [[torch.randn(3, kv_heads, max_len, dim, generator=generator) for _ in range(2)]]
    caches.append([c.clone() for c in caches[0]])
    got = ops._triton_rotate_and_cache(q, k, v, rope, positions, rows, *caches[0])
    want = ops.rotate_and_cache(q, k, v, rope, positions, rows, *caches[1])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for got_cache, want_cache in zip(*caches):
        torch.testing.assert_close(got_cache, want_cache, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
@pytest.mark.parametrize("tokens, top_k, width", [(1, 2, 256), (3, 8, 100)])
def test_combine_kernel_matches_its_twin(tokens, top_k, width):
    generator = torch.Generator().manual_seed(width)
    picked = torch.randn(tokens * top_k, width, generator=generator)
    weights = torch.rand(tokens, top_k, generator=generator)
    torch.testing.assert_close(ops._triton_combine(picked, weights), ops.combine(picked, weights), rtol=1e-6, atol=1e-6)
