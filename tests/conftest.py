"""Shared test helpers: paths to the fixtures, tiny checkpoints written with transformers, and the `slow` cases of
the test matrices."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

# Triton kernels on a machine without CUDA run in Triton's interpreter (tests call them explicitly; the code
# itself sends only CUDA tensors to Triton). Triton reads this when a kernel is defined, i.e. when its module is
# first imported, which any test module may do first: so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
SHIPPED_MODEL = REPO / "src" / "moe_offload" / "default_model"
EVAL_TEXT = REPO / "data" / "eval-networkx.txt"     # held-out Python source (data/README.md); not package data
FIXTURE_32L = SHARED_FIXTURES / "reference-moe-32l"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' matrices: one thread is faster, and much faster on a busy machine. A module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def requires_fixture(path: Path):
    return pytest.mark.skipif(not (path / "model.safetensors").is_file(), reason=f"{path} not present")


# The `slow` marker: `python -m pytest` (pyproject's -m 'not gpu and not slow') runs a representative few of each
# matrix, under 5 minutes on two cores; the README's test command (-m "not gpu", as CI runs it) runs them all.
SLOW = pytest.mark.slow


def slow_except(cases, *keep) -> list:
    """`cases` as parametrize's argument values (tuples for several argnames), each marked `slow` but those in
    `keep`. The test IDs stay as they were."""
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=() if case in keep else SLOW)
            for case in cases]


def slow_beyond_pairs(*axes) -> list:
    """Every combination of the axes' values (one parametrize over all their argnames; a tuple value spreads over
    several), marked `slow` but a set that holds every pair of values of two axes at least once (greedy, in order:
    the same set every run). The default run checks each value against every value of the other axes; CI, the
    whole product."""
    return _slow_beyond_a_cover(axes, 2)


def slow_beyond_each(*axes) -> list:
    """As slow_beyond_pairs, but the default run's set holds each value of each axis at least once."""
    return _slow_beyond_a_cover(axes, 1)


def _slow_beyond_a_cover(axes, strength: int) -> list:
    """The combinations of `axes`, `slow` but a set holding every `strength` values of as many axes."""
    combos = list(itertools.product(*(list(axis) for axis in axes)))
    covers = lambda combo: set(itertools.combinations(enumerate(combo), strength))
    uncovered = set().union(*map(covers, combos))
    kept = set()
    while uncovered:
        best = max(combos, key=lambda combo: len(covers(combo) & uncovered))
        kept.add(best)
        uncovered -= covers(best)
    spread = lambda combo: [v for value in combo for v in (value if isinstance(value, tuple) else (value,))]
    return [pytest.param(*spread(combo), marks=() if combo in kept else SLOW) for combo in combos]


# model_type -> (transformers config class, model class, tiny settings). Three layers so that dense
# layers can mix with MoE ones; vocab 8192 so the shipped tokenizer fits.
_TINY_BASE = dict(vocab_size=8192, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
TINY_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, head_dim=24, num_experts=16, num_experts_per_tok=8, moe_intermediate_size=24,
                       intermediate_size=96, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=24,
                       shared_expert_intermediate_size=48, intermediate_size=96, mlp_only_layers=[0])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_hidden_layers=3, num_experts=16, num_experts_per_tok=8, intermediate_size=24, clip_qkv=1.0)),
    # Phi-3.5-MoE's settings: q/k/v/o and lm_head biases, LayerNorms, longrope (the prompts stay below its boundary:
    # transformers' PhimoeRotaryEmbedding never applies the long factors, see test_families), a sliding window
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, intermediate_size=48,
                    attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3, sliding_window=100,
                    rope_scaling=dict(type="longrope", short_factor=[1.0 + i / 16 for i in range(8)],
                                      long_factor=[1.0 + i / 4 for i in range(8)], short_mscale=1.2, long_mscale=1.3,
                                      original_max_position_embeddings=256))),
    # GLM-4.5's: partial rotary, a dense first layer, shared expert, sigmoid routing in groups with the correction
    # bias, routed scaling, q/k norms (GLM-4.5 itself has them off) and qkv bias
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(num_hidden_layers=3, head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                      topk_group=2, moe_intermediate_size=24, intermediate_size=96, first_k_dense_replace=1,
                      n_shared_experts=2, routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True,
                      partial_rotary_factor=0.5)),
    # DeepSeek-V3's: latent attention with a query bottleneck, interleaved yarn rotary (mscale in the softmax scale),
    # a dense first layer, shared expert, sigmoid routing in groups with the correction bias, renormalised and scaled
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
                         num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=24, intermediate_size=96,
                         first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                         rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=64,
                                           beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
    # DeepSeek-V2's: no query bottleneck, softmax group-limited greedy routing (not renormalised), two shared experts
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
                         num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                         moe_intermediate_size=24, intermediate_size=96, first_k_dense_replace=1, n_shared_experts=2,
                         routed_scaling_factor=4.0,
                         rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=64,
                                           beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    # gpt-oss's: attention sinks, sliding and full layers alternating, q/k/v/o, router and expert biases, the clamped
    # SwiGLU (a low limit, so that it clamps), yarn
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_hidden_layers=3, head_dim=16, num_local_experts=8, num_experts_per_tok=4, intermediate_size=32,
                     sliding_window=24, swiglu_limit=1.0,
                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0,
                                          beta_slow=1.0, truncate=False, original_max_position_embeddings=64))),
}


def write_tiny_family(folder: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A random checkpoint of one family, saved with transformers' own classes (hub tensor names),
    plus the shipped tokenizer. `overrides` are config fields (see TINY_FAMILIES for the defaults)."""
    import transformers

    config_class, model_class, family = TINY_FAMILIES[model_type]
    settings = {**_TINY_BASE, **family, **overrides}
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    # Random init gives tiny logits; scale the weights up so routing and attention are not flat,
    # and move norm weights off 1 so a misplaced norm cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.5 / param.shape[-1] ** 0.5 * 4)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param), alpha=0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # zeros at init: the routing would not depend on it
                buffer.normal_(0, 0.1)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((SHIPPED_MODEL / name).read_bytes())
    return folder


def write_tiny_mixtral(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random MixtralForCausalLM saved with transformers (hub tensor names), plus the shipped tokenizer."""
    return write_tiny_family(folder, "mixtral", seed, **overrides)
