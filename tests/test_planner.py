"""The memory planner: budgets -> slots per layer and host tiers, its errors, and its byte counts."""

from __future__ import annotations

import math
import re
import textwrap

import pytest
import torch

from moe_offload.cli import main
from moe_offload.config import ModelConfig, OffloadConfig, QuantConfig, RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.errors import UserError
from moe_offload.experts import DenseExpertFormat, ResidentExperts
from moe_offload.offload.planner import GiB, make_plan, parse_size, plan_for
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.quant.weight import QuantizedWeight

from conftest import REPO, SHIPPED_MODEL, write_tiny_mixtral

CONFIG = ModelConfig(model_type="qwen3_moe", vocab_size=100, hidden_size=8, num_layers=5, num_heads=2, num_kv_heads=1,
                     head_dim=4, expert_ffn=8, num_experts=4, top_k=2, rms_norm_eps=1e-6, rope_theta=1e4,
                     max_position_embeddings=64, dense_layers=(0,))   # MoE layers 1-4


EXPERT = 1024                       # bytes per expert (a multiple of the slot alignment)
FIXED = 10_000 + 2_000 + 3_000      # non-expert weights + KV cache + workspace


def plan(budget, expert_nbytes=EXPERT, **kw):
    return make_plan(CONFIG, expert_nbytes=expert_nbytes, dense_bytes=10_000, kv_bytes=2_000, max_context=64,
                     workspace=3_000, device_budget=budget, **kw)


def test_leftover_bytes_become_slots_spread_evenly_over_moe_layers_only():
    p = plan(FIXED + 11 * EXPERT + EXPERT - 1)          # 11 slots' worth (and change) after the fixed parts
    assert p.slots == {1: 3, 2: 3, 3: 3, 4: 2}
    assert p.slot_bytes == 11 * EXPERT and p.device_bytes == FIXED + 11 * EXPERT <= p.device_budget
    assert "3 in layers 1-3, 2 in layer 4" in p.describe()


def test_a_layer_never_gets_more_slots_than_experts():
    assert plan(100 * GiB).slots == dict.fromkeys((1, 2, 3, 4), 4)


def test_slots_are_counted_with_their_alignment_padding():
    p = plan(FIXED + 4 * 1024, expert_nbytes=1000)      # each 1000-byte expert takes a 1024-byte slot
    assert p.slots == dict.fromkeys((1, 2, 3, 4), 1) and p.slot_bytes == 4 * 1024


def test_too_small_a_budget_names_the_smallest_that_works():
    smallest = FIXED + 4 * EXPERT
    assert plan(smallest).slots == dict.fromkeys((1, 2, 3, 4), 1)
    with pytest.raises(UserError, match=r"--gpu-memory 0\.00 GiB is too small.*raise --gpu-memory to at least 0\.01GiB"):
        plan(smallest - 1)


def test_fixed_slots_must_fit_and_be_at_most_the_experts():
    assert plan(FIXED + 8 * EXPERT, slots_per_layer=2).slots == dict.fromkeys((1, 2, 3, 4), 2)
    with pytest.raises(UserError, match="--slots 3 needs"):
        plan(FIXED + 8 * EXPERT, slots_per_layer=3)
    with pytest.raises(UserError, match="--slots 5: use 1 to 4"):
        plan(100 * GiB, slots_per_layer=5)


def test_host_budget_splits_experts_between_ram_and_disk():
    p = plan(10 * GiB, host_budget=10 * EXPERT + 500)    # 10 of the 16 experts fit
    assert (p.ram_experts, p.disk_experts) == (10, 6)
    assert (plan(10 * GiB).ram_experts, plan(10 * GiB).disk_experts) == (16, 0)


@pytest.mark.parametrize("text, size", [("12GiB", 12 * 2**30), ("12G", 12 * 2**30), ("24GB", 24 * 10**9),
                                        ("500MiB", 500 * 2**20), ("1.5GiB", 3 * 2**29), ("1e9", 10**9), ("4096", 4096)])
def test_sizes_parse_binary_and_decimal_units(text, size):
    assert parse_size(text, "--gpu-memory") == size


@pytest.mark.parametrize("text", ["12XB", "lots", "-1GiB", "0", ""])
def test_bad_sizes_are_refused_naming_the_flag(text):
    with pytest.raises(UserError, match="--cpu-memory"):
        parse_size(text, "--cpu-memory")


def non_expert_weights(w) -> tuple[list, list]:
    """The model's non-expert weights: (attention matrices, everything else)."""
    attention = [m for layer in w.layers for m in (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.attn.wo)]
    return attention, [w.embed, w.norm, w.lm_head] + [t for layer in w.layers for t in (layer.attn_norm, layer.mlp_norm, layer.router)]


