"""Continuous batching (generate.Batch): generations decoded together, joining and leaving mid-way, against each
decoded alone; offloaded against resident."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import SamplingParams
from moe_offload.generate import Batch
from moe_offload.model import KVCache, Transformer

from conftest import EVAL_TEXT, FIXTURE_32L, requires_fixture
from test_offload import load_fixture

pytestmark = pytest.mark.usefixtures("one_thread")    # the cached fixtures' reference logits are computed under it

JOINS = (0, 0, 3, 5)                 # the step at which each prompt joins
NEW_TOKENS = (12, 5, 9, 4)           # each leaves after its own count: some leave while others still run
PROMPT_LENGTHS = (23, 7, 40, 15)


def prompts(fixture) -> list[list[int]]:
    ids = fixture.engine.tokenizer.encode(open(EVAL_TEXT).read()[:6000])
    return [ids[100 * i:100 * i + length] for i, length in enumerate(PROMPT_LENGTHS)]


def decode(model: Transformer, prompt_list: list[list[int]], joins=JOINS, new_tokens=NEW_TOKENS):
    """Greedy tokens and decode-step logits of each prompt, run as a batch where they join at `joins` steps."""
    cache = KVCache.allocate(model.config, len(prompt_list), 96, "cpu", torch.float32)
    batch = Batch(model, cache)
    tokens, logits, index = {}, {}, {}
    decode_step = batch.decode_step

    def recording(count):
        out = decode_step(count)
        for i, generation in enumerate(batch.running[:count]):
            logits[index[id(generation)]].append(out[i].clone())
        return out

    batch.decode_step = recording
    recording.set, recording.move, recording.next_tokens = decode_step.set, decode_step.move, decode_step.next_tokens
    step = 0
    while step <= max(joins) or batch.busy:
        for n, (prompt, join) in enumerate(zip(prompt_list, joins)):
            if join == step:
                generation = batch.add(prompt, SamplingParams(max_new_tokens=new_tokens[n]))
                index[id(generation)], tokens[n], logits[n] = n, [], []
        for generation, token in batch.step():
            tokens[index[id(generation)]].append(token)
        step += 1
    return tokens, logits


@pytest.mark.parametrize("fixture_name", ["shipped", pytest.param("32l", marks=requires_fixture(FIXTURE_32L))])
def test_generations_decoded_together_match_each_decoded_alone(fixture_name):
    fixture = load_fixture(fixture_name)
    model = fixture.engine.model
    together_tokens, together_logits = decode(model, prompts(fixture))
    for n, prompt in enumerate(prompts(fixture)):
        alone_tokens, alone_logits = decode(model, [prompt], joins=(0,), new_tokens=(NEW_TOKENS[n],))
        assert together_tokens[n] == alone_tokens[0] and len(together_tokens[n]) == NEW_TOKENS[n]
        for got, want in zip(together_logits[n], alone_logits[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("slots, prefetch", [(1, False), (2, True), (7, True)])
def test_offloaded_batched_decode_is_bit_identical_to_resident_batched(slots, prefetch):
    fixture = load_fixture("shipped")
    engine = fixture.engine
    offloaded = Transformer(engine.config, engine.model.weights, fixture.offloaded(slots, prefetch))
    resident_tokens, resident_logits = decode(engine.model, prompts(fixture))
    tokens, logits = decode(offloaded, prompts(fixture))
    assert tokens == resident_tokens
    for n in logits:
        for got, want in zip(logits[n], resident_logits[n], strict=True):
            assert torch.equal(got, want)


def test_a_full_batch_refuses_another_generation_until_one_leaves():
    fixture = load_fixture("shipped")
    cache = KVCache.allocate(fixture.engine.config, 2, 64, "cpu", torch.float32)
    batch = Batch(fixture.engine.model, cache)
    first = batch.add([5, 6, 7], SamplingParams(max_new_tokens=3))
    batch.add([8, 9], SamplingParams(max_new_tokens=3))
    assert batch.full
    with pytest.raises(RuntimeError, match="the batch is full"):
        batch.add([10], SamplingParams())
    batch.cancel(first)
    assert not batch.full and batch.add([10], SamplingParams()).row == first.row


def test_a_sampled_generation_keeps_its_tokens_when_one_before_it_leaves():
    """The first leaves at the step where the second samples on the host: the second moves into its place in the
    step's tables with its own sampled token, and draws what it draws alone."""
    fixture = load_fixture("shipped")
    prompt = prompts(fixture)[0]
    params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=seed) for new, seed in ((4, 1), (10, 2))]

    def sampled(together: list[SamplingParams]) -> list[list[int]]:
        batch = Batch(fixture.engine.model, KVCache.allocate(fixture.engine.config, len(together), 64, "cpu", torch.float32))
        tokens = {batch.add(prompt, p): [] for p in together}
        while batch.busy:
            for generation, token in batch.step():
                tokens[generation].append(token)
        return list(tokens.values())

    assert sampled(params) == [sampled([p])[0] for p in params]
