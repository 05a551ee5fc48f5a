"""Experts computed on the CPU while the GPU decodes (run on the GPU machine:
`python -m pytest -m gpu tests/test_cpu_tier_gpu.py`): captured steps replay the CPU's products bit for bit as eager
steps compute them, greedy tokens equal the resident model's, and the engine calibrates the link and the CPU."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import OffloadConfig, RuntimeConfig, SamplingParams
from moe_offload.engine import Engine
from moe_offload.model import Transformer
from moe_offload.offload.cpu_tier import Calibration, CostModel, CpuExperts
from moe_offload.offload.provider import OffloadedExperts

from conftest import SHIPPED_MODEL
from test_step_gpu import QUANT, decode, quantized

pytestmark = pytest.mark.gpu


def hybrid(slots: int, cpu_layers: int) -> Transformer:
    """The quantized shipped model offloaded; a fake calibration sends every decode miss to the CPU, and the first
    `cpu_layers` MoE layers have no slots."""
    engine, fmt, store, _ = quantized()
    config = engine.config
    costs = CostModel(Calibration(1.0, tuple((rows, 1e6) for rows in (1, 2, 4, 8))), fmt.nbytes)
    slots_of = {layer: 0 if i < cpu_layers else slots for i, layer in enumerate(config.moe_layers)}
    provider = OffloadedExperts(store, fmt, slots_of, "cuda", cpu=CpuExperts(store, fmt, "cuda", costs))
    return Transformer(config, engine.model.weights, provider)


@pytest.mark.parametrize("slots, cpu_layers", [(2, 0), (1, 0), (2, 3)], ids=["dynamic", "one-slot", "static+dynamic"])
def test_cuda_decode_with_cpu_experts_replays_eager_bits_and_resident_tokens(slots, cpu_layers):
    eager, _ = decode(hybrid(slots, cpu_layers), capture=False)
    model = hybrid(slots, cpu_layers)
    captured, step = decode(model, capture=True)
    assert 1 in step.graphs                            # the CPU's rows and mask are the captured step's buffers
    for a, b in zip(eager, captured, strict=True):
        assert torch.equal(a, b)
    resident, _ = decode(quantized()[0].model, capture=True)
    assert [int(l.argmax()) for l in captured] == [int(l.argmax()) for l in resident]
    stats = model.provider.summary()
    assert stats["cpu_uses"] > 0 and stats["cpu_gbps"] > 0


def test_cuda_engine_calibrates_and_auto_runs_misses_where_they_finish_sooner():
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cuda", dtype="bfloat16", quant=QUANT), progress=False,
                         offload=OffloadConfig(enabled=True, slots_per_layer=1, prefetch_experts=0))
    cpu = engine.model.provider.cpu
    calibration = cpu.costs.calibration
    print(calibration.describe())
    assert calibration.link_gbps > 0 and all(gbps > 0 for _, gbps in calibration.cpu_gbps)
    run = engine.stream(engine.tokenizer.encode("def fib(n):"), SamplingParams(max_new_tokens=16))
    run.text()
    stats = engine.expert_stats()
    print(stats)
    assert stats["hits"] + stats["misses"] == stats["requests"]
