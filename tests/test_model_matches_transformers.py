"""Our model math against transformers' own classes, in fp32 on the CPU (DESIGN.md §6)."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.model import KVCache

from conftest import FIXTURE_32L, SHIPPED_MODEL, requires_fixture, write_tiny_mixtral

PREFILL, DECODE = 110, 30


def reference_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits[0]


def our_logits(folder, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill PREFILL tokens in one forward, then one token at a time through the KV cache."""
    engine = Engine.load(RuntimeConfig(model=folder, device="cpu", dtype="float32"), progress=False)
    cache = KVCache.allocate(engine.config, 1, tokens.shape[1], "cpu", torch.float32)
    pieces = [engine.model(tokens[:, :PREFILL], cache, start_pos=0)[0]]
    for pos in range(PREFILL, tokens.shape[1]):
        pieces.append(engine.model(tokens[:, pos:pos + 1], cache, start_pos=pos)[0])
    return torch.cat(pieces)


def assert_close_to_reference(folder, vocab_size: int):
    tokens = torch.randint(3, vocab_size, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(folder, tokens)
    actual = our_logits(folder, tokens)
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-4 * scale


TINY_VARIANTS = {
    "gqa2_top2_of4": {},
    "mha_top1_of8": dict(num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=1),
    "gqa4_top3_of6": dict(num_attention_heads=8, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3),
    "sliding_window_16": dict(sliding_window=16),
    "odd_hidden_size": dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=3, intermediate_size=70, head_dim=10),
}


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_tiny_random_mixtral_logits_match_transformers(tmp_path, variant):
    folder = write_tiny_mixtral(tmp_path, **TINY_VARIANTS[variant])
    assert_close_to_reference(folder, vocab_size=8192)


def test_shipped_model_logits_match_transformers():
    assert_close_to_reference(SHIPPED_MODEL, vocab_size=8192)


@requires_fixture(FIXTURE_32L)
def test_32_layer_fixture_logits_match_transformers():
    assert_close_to_reference(FIXTURE_32L, vocab_size=8192)
