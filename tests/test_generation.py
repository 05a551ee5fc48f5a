"""Generation: greedy equals transformers' generate, sampling is reproducible, stops are honoured."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import RuntimeConfig, SamplingParams
from moe_offload.engine import Engine, StopStrings
from moe_offload import generate
from moe_offload.constrain import json_schema_grammar, unpack_bitmask
from moe_offload.generate import Batch, masked_greedy, penalize, sample, warp
from moe_offload.model import KVCache

from conftest import SHIPPED_MODEL, slow_except

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\n", "class Graph:\n    \"\"\"A graph"]


@pytest.fixture(scope="module")
def engine():
    return Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cpu", dtype="float32"), progress=False)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL, dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", slow_except(PROMPTS, PROMPTS[0]))
def test_greedy_generation_matches_transformers_generate(engine, reference, prompt):
    ids = engine.tokenizer.encode(prompt)
    run = engine.stream(ids, SamplingParams(max_new_tokens=48))
    run.text()
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=2, pad_token_id=2)
    expected = out[0, len(ids):].tolist()
    if 2 in expected:  # transformers includes the EOS token; we stop before it
        expected = expected[:expected.index(2)]
    assert run.token_ids == expected
    assert run.finish_reason == ("length" if len(expected) == 48 else "stop")


def test_sampling_with_a_seed_is_reproducible(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first = engine.stream(ids, params)
    first.text()
    second = engine.stream(ids, params)
    second.text()
    other = engine.stream(ids, SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=8))
    other.text()
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_streamed_text_equals_decoding_all_tokens(engine):
    run = engine.stream(engine.tokenizer.encode(PROMPTS[1]), SamplingParams(max_new_tokens=40, temperature=1.0, seed=3))
    text = run.text()
    assert text == engine.tokenizer.decode(run.token_ids)


def test_stop_string_cuts_the_text_before_it(engine):
    ids = engine.tokenizer.encode(PROMPTS[0])
    full = engine.stream(ids, SamplingParams(max_new_tokens=48)).text()
    stop = full[10:14]
    assert stop in full
    cut = engine.stream(ids, SamplingParams(max_new_tokens=48, stop=(stop,)))
    assert cut.text() == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_generation_ends_when_the_context_is_full(tmp_path):
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cpu", dtype="float32", max_context=16), progress=False)
    ids = engine.tokenizer.encode(PROMPTS[0])
    run = engine.stream(ids, SamplingParams(max_new_tokens=100))
    run.text()
    assert len(ids) + len(run.token_ids) == 16
    assert run.finish_reason == "length"


def test_stop_strings_hold_back_a_possible_beginning():
    stops = StopStrings(("\nuser:",))
    assert stops.feed("hello\nus") == ("hello", False)
    assert stops.feed("eful") == ("\nuseful", False)
    assert stops.feed(" x\nuser: hi") == (" x", True)


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(temperature=5.0, top_k=1, seed=0)
    assert all(sample(logits, params, torch.Generator().manual_seed(s)) == 1 for s in range(20))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.75)
    seen = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}


def reference_logprobs(reference, token_ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the vocabulary at every position of `token_ids`."""
    with torch.no_grad():
        return reference(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.5, top_k=20, seed=3)], ids=["greedy", "sampled"])
def test_logprobs_are_the_models_raw_distribution_as_transformers_computes_it(engine, reference, sampling):
    """Prompt tokens 1..T-1 and every new token, with their top alternatives; sampled or not, the
    distribution is log_softmax(logits) before temperature and top-k."""
    ids = engine.tokenizer.encode(PROMPTS[2])
    run = engine.stream(ids, SamplingParams(max_new_tokens=12, logprobs=3, prompt_logprobs=2, **sampling))
    run.text()
    expected = reference_logprobs(reference, ids + run.token_ids)
    entries = run.prompt_logprobs + run.logprobs
    assert len(run.prompt_logprobs) == len(ids) - 1 and len(run.logprobs) == len(run.token_ids)
    for position, entry in enumerate(entries):
        assert entry.token_id == (ids + run.token_ids)[position + 1]
        assert entry.logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)
        top = expected[position].topk(len(entry.top))
        assert [i for i, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [len(e.top) for e in run.prompt_logprobs] == [2] * (len(ids) - 1)
    assert [len(e.top) for e in run.logprobs] == [3] * len(run.token_ids)


def test_no_new_tokens_still_gives_the_prompts_logprobs(engine, reference):
    ids = engine.tokenizer.encode(PROMPTS[0])
    run = engine.stream(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    assert run.text() == "" and run.token_ids == [] and run.finish_reason == "length"
    expected = reference_logprobs(reference, ids)
    assert [e.logprob for e in run.prompt_logprobs] == pytest.approx(
        [float(expected[i, ids[i + 1]]) for i in range(len(ids) - 1)], abs=1e-4)


WARPS = [dict(temperature=0.7), dict(temperature=1.3, top_k=40), dict(temperature=1.0, top_p=0.9),
         dict(temperature=0.8, min_p=0.05), dict(temperature=1.1, top_k=100, top_p=0.8, min_p=0.02),
         dict(temperature=2.0, min_p=0.3)]


def transformers_warpers(params: SamplingParams):
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    return LogitsProcessorList(warpers)


@pytest.mark.parametrize("settings", WARPS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_temperature_top_k_top_p_min_p_match_transformers_warpers(settings):
    params = SamplingParams(**settings)
    for seed in range(5):
        logits = torch.randn(2000, generator=torch.Generator().manual_seed(seed)) * 3
        expected = transformers_warpers(params)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
        ours = warp(logits, params)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), seed
        kept = torch.isfinite(expected)
        assert 0 < kept.sum() < 2000 or settings.keys() == {"temperature"}
        torch.testing.assert_close(ours[kept], expected[kept])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 4
    prompt_ids, output_ids = [3, 17, 17, 250], [17, 499, 8]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt_ids + output_ids]), logits[None].clone())[0]
    ours = penalize(logits, SamplingParams(repetition_penalty=penalty), prompt_ids, output_ids)
    torch.testing.assert_close(ours, expected)