def allocated_bytes(weight) -> int:
    """A tensor's bytes, or a QuantizedWeight's one buffer."""
    if isinstance(weight, QuantizedWeight):
        return weight.packed.untyped_storage().nbytes()
    return weight.numel() * weight.element_size()


def test_plan_counts_the_bytes_the_engine_really_allocates():
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cpu", dtype="float32", max_context=256), progress=False)
    config, w = engine.config, engine.model.weights
    fmt = DenseExpertFormat(config.hidden_size, config.expert_ffn, torch.float32)
    p = plan_for(config, fmt.nbytes, torch.float32, 256, OffloadConfig(enabled=True, gpu_memory=GiB), "cpu")
    attention, others = non_expert_weights(w)
    assert p.dense_bytes == sum(t.numel() * t.element_size() for t in attention + others)
    assert p.kv_bytes == sum(t.numel() * t.element_size() for t in engine.cache.keys + engine.cache.values)
    assert p.expert_nbytes == fmt.nbytes and math.prod(w.layers[0].router.shape) == config.num_experts * config.hidden_size


def test_plan_counts_quantized_attention_at_its_packed_size(tmp_path):
    folder = write_tiny_mixtral(tmp_path, intermediate_size=128)
    runtime = RuntimeConfig(model=folder, device="cpu", dtype="float32", max_context=64, quant=QuantConfig.parse("4/2"))
    engine = Engine.load(runtime, progress=False, offload=OffloadConfig(enabled=True, gpu_memory=GiB, slots_per_layer=1))
    attention, others = non_expert_weights(engine.model.weights)
    assert all(isinstance(m, QuantizedWeight) for m in attention)
    allocated = sum(allocated_bytes(t) for t in attention + others)
    unquantized = plan_for(engine.config, engine.plan.expert_nbytes, torch.float32, 64,
                           OffloadConfig(enabled=True, gpu_memory=GiB), "cpu")
    assert engine.plan.dense_bytes == allocated < unquantized.dense_bytes


def test_offloaded_engine_allocates_exactly_the_planned_slots():
    offload = OffloadConfig(enabled=True, gpu_memory=int(0.45 * GiB), cpu_memory=20 * 2**20)
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cpu", dtype="float32", max_context=256),
                         progress=False, offload=offload)
    provider = engine.model.provider
    memories = {layer: slots.memory for layer, slots in provider.slots.items()}
    assert {layer: len(memory) for layer, memory in memories.items()} == engine.plan.slots
    assert provider.store.ram_experts == engine.plan.ram_experts == 20 * 2**20 // engine.plan.expert_nbytes
    assert sum(m.numel() for m in memories.values()) == engine.plan.slot_bytes
    assert all(m.stride(0) % 512 == 0 for m in memories.values())


def test_documented_sample_plan_is_what_the_command_prints(capsys):
    section = (REPO / "docs" / "offloading.md").read_text().split("## Expert offloading", 1)[1]
    flags, sample = re.search(r"the shipped model on the CPU with `([^`]+)`.*?```\n(.*?)\n *```", section, re.S).groups()
    assert main(["generate", "--prompt", "x", "--max-tokens", "1", "--device", "cpu", "--offload", *flags.split()]) == 0
    printed = capsys.readouterr().err
    assert textwrap.dedent(sample) in printed, printed


def test_an_offload_plan_that_holds_every_expert_runs_them_resident(tmp_path):
    """--offload with a budget that gives every expert a slot: nothing to offload, so no host read per layer."""
    folder = write_tiny_mixtral(tmp_path, intermediate_size=128)
    runtime = RuntimeConfig(model=folder, device="cpu", dtype="float32", max_context=64)
    roomy = Engine.load(runtime, progress=False, offload=OffloadConfig(enabled=True, gpu_memory=GiB))
    tight = Engine.load(runtime, progress=False, offload=OffloadConfig(enabled=True, gpu_memory=GiB, slots_per_layer=1))
    assert roomy.plan is None and isinstance(roomy.model.provider, ResidentExperts)
    assert not tight.plan.holds_every_expert and isinstance(tight.model.provider, OffloadedExperts)


def test_a_fine_tune_keeps_its_experts_offloaded_when_all_fit(tmp_path):
    """Training's backward takes an offloaded layer's experts one at a time (bounded memory), resident ones all at
    once, so a plan that holds every expert stays offloaded for a fine-tune."""
    folder = write_tiny_mixtral(tmp_path, intermediate_size=128)
    runtime = RuntimeConfig(model=folder, device="cpu", dtype="float32", max_context=64)
    engine = Engine.load(runtime, progress=False, offload=OffloadConfig(enabled=True, gpu_memory=GiB), training=True)
    assert engine.plan.holds_every_expert and isinstance(engine.model.provider, OffloadedExperts)
