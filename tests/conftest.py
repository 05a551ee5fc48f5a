"""Shared test helpers: paths to the fixtures and tiny checkpoints written with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
SHIPPED_MODEL = REPO / "src" / "moe_offload" / "default_model"
FIXTURE_32L = SHARED_FIXTURES / "reference-moe-32l"


def requires_fixture(path: Path):
    return pytest.mark.skipif(not (path / "model.safetensors").is_file(), reason=f"{path} not present")


def write_tiny_mixtral(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random MixtralForCausalLM saved with transformers (hub tensor names), plus the shipped tokenizer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    settings = dict(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=512, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**settings)).eval()
    # Random init gives tiny logits; scale the weights up so routing and attention are not flat.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.5 / param.shape[-1] ** 0.5 * 4)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((SHIPPED_MODEL / name).read_bytes())
    return folder