def presence_frequency_reference(logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float):
    """OpenAI's formula, token by token: logit - count * frequency - (count > 0) * presence."""
    logits = logits.clone()
    for token in set(output_ids):
        logits[token] -= output_ids.count(token) * frequency + presence
    return logits


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.8), (-1.0, 1.5), (2.0, -2.0)])
def test_presence_and_frequency_penalties_match_openais_formula(presence, frequency):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    prompt_ids, output_ids = [5, 6, 7], [7, 7, 7, 42, 299, 42, 0]
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    expected = presence_frequency_reference(logits, output_ids, presence, frequency)
    torch.testing.assert_close(penalize(logits, params, prompt_ids, output_ids), expected)
    assert torch.equal(penalize(logits, params, prompt_ids, []), logits)   # the prompt is not penalized


def test_greedy_with_repetition_penalty_matches_transformers_generate(engine, reference):
    """Penalties need the tokens so far, so greedy decoding with them picks on the host: same tokens."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    run = engine.stream(ids, SamplingParams(max_new_tokens=32, repetition_penalty=1.4))
    run.text()
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, repetition_penalty=1.4,
                                 eos_token_id=2, pad_token_id=2)
    expected = out[0, len(ids):].tolist()
    if 2 in expected:
        expected = expected[:expected.index(2)]
    assert run.token_ids == expected
    plain = engine.stream(ids, SamplingParams(max_new_tokens=32))
    plain.text()
    assert plain.token_ids != expected, "the penalty should change this greedy text"


def test_greedy_with_presence_and_frequency_penalties_matches_a_plain_loop(engine, reference):
    ids = engine.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=24, presence_penalty=0.8, frequency_penalty=0.6)
    run = engine.stream(ids, params)
    run.text()
    expected = []
    with torch.no_grad():
        for _ in range(24):
            logits = reference(torch.tensor([ids + expected])).logits[0, -1].float()
            token = int(presence_frequency_reference(logits, expected, 0.8, 0.6).argmax())
            if token == 2:
                break
            expected.append(token)
    assert run.token_ids == expected
    plain = engine.stream(ids, SamplingParams(max_new_tokens=24))
    plain.text()
    assert plain.token_ids != expected, "the penalties should change this greedy text"


def test_min_p_keeps_the_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, min_p=0.5)    # keeps p >= 0.25
    seen = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}


def test_the_masked_greedy_pick_on_the_device_is_samples_greedy_pick_under_the_same_mask():
    torch.manual_seed(0)
    vocab = 1000                                  # not a multiple of 32: the last word's spare bits are ignored
    logits = torch.randn(5, vocab)
    bitmasks = torch.randint(-2**31, 2**31 - 1, (5, 32), dtype=torch.int32)
    bitmasks[1] = -1                              # all allowed: the plain greedy pick
    bitmasks[2] = 0
    bitmasks[2, 7] = 1 << 3                       # one allowed token: 7 * 32 + 3
    host = [sample(row, SamplingParams(), allowed=unpack_bitmask(mask, vocab)) for row, mask in zip(logits, bitmasks)]
    assert masked_greedy(logits, bitmasks).tolist() == host
    assert host[1] == int(logits[1].argmax()) and host[2] == 7 * 32 + 3


JSON_SCHEMAS = [{"type": "object", "properties": {"name": {"type": "string"}, "size": {"type": "integer"}},
                 "required": ["name", "size"]},
                {"type": "array", "items": {"enum": ["list", "dict", "set"]}}]


def constrained_reference(engine, reference, prompt: list[int], grammar: str, new_tokens: int) -> list[int]:
    """Greedy under a grammar, the slow way: transformers' logits of the whole text each token, masked on the host."""
    constraint, out = engine.grammars.constraint(grammar), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = reference(torch.tensor([prompt + out])).logits[0, -1].float()
            token = sample(logits, SamplingParams(), allowed=constraint.allowed())
            if token in engine.tokenizer.eos_ids:
                break
            constraint.accept(token)
            out.append(token)
    return out


def test_constrained_greedy_decoding_in_a_batch_picks_on_the_device_what_the_host_picks(engine, reference, monkeypatch):
    """Two generations under JSON schemas decoded beside a free one: their greedy tokens are picked under the mask
    on the logits' device, and are those of a plain loop masking on the host."""
    device_picks = []
    monkeypatch.setattr(generate, "masked_greedy", lambda *args: device_picks.append(1) or masked_greedy(*args))
    grammars = [json_schema_grammar(schema) for schema in JSON_SCHEMAS] + [None]
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    batch = Batch(engine.model, KVCache.allocate(engine.config, 3, 128, "cpu", torch.float32))
    tokens = {batch.add(prompt, SamplingParams(max_new_tokens=20, grammar=grammar), engine.tokenizer.eos_ids,
                        constraint=grammar and engine.grammars.constraint(grammar)): []
              for prompt, grammar in zip(prompts, grammars)}
    while batch.busy:
        for generation, token in batch.step():
            tokens[generation].append(token)
    expected = [constrained_reference(engine, reference, prompt, grammar, 20)
                for prompt, grammar in zip(prompts[:2], grammars)]
    assert list(tokens.values())[:2] == expected
    assert device_picks
