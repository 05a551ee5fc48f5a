"""The decode step on CUDA (run on the GPU machine: `python -m pytest -m gpu tests/test_step_gpu.py`): CUDA-graph
replays against eager steps, quantized offloaded decode against quantized resident decode (the grouped GEMV path),
and the host synchronisations a step makes."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_offload.config import QuantConfig, RuntimeConfig
from moe_offload.engine import Engine, expert_storage
from moe_offload.generate import prefill
from moe_offload.model import KVCache, Transformer
from moe_offload.offload.prefetch import GatePredictor
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.offload.store import ExpertStore
from moe_offload.quant.checkpoint import open_checkpoint
from moe_offload.step import DecodeStep

from conftest import EVAL_TEXT, SHIPPED_MODEL

pytestmark = pytest.mark.gpu

QUANT = QuantConfig.parse("4/2")
STEPS = 24


@functools.cache
def quantized():
    """The shipped model quantized 4/2 on the GPU, resident; its experts' buffers in a pinned store; a prompt."""
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cuda", dtype="bfloat16", quant=QUANT), progress=False)
    config = engine.config
    fmt, buffer = expert_storage(open_checkpoint(SHIPPED_MODEL, QUANT, "cuda"), torch.bfloat16)
    store = ExpertStore(config.moe_layers, config.num_experts, fmt.nbytes, pin=True)
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            store.write(layer, e, buffer(layer, e).cpu())
    prompt = engine.tokenizer.encode(open(EVAL_TEXT).read()[:3000])[:200]
    return engine, fmt, store, prompt


def offloaded(slots: int, prefetch: bool) -> Transformer:
    engine, fmt, store, _ = quantized()
    config = engine.config
    predictor = GatePredictor(config, engine.model.weights.layers, depth=2, top_n=3) if prefetch else None
    provider = OffloadedExperts(store, fmt, dict.fromkeys(config.moe_layers, slots), "cuda", predictor)
    return Transformer(config, engine.model.weights, provider)


def decode(model: Transformer, capture: bool) -> tuple[list[torch.Tensor], DecodeStep]:
    """Prefill the prompt, then STEPS greedy steps of a DecodeStep (graphs from its second step when `capture`)."""
    prompt = quantized()[3]
    cache = KVCache.allocate(model.config, 1, len(prompt) + STEPS + 1, "cuda", torch.bfloat16)
    step = DecodeStep(model, cache)
    step.capturable[1] &= capture
    step.set(0, int(prefill(model, cache, prompt, "cuda")[-1].argmax()), len(prompt), row=0)
    return [step(1).clone() for _ in range(STEPS)], step


def test_resident_and_offloaded_steps_are_captured():
    engine = quantized()[0]
    assert DecodeStep(engine.model, engine.cache).capturable[1]
    assert 1 in decode(offloaded(slots=2, prefetch=True), capture=True)[1].graphs
    assert not decode(offloaded(slots=1, prefetch=True), capture=True)[1].capturable[1]    # top-2 needs 2 slots


@pytest.mark.parametrize("slots", [None, 2, 7], ids=["resident", "2_slots", "7_slots"])
def test_graph_replayed_steps_are_bit_identical_to_eager_steps(slots):
    model = quantized()[0].model if slots is None else offloaded(slots, prefetch=True)
    replayed, step = decode(model, capture=True)
    assert 1 in step.graphs
    eager, _ = decode(model if slots is None else offloaded(slots, prefetch=True), capture=False)
    for got, want in zip(replayed, eager, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("prefetch", [False, True], ids=["no_prefetch", "prefetch"])
@pytest.mark.parametrize("slots", [1, 2, 7])
def test_quantized_offloaded_decode_is_bit_identical_to_quantized_resident(slots, prefetch):
    resident, _ = decode(quantized()[0].model, capture=True)
    model = offloaded(slots, prefetch)
    actual, _ = decode(model, capture=True)
    for got, want in zip(actual, resident, strict=True):
        assert torch.equal(got, want)
    stats = model.provider.summary()
    assert stats["misses"] > 0 and stats["hits"] > 0


def count_blocking_waits(monkeypatch) -> list[int]:
    """Fails on any synchronising call torch knows of, and counts the provider's event waits (its routing reads)."""
    waits = [0]
    synchronize = torch.cuda.Event.synchronize

    def counted(event):
        waits[0] += 1
        torch.cuda.set_sync_debug_mode(0)
        synchronize(event)
        torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)
    return waits


@pytest.mark.parametrize("slots", [None, 2], ids=["resident", "offloaded"])
def test_a_decode_step_waits_for_the_host_at_most_once_per_moe_layer(slots, monkeypatch):
    model = quantized()[0].model if slots is None else offloaded(slots, prefetch=True)
    _, step = decode(model, capture=True)
    waits = count_blocking_waits(monkeypatch)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert waits[0] == (0 if slots is None else len(model.config.moe_layers))


@pytest.mark.parametrize("slots", [2, 8], ids=["2_slots", "8_slots"])
def test_a_captured_step_stays_right_after_longer_eager_forwards(slots):
    """A captured step keeps the read buffers and slot table it recorded: prefills staged after the capture (more
    pairs, a longer read; with 8 slots every expert of a prefill fits, so the slot table grows) change nothing."""
    engine, _, _, prompt = quantized()
    outputs = []
    for model in (engine.model, offloaded(slots, prefetch=True)):
        cache = KVCache.allocate(engine.config, 1, 400, "cuda", torch.bfloat16)
        step = DecodeStep(model, cache)
        logits = []
        for length in (8, 150):          # the second prefill stages its reads after the capture
            step.set(0, int(prefill(model, cache, prompt[:length], "cuda")[-1].argmax()), length, row=0)
            logits += [step(1).clone() for _ in range(6)]
        assert 1 in step.graphs
        outputs.append(logits)
    for got, want in zip(*outputs, strict=True):
        assert torch.equal(got, want)


def decode_batch(model: Transformer, prompts: list[list[int]], steps: int = 12) -> list[torch.Tensor]:
    """Each prompt prefilled into its own cache row, then `steps` batched steps of them all (graphs from the
    second): the logits of every step."""
    cache = KVCache.allocate(model.config, len(prompts), max(map(len, prompts)) + steps + 1, "cuda", torch.bfloat16)
    step = DecodeStep(model, cache)
    for index, prompt in enumerate(prompts):
        token = int(prefill(model, cache.row(index), prompt, "cuda")[-1].argmax())
        step.set(index, token, len(prompt), row=index)
    out = [step(len(prompts)).clone() for _ in range(steps)]
    assert len(prompts) in step.graphs or not step.capturable[len(prompts)]
    return out


@pytest.mark.parametrize("slots", [8, 3], ids=["8_slots", "3_slots_streamed"])
def test_batched_offloaded_steps_are_bit_identical_to_batched_resident_steps(slots):
    """Three sequences at once (a bucket of four, one spare row): with a slot for every expert the offloaded step is
    captured; with three, a step's experts may not fit and it streams them eagerly. Either way the logits are the
    resident batch's, bit for bit."""
    engine, _, _, prompt = quantized()
    prompts = [prompt[:40], prompt[50:75], prompt[100:160]]
    resident = decode_batch(engine.model, prompts)
    actual = decode_batch(offloaded(slots, prefetch=True), prompts)
    for got, want in zip(actual, resident, strict=True):
        assert torch.equal(got, want)
