"""Expert offloading on CUDA (run on the GPU machine: `python -m pytest -m gpu tests/test_offload_gpu.py`):
bit-identity with the resident model through the copy stream and events, pinned host memory,
and the copy/wait timings."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_offload.generate import prefill
from moe_offload.model import KVCache, Transformer

from conftest import EVAL_TEXT, SHIPPED_MODEL
from test_offload import Fixture, check_bit_identical

pytestmark = pytest.mark.gpu


@functools.cache
def cuda_fixture(dtype: torch.dtype) -> Fixture:
    return Fixture(SHIPPED_MODEL, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["no_prefetch", "prefetch"])
@pytest.mark.parametrize("slots", [1, 2, 4, 7])
def test_cuda_offloaded_logits_are_bit_identical_to_resident(dtype, slots, prefetch):
    check_bit_identical(cuda_fixture(dtype), slots, prefetch)


def test_cuda_store_is_pinned_and_copies_run_on_their_own_stream():
    fixture = cuda_fixture(torch.bfloat16)
    assert fixture.store.buffer(0, 0).is_pinned()
    provider = fixture.offloaded(slots=2, prefetch=True, measure_time=True)
    assert provider.copier.stream != torch.cuda.current_stream()
    stats = check_bit_identical(fixture, slots=2, prefetch=True, measure_time=True)
    assert stats["copy_seconds"] > 0 and stats["h2d_gbps"] > 0 and stats["wait_seconds"] >= 0


def test_cuda_long_prompt_streams_through_one_slot_per_layer():
    fixture = cuda_fixture(torch.bfloat16)
    engine = fixture.engine
    prompt = engine.tokenizer.encode(open(EVAL_TEXT).read()[:40000])[:3000]
    cache = KVCache.allocate(engine.config, 1, len(prompt), "cuda", torch.bfloat16)
    expected = prefill(engine.model, cache, prompt, "cuda")
    provider = fixture.offloaded(slots=1, prefetch=True)
    actual = prefill(Transformer(engine.config, engine.model.weights, provider), cache, prompt, "cuda")
    assert torch.equal(actual, expected)
