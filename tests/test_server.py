"""The OpenAI-compatible server, tested as users meet it: a real `moe-offload serve` process on
127.0.0.1 with the shipped model on the CPU, driven by the official `openai` client and httpx.

Expected texts come from elsewhere than the server: `moe-offload generate` (a separate process)
and an in-process Engine without the server's queue, threads or HTTP (the slow twin).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import BaseModel
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moe_offload.cli import main
from moe_offload.config import RuntimeConfig, SamplingParams
from moe_offload.engine import Engine
from moe_offload import generate as generate_module
from moe_offload.model import Transformer
from moe_offload.server.metrics import Metrics
from moe_offload.server.scheduler import Scheduler, Sequence

from conftest import EVAL_TEXT, SLOW
from structured_schemas import SCHEMAS

MODEL = "default_model"      # the served id: the shipped model's folder name
API_KEY = "test-key-123"


class ServerProcess:
    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc")

    def metrics(self, headers=None) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


@contextmanager
def running_server(*flags: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="moe-offload-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "moe_offload.cli", "serve", "--device", "cpu", "--port", str(port), *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(process, port, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"server exited at start:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not healthy after 180 s:\n{log.read_text()}"
            time.sleep(0.2)
        yield server
        assert process.poll() is None, f"server died:\n{log.read_text()}"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.unlink()


@pytest.fixture(scope="module")
def server():
    """Two sequences decode together, so that a third waits: batching and the queue both under test."""
    with running_server("--max-batch", "2") as s:
        yield s


@pytest.fixture(scope="module")
def guarded_server():
    """Offloaded experts (2 slots per layer), an API key, one sequence at a time, a queue of one, a 4 KiB body
    limit, 2 s to send it."""
    with running_server("--offload", "--slots", "2", "--api-key", API_KEY, "--max-batch", "1", "--max-queue", "1",
                        "--max-body-bytes", "4096", "--body-timeout", "2") as s:
        yield s


@pytest.fixture(scope="module")
def engine():
    return Engine.load(RuntimeConfig(device="cpu"), progress=False)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected_completion(engine, prompt: str, **sampling) -> str:
    return engine.stream(engine.tokenizer.encode(prompt), SamplingParams(**sampling)).text()


def expected_chat(engine, messages: list[dict], **sampling) -> str:
    params = SamplingParams(**sampling, stop=engine.tokenizer.chat_stop_strings)
    return engine.stream(engine.tokenizer.encode_chat(messages), params).text()


# --- the official openai client -------------------------------------------------------------

def test_openai_completions_streamed_equals_non_streamed_equals_generate_cli(client):
    prompt, settings_ = "def fibonacci(n):", dict(max_tokens=12, temperature=0.8, seed=7)
    cli = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "--device", "cpu", "--prompt", prompt,
                          "--max-tokens", "12", "--temperature", "0.8", "--seed", "7"],
                         capture_output=True, text=True, timeout=300, check=True)
    printed = cli.stdout.removesuffix("\n")

    whole = client.completions.create(model=MODEL, prompt=prompt, **settings_)
    streamed = client.completions.create(model=MODEL, prompt=prompt, stream=True, **settings_)
    pieces = [chunk.choices[0].text for chunk in streamed if chunk.choices]

    assert printed and whole.choices[0].text == printed
    assert "".join(pieces) == printed
    assert len([p for p in pieces if p]) > 1, "streaming should deliver the text in several pieces"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_openai_chat_streamed_equals_non_streamed_and_the_engine(client, engine):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.9, seed=3)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0.9, seed=3,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reference = expected_chat(engine, messages, max_new_tokens=10, temperature=0.9, seed=3)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == reference == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == len(engine.tokenizer.encode_chat(messages))


def test_greedy_is_the_default_when_temperature_is_zero_and_seed_free(client, engine):
    out = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=8, temperature=0)
    assert out.choices[0].text == expected_completion(engine, "import os\n", max_new_tokens=8)


def test_stop_strings_cut_the_text(client, engine):
    reference = expected_completion(engine, "def fibonacci(n):", max_new_tokens=16)
    stop = reference.strip()[:3]
    out = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == reference[:reference.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_a_batch_of_prompts_gets_one_choice_each_in_order(client, engine):
    prompts = ["def add(a, b):", "class Stack:", "import os\n"]
    expected = [expected_completion(engine, p, max_new_tokens=5) for p in prompts]
    by_text = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=[engine.tokenizer.encode(p) for p in prompts], max_tokens=5,
                                       temperature=0)
    for out in (by_text, by_ids):
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == expected
        assert out.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in prompts)


def test_n_completions_per_prompt_are_indexed_prompt_major_and_seeded_apart(client, engine):
    """Prompt i, completion j is choice i * n + j; with a seed, completion j samples with seed + j."""
    prompts, n = ["def add(a, b):", "for i in range(10):"], 3
    out = client.completions.create(model=MODEL, prompt=prompts, n=n, max_tokens=6, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == list(range(len(prompts) * n))
    for i, prompt in enumerate(prompts):
        for j in range(n):
            reference = expected_completion(engine, prompt, max_new_tokens=6, temperature=1.0, seed=11 + j)
            assert out.choices[i * n + j].text == reference, (i, j)
    assert len({c.text for c in out.choices[:n]}) > 1, "a prompt's completions should differ"
    assert out.usage.prompt_tokens == sum(len(engine.tokenizer.encode(p)) for p in prompts)   # once per prompt


def test_the_n_choices_of_a_request_decode_together(client, server):
    """Side by side in the engine's batch (this server's holds 2): more than one token a step, and a streamed
    choice's pieces come before the other has ended."""
    before = server.metrics()
    order = [chunk.choices[0].index for chunk in client.completions.create(
        model=MODEL, prompt="def fibonacci(n):", n=2, max_tokens=24, temperature=1.0, seed=4, stream=True)
        if chunk.choices]
    after = server.metrics()
    steps = after["moe_offload_steps_total"] - before["moe_offload_steps_total"]
    assert (after["moe_offload_step_tokens_total"] - before["moe_offload_step_tokens_total"]) / steps > 1.5
    assert order.index(1) < len(order) - 1 - order[::-1].index(0)


def test_n_chat_choices_streamed_equal_non_streamed(client):
    messages = [{"role": "user", "content": "Sort a list."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, temperature=1.0, seed=4)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, temperature=1.0,
                                                 seed=4, stream=True, stream_options={"include_usage": True}))
    streamed = {0: "", 1: ""}
    finished = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert streamed == {c.index: c.message.content for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def engine_logprobs(engine, prompt_ids: list[int], **sampling):
    """(prompt entries, new-token entries, new tokens) from the in-process engine."""
    run = engine.stream(prompt_ids, SamplingParams(**sampling))
    run.text()
    return run.prompt_logprobs, run.logprobs, run.token_ids


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, engine):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1, greedy."""
    prompts = [engine.tokenizer.encode(p) for p in ("def add(a, b):\n    return a + b", "class Stack:")]
    body = {"model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    for ids, choice in zip(prompts, out["choices"]):
        prompt_entries, new_entries, new_ids = engine_logprobs(engine, ids, max_new_tokens=1, logprobs=1, prompt_logprobs=1)
        logprobs = choice["logprobs"]
        assert choice["text"] == engine.tokenizer.decode(ids) + engine.tokenizer.decode(new_ids)
        assert logprobs["token_logprobs"] == [None] + [e.logprob for e in prompt_entries + new_entries]
        assert logprobs["top_logprobs"][0] is None
        for entry, top in zip(prompt_entries + new_entries, logprobs["top_logprobs"][1:]):
            assert top[engine.tokenizer.token_text(entry.top[0][0])] == entry.top[0][1]
            assert top[engine.tokenizer.token_text(entry.token_id)] == entry.logprob
            assert len(top) in (1, 2)     # the likeliest, and the token itself when it is another
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:k])) for k in range(len(ids) + 1)]


def test_echo_with_no_new_tokens_returns_the_prompt_and_its_logprobs(client, engine):
    prompt = "import numpy as np"
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    choice = out.choices[0]
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    prompt_entries, _, _ = engine_logprobs(engine, prompt_ids, max_new_tokens=0, prompt_logprobs=0)
    assert choice.text == prompt and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == [None] + [e.logprob for e in prompt_entries]
    assert out.usage.completion_tokens == 0
    assert client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=2).choices[0].text.startswith(prompt)


def test_a_scored_text_prompt_is_scored_as_written_and_a_generated_one_gets_bos(client, engine):
    """Echo with logprobs adds no BOS (a BOS written in the text stays); generation adds it, as vLLM does;
    vLLM's `add_special_tokens` overrides either."""
    tokenizer, text = engine.tokenizer, "import numpy as np"

    def echoed_tokens(prompt: str, **fields) -> int:
        out = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, **fields)
        return out.usage.prompt_tokens

    plain = len(tokenizer.encode(text, add_special_tokens=False))
    assert echoed_tokens(text, logprobs=0) == plain
    assert echoed_tokens(tokenizer.bos_token + text, logprobs=0) == plain + 1
    assert echoed_tokens(text, logprobs=0, extra_body={"add_special_tokens": True}) == plain + 1
    assert echoed_tokens(text) == plain + 1
    assert echoed_tokens(text, extra_body={"add_special_tokens": False}) == plain


def test_completion_logprobs_streamed_equal_non_streamed(client):
    settings_ = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0.8, seed=2, logprobs=3, echo=True)
    whole = client.completions.create(**settings_).choices[0].logprobs
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**settings_, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            for key in merged:
                merged[key] += getattr(chunk.choices[0].logprobs, key)
    assert merged == whole.model_dump()
    assert all(len(top) in (3, 4) for top in whole.top_logprobs[1:])


def test_chat_logprobs_with_top_alternatives_streamed_and_not(client, engine):
    messages = [{"role": "user", "content": "Sort a list."}]
    settings_ = dict(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=9, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**settings_).choices[0]
    _, entries, _ = engine_logprobs(engine, engine.tokenizer.encode_chat(messages), max_new_tokens=8, temperature=1.0,
                                    seed=9, logprobs=2)
    content = whole.logprobs.content
    assert [t.logprob for t in content] == [e.logprob for e in entries]
    assert [[a.logprob for a in t.top_logprobs] for t in content] == [[lp for _, lp in e.top] for e in entries]
    assert "".join(t.token for t in content) == whole.message.content
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = [t for chunk in client.chat.completions.create(**settings_, stream=True)
                for choice in chunk.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]
    plain = client.chat.completions.create(**{**settings_, "logprobs": None, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == whole.message.content


@pytest.mark.parametrize("sampling", [     # "all" in the default run
    pytest.param(dict(temperature=0.0, repetition_penalty=1.4), marks=SLOW),
    dict(temperature=0.9, seed=3, top_k=20, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5,
         frequency_penalty=0.3),
    pytest.param(dict(temperature=1.0, seed=5, top_k=-1, top_p=0.9, presence_penalty=-1.0), marks=SLOW),
], ids=["greedy-penalized", "all", "vllm-top-k-off"])
def test_sampling_fields_reach_the_engine(client, engine, sampling):
    """vLLM's extra fields (top_k, min_p, repetition_penalty) go in the SDK's extra_body."""
    openai_fields = {k: v for k, v in sampling.items() if k in ("temperature", "seed", "top_p", "presence_penalty")}
    extra = {k: v for k, v in sampling.items() if k not in openai_fields}
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, extra_body=extra, **openai_fields)
    params = {**sampling, "top_k": max(sampling.get("top_k", 0), 0)}
    assert out.choices[0].text == expected_completion(engine, PROMPTS[0], max_new_tokens=16, **params)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda model: model.__name__)
def test_parse_with_a_pydantic_response_format_returns_an_object_that_validates(client, schema):
    """The SDK sends the model's strict JSON schema; every reply token is drawn from what keeps it valid."""
    messages = [{"role": "user", "content": f"Give me a {schema.__name__} as JSON."}]
    reply = client.chat.completions.parse(model=MODEL, messages=messages, response_format=schema, max_tokens=400,
                                          temperature=0)
    message = reply.choices[0].message
    assert isinstance(message.parsed, schema), message.content
    assert schema.model_validate_json(message.content) == message.parsed
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_mode_replies_with_a_json_object_streamed_or_not(client):
    settings_ = dict(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=300,
                     temperature=1.0, seed=8, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**settings_).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**settings_, stream=True)
                       if c.choices)
    assert isinstance(json.loads(whole.message.content), dict) and whole.finish_reason == "stop"
    assert streamed == whole.message.content
    text = client.chat.completions.create(**{**settings_, "response_format": {"type": "text"}}).choices[0].message.content
    assert text != whole.message.content


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                               "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def test_a_tool_call_round_trip_through_the_openai_sdk(client):
    """tool_choice "required": the reply is a call of a declared tool with valid arguments; its result
    goes back as a tool message, and the next reply is text."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    arguments = json.loads(call.function.arguments)
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("C", "F")
    messages += [choice.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=12,
                                            temperature=0).choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert isinstance(answer.message.content, str)


def test_parallel_calls_are_each_a_valid_call_and_a_cut_reply_keeps_finish_reason_length(client):
    """This model, made to call tools, keeps calling: the calls it finished are parsed, the one cut at
    max_tokens stays in the content, and the reply says "length"."""
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                                           tool_choice="required", max_tokens=100, temperature=0).choices[0]
    assert reply.finish_reason == "length" and len(reply.message.tool_calls) >= 2
    assert all(set(json.loads(call.function.arguments)) == {"city", "unit"} for call in reply.message.tool_calls)
    assert reply.message.content.startswith("<tool_call>")


def test_a_named_tool_choice_calls_that_tool_once_without_parallel_calls(client):
    messages = [{"role": "user", "content": "Time in Tokyo?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           parallel_tool_calls=False, temperature=0.7, seed=3)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments)["zone"], str)


def test_a_streamed_tool_call_comes_whole_in_the_last_chunk(client):
    settings_ = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                     tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**settings_).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**settings_, stream=True) if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    (last,) = [c.choices[0] for c in chunks if c.choices[0].delta.tool_calls]
    (call,) = last.delta.tool_calls
    assert last.finish_reason == "tool_calls" and call.index == 0
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)


def test_with_tool_choice_auto_a_reply_without_a_call_is_text(client):
    """The shipped model was trained on Python, not on tools: left to choose, it writes text."""
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def f(x):"}],
                                           tools=[WEATHER], max_tokens=8, temperature=0).choices[0]
    assert reply.message.tool_calls is None and reply.message.content and reply.finish_reason in ("stop", "length")


class Person(BaseModel):
    name: str
    age: int


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "18 C"

    llm = ChatOpenAI(base_url=f"{server.url}/v1", model=MODEL, api_key="unused", max_tokens=200, temperature=0,
                     max_retries=0)
    calls = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke("Weather?").tool_calls
    assert [(c["name"], set(c["args"])) for c in calls] == [("get_weather", {"city"})]
    for method in ("json_schema", "function_calling"):
        assert isinstance(llm.with_structured_output(Person, method=method).invoke("A person, please"), Person)


def test_litellm_json_mode(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")     # no download of its price list
    import litellm

    reply = litellm.completion(model=f"openai/{MODEL}", api_base=f"{server.url}/v1", api_key="unused",
                               messages=[{"role": "user", "content": "JSON please"}], max_tokens=300, temperature=1.0,
                               seed=8, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    typed = litellm.completion(model=f"openai/{MODEL}", api_base=f"{server.url}/v1", api_key="unused",
                               messages=[{"role": "user", "content": "A person"}], max_tokens=200, temperature=0,
                               response_format=Person)
    assert Person.model_validate_json(typed.choices[0].message.content)


@pytest.fixture(scope="module")
def claude(server):
    """The anthropic SDK, unmodified."""
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_anthropic_messages_streamed_equal_non_streamed_and_the_engine(claude, engine):
    settings_ = dict(model=MODEL, max_tokens=12, system="You write Python.", extra_body={"temperature": 0.0},
                     messages=[{"role": "user", "content": "Sort a list."}])
    reply = claude.messages.create(**settings_)
    with claude.messages.stream(**settings_) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    expected = expected_chat(engine, [{"role": "system", "content": "You write Python."},
                                      {"role": "user", "content": "Sort a list."}], max_new_tokens=12)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == streamed == final.content[0].text == expected
    assert reply.stop_reason in ("end_turn", "max_tokens") and final.stop_reason == reply.stop_reason
    assert reply.usage.output_tokens == final.usage.output_tokens <= 12
    counted = claude.messages.count_tokens(model=MODEL, system=settings_["system"], messages=settings_["messages"])
    assert counted.input_tokens == reply.usage.input_tokens


def test_anthropic_stop_sequences_name_the_one_that_stopped(claude, engine):
    messages = [{"role": "user", "content": "def fibonacci(n):"}]
    greedy = {"temperature": 0}
    full = claude.messages.create(model=MODEL, max_tokens=24, extra_body=greedy, messages=messages).content[0].text
    stop = full.strip()[:3]
    reply = claude.messages.create(model=MODEL, max_tokens=24, extra_body=greedy, messages=messages,
                                   stop_sequences=["@@never@@", stop])
    assert reply.content[0].text == full[:full.index(stop)]
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)


WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"]}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_anthropic_tool_use_round_trip(claude, stream):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    settings_ = dict(model=MODEL, max_tokens=200, extra_body={"temperature": 0}, tools=[WEATHER_TOOL],
                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    if stream:
        with claude.messages.stream(messages=messages, **settings_) as events:
            reply = events.get_final_message()
    else:
        reply = claude.messages.create(messages=messages, **settings_)
    assert reply.stop_reason == "tool_use"
    (use,) = [block for block in reply.content if block.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "unit"} and use.id.startswith("toolu_")
    messages += [{"role": "assistant", "content": [block.model_dump() for block in reply.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}]}]
    answer = claude.messages.create(model=MODEL, max_tokens=10, tools=[WEATHER_TOOL], messages=messages,
                                    tool_choice={"type": "none"})
    assert [block.type for block in answer.content] == ["text"] and answer.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_output_format_gives_json_valid_against_the_schema(claude):
    schema = Person.model_json_schema()
    reply = claude.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "A person"}],
                                   output_config={"format": {"type": "json_schema", "schema": schema}},
                                   extra_body={"temperature": 0})
    assert Person.model_validate_json(reply.content[0].text) and reply.stop_reason == "end_turn"


def test_anthropic_errors_are_in_anthropics_shape(claude, server):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": bad.value.body["error"]["message"]}}
    assert "max_tokens" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_models_lists_the_served_model_and_health_answers(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_a_model_is_found_by_its_id_and_an_unknown_one_is_404(client, server):
    assert client.models.retrieve(MODEL).model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert_openai_error(httpx.get(f"{server.url}/v1/models/org/other-model"), 404, "model")


def optional_fields(spec: dict, request: str) -> list[str]:
    schema = spec["components"]["schemas"][request]
    return [name for name in schema["properties"] if name not in schema.get("required", ())]


def test_null_is_the_default_of_every_optional_field(server, spec):
    """The SDKs send JSON null for unset fields (`temperature=None`): the answer is the one without them."""
    for path, request, body in (("/v1/completions", "CompletionRequest", {**COMPLETION, "prompt": "def f(x):"}),
                                ("/v1/chat/completions", "ChatCompletionRequest", CHAT)):
        body = {**body, "max_tokens": 6, "seed": 5}
        nulls = {name: None for name in optional_fields(spec, request) if name not in body}
        assert {"temperature", "top_p", "n", "stream", "stop", "presence_penalty", "logprobs", "user"} <= set(nulls)
        plain = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        nulled = httpx.post(f"{server.url}{path}", json={**body, **nulls}, timeout=60)
        assert plain.status_code == nulled.status_code == 200, nulled.text
        assert plain.json()["choices"] == nulled.json()["choices"]


def test_null_sampling_fields_through_the_openai_sdk(client):
    out = client.completions.create(model=MODEL, prompt="x = ", max_tokens=3, temperature=None, top_p=None, n=None,
                                    stream=None, presence_penalty=None, frequency_penalty=None, seed=None, stop=None)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_reply_resent_as_history_is_accepted(client):
    """`message.model_dump()` carries OpenAI's null reply fields (annotations, audio, function_call, refusal, tool_calls)."""
    messages = [{"role": "user", "content": "Write a loop."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0).choices[0].message
    assert {"annotations", "audio", "function_call", "refusal", "tool_calls"} <= set(reply.model_dump())
    messages += [reply.model_dump(), {"role": "user", "content": "Again."}]
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert again.choices[0].message.role == "assistant"
    messages[1] = {**reply.model_dump(), "annotations": [], "tool_calls": []}
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).choices


def test_tokenize_and_detokenize_in_vllm_shape(server, engine):
    ids = engine.tokenizer.encode("def fibonacci(n):")
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "def fibonacci(n):", "return_token_strs": True})
    assert r.json() == {"count": len(ids), "max_model_len": 4096, "tokens": ids,
                        "token_strs": engine.tokenizer.token_texts(ids)}
    assert "".join(r.json()["token_strs"]) == engine.tokenizer.decode(ids)
    bare = httpx.post(f"{server.url}/tokenize", json={"prompt": "def fibonacci(n):", "add_special_tokens": False}).json()
    assert bare["tokens"] == ids[1:]      # without BOS
    assert httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"] == \
        "def fibonacci(n):"


def test_tokenize_messages_counts_what_chat_prefills(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
    counted = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}).json()["count"]
    used = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens
    assert counted == used


def test_tokenize_and_detokenize_in_llama_server_shape(server, engine):
    ids = engine.tokenizer.encode("import os", add_special_tokens=False)
    assert httpx.post(f"{server.url}/tokenize", json={"content": "import os"}).json() == {"tokens": ids}
    special = httpx.post(f"{server.url}/tokenize", json={"content": "import os", "add_special": True}).json()
    assert special["tokens"] == engine.tokenizer.encode("import os")
    pieces = httpx.post(f"{server.url}/tokenize", json={"content": "import os", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == "import os"
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["content"] == "import os"


def test_tokenizer_info_names_the_special_tokens_as_lm_eval_probes_it(server):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 4096)


def test_metrics_count_requests_and_generated_tokens(client, server):
    before = server.metrics()
    out = client.completions.create(model=MODEL, prompt="class A:", max_tokens=5, temperature=0)
    after = server.metrics()
    key = 'moe_offload_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["moe_offload_generated_tokens_total"] - before["moe_offload_generated_tokens_total"] == \
        out.usage.completion_tokens
    assert after["moe_offload_time_to_first_token_seconds_count"] == before["moe_offload_time_to_first_token_seconds_count"] + 1
    for name in ("moe_offload_decode_tokens_per_second", "moe_offload_queue_depth", "moe_offload_active_sequences",
                 'moe_offload_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in after


def test_metrics_export_expert_cache_counters_when_the_engine_has_them():
    text = Metrics().render(queue_depth=2, queue_capacity=8, active=1,
                            expert_stats={"hit_rate": 0.75, "prefetch_recall": 0.5, "note": "text is skipped"})
    assert "moe_offload_expert_hit_rate 0.75\n" in text
    assert "moe_offload_expert_prefetch_recall 0.5\n" in text
    assert "note" not in text
    assert "moe_offload_queue_depth 2\n" in text
    for line in text.splitlines():
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [-+0-9.eInfa]+", line), line


# --- concurrency ------------------------------------------------------------------------------

PROMPTS = ["def add(a, b):", "import numpy as np\n", "class Stack:", "for i in range(10):"]
LOAD_KINDS = [  # request k of the load test is of kind k % 8: both endpoints, streaming or not, greedy or seeded
    {"chat": False, "stream": False, "seed": None, "prompt": PROMPTS[0], "max_tokens": 2},
    {"chat": True, "stream": True, "seed": None, "prompt": PROMPTS[1], "max_tokens": 2},
    {"chat": False, "stream": True, "seed": 1, "prompt": PROMPTS[2], "max_tokens": 3},
    {"chat": True, "stream": False, "seed": 2, "prompt": PROMPTS[3], "max_tokens": 2},
    {"chat": False, "stream": True, "seed": None, "prompt": PROMPTS[0], "max_tokens": 2},   # kind 0, streamed
    {"chat": False, "stream": True, "seed": None, "prompt": PROMPTS[1], "max_tokens": 400, "cancel": True},
    {"chat": True, "stream": False, "seed": None, "prompt": PROMPTS[1], "max_tokens": 2},   # kind 1, not streamed
    {"chat": True, "stream": True, "seed": 3, "prompt": PROMPTS[2], "max_tokens": 400, "cancel": True},
]


def load_plan(client_id: int, round_: int) -> dict:
    return {"cancel": False, **LOAD_KINDS[(client_id * 4 + round_) % len(LOAD_KINDS)]}


def load_request(plan: dict) -> tuple[str, dict]:
    sampling = {"temperature": 0.0} if plan["seed"] is None else {"temperature": 1.0, "seed": plan["seed"]}
    body = {"model": MODEL, "stream": plan["stream"], "max_tokens": plan["max_tokens"], **sampling}
    if plan["chat"]:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": plan["prompt"]}]}
    return "/v1/completions", {**body, "prompt": plan["prompt"]}


def reference_for(engine, plan: dict) -> str:
    sampling = dict(max_new_tokens=plan["max_tokens"], temperature=0.0 if plan["seed"] is None else 1.0,
                    seed=plan["seed"])
    if plan["chat"]:
        return expected_chat(engine, [{"role": "user", "content": plan["prompt"]}], **sampling)
    return expected_completion(engine, plan["prompt"], **sampling)


async def send(http: httpx.AsyncClient, plan: dict) -> tuple[int, str | None]:
    """-> (status, text); text None for a request cancelled on purpose after its first piece."""
    path, body = load_request(plan)
    if not body["stream"]:
        r = await http.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"] if plan["chat"] else choice["text"]
    text = []
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return 200, "".join(text)
            choice = json.loads(line[6:])["choices"]
            piece = (choice[0]["delta"].get("content") if plan["chat"] else choice[0]["text"]) if choice else None
            if piece:
                text.append(piece)
                if plan["cancel"]:
                    return 200, None      # leaving the block closes the connection mid-stream
    return r.status_code, "stream ended without [DONE]"


async def load_test(url: str, clients: int, rounds: int) -> tuple[list, list]:
    health: list[tuple[int, float]] = []
    done = asyncio.Event()

    async def watch_health(http):
        while not done.is_set():
            start = time.perf_counter()
            status = (await http.get("/health")).status_code
            health.append((status, time.perf_counter() - start))
            await asyncio.sleep(0.25)

    async def one_client(http, client_id):
        return [(load_plan(client_id, r), await send(http, load_plan(client_id, r))) for r in range(rounds)]

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        watcher = asyncio.create_task(watch_health(http))
        results = await asyncio.gather(*(one_client(http, c) for c in range(clients)))
        done.set()
        await watcher
    return [item for per_client in results for item in per_client], health


def wait_idle(server: ServerProcess, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["moe_offload_queue_depth"] == 0 and m["moe_offload_active_sequences"] == 0:
            return m
        assert time.monotonic() < deadline, f"server still busy: {m}"
        time.sleep(0.1)


def test_load_32_clients_mixed_streaming_some_cancelled(server, engine):
    asyncio.run(load_test(server.url, clients=8, rounds=1))     # warm-up: allocations that stay
    wait_idle(server)
    rss_before = server.rss_bytes()
    before = server.metrics()

    results, health = asyncio.run(load_test(server.url, clients=32, rounds=4))
    after = wait_idle(server)
    time.sleep(0.5)
    rss_after = server.rss_bytes()

    references = {}
    cancelled = 0
    for plan, (status, text) in results:
        assert status == 200, (plan, text)
        if plan["cancel"]:
            assert text is None
            cancelled += 1
            continue
        if plan["seed"] is not None:
            continue       # sampled: batched with others, the logits differ from a lone run's in their last bits
        key = json.dumps(plan, sort_keys=True)
        if key not in references:
            references[key] = reference_for(engine, plan)
        assert text == references[key], plan
    assert cancelled == 32
    assert len(results) == 128
    assert not any(k.startswith("moe_offload_requests_total") and 'status="5' in k for k in after)
    assert health and all(status == 200 for status, _ in health)
    assert max(seconds for _, seconds in health) < 5.0, "/health must answer while the engine is busy"
    ended = sum(after[f'moe_offload_sequences_total{{outcome="{o}"}}'] - before[f'moe_offload_sequences_total{{outcome="{o}"}}']
                for o in ("finished", "cancelled"))
    assert ended == 128
    assert rss_after <= rss_before * 1.05, f"RSS grew from {rss_before / 2**20:.0f} to {rss_after / 2**20:.0f} MiB"


def test_disconnect_frees_the_queue_place_and_stops_generation(server):
    """A1 and A2 (streaming) fill the batch of two; B waits behind them. B leaves: the queue empties at once. A1 and
    A2 leave mid-stream: their generations stop long before their 2000 tokens, and a new request runs at once."""
    wait_idle(server)
    before = server.metrics()
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as a1, httpx.Client(base_url=server.url, timeout=60) as a2:
        with a1.stream("POST", "/v1/completions", json=body) as stream_1, \
                a2.stream("POST", "/v1/completions", json=body) as stream_2:
            lines = [stream.iter_lines() for stream in (stream_1, stream_2)]   # kept: closing one closes its connection
            for line_iterator in lines:
                next(line for line in line_iterator if line.startswith("data: "))
            waiting = raw_request(server.port, "/v1/completions", body)
            poll(lambda: server.metrics()["moe_offload_queue_depth"] == 1)
            waiting.close()                               # B's client goes away while it waits
            poll(lambda: server.metrics()["moe_offload_queue_depth"] == 0)
        # leaving the `with` closed A1's and A2's connections mid-stream
        poll(lambda: server.metrics()["moe_offload_active_sequences"] == 0)
    start = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and time.perf_counter() - start < 10
    after = server.metrics()
    cancelled = 'moe_offload_sequences_total{outcome="cancelled"}'
    assert after[cancelled] - before[cancelled] == 3
    assert after["moe_offload_generated_tokens_total"] - before["moe_offload_generated_tokens_total"] < 1000


def raw_request(port: int, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    """Send a request on a bare socket and return it unread: closing it is a client disconnecting."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return connection


def test_a_failing_generation_leaves_the_queued_ones_untouched(engine, monkeypatch):
    """In process (a batch of one), with a fault injected into the engine's step while one prompt runs: that
    sequence fails mid-run, the ones queued behind it finish with the right text, in arrival order."""
    poison = engine.tokenizer.encode("raise here")
    real_step = engine.batch.step

    def step_or_fail():
        tokens = real_step()
        if any(generation.prompt_ids == poison for generation in engine.batch.running):
            raise RuntimeError("injected fault")
        return tokens

    monkeypatch.setattr(engine.batch, "step", step_or_fail)
    params = SamplingParams(max_new_tokens=4)
    prompts = [poison, engine.tokenizer.encode(PROMPTS[0]), engine.tokenizer.encode(PROMPTS[2])]

    async def scenario():
        scheduler = Scheduler(engine, Metrics(), max_waiting=8)
        scheduler.start()
        loop = asyncio.get_running_loop()
        sequences = [Sequence(ids, params, loop) for ids in prompts]
        for sequence in sequences:
            scheduler.submit(sequence)
        outcomes = []
        for sequence in sequences:
            try:
                outcomes.append("".join([piece async for piece in sequence.pieces()]))
            except RuntimeError as e:
                outcomes.append(e)
        scheduler.stop()
        return outcomes, [sequence.admitted for sequence in sequences]

    outcomes, admitted = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert isinstance(outcomes[0], RuntimeError) and str(outcomes[0]) == "injected fault"
    assert outcomes[1:] == [expected_completion(engine, p, max_new_tokens=4) for p in (PROMPTS[0], PROMPTS[2])]
    assert admitted == sorted(admitted), "sequences must start in arrival order"


def test_a_request_cancelled_during_its_prefill_stops_between_chunks(engine, monkeypatch):
    """In process: a 60-chunk prompt whose client leaves after the second chunk runs no third; the
    next request's text is unaffected."""
    monkeypatch.setattr(generate_module, "PREFILL_CHUNK", 8)
    forwards = []
    real_call = Transformer.__call__

    def counting_call(model, tokens, cache, start_pos, *rest, **options):
        forwards.append((tokens.shape[1], int(start_pos)))
        if len(forwards) == 2:   # the client leaves during the second chunk
            leave()
        return real_call(model, tokens, cache, start_pos, *rest, **options)

    monkeypatch.setattr(Transformer, "__call__", counting_call)
    long_prompt = (engine.tokenizer.encode("def f(x):\n    return x\n" * 60) * 3)[:480]

    async def scenario():
        nonlocal leave
        metrics = Metrics()
        scheduler = Scheduler(engine, metrics, max_waiting=8)
        scheduler.start()
        loop = asyncio.get_running_loop()
        cancelled = Sequence(long_prompt, SamplingParams(max_new_tokens=4), loop)

        def leave():   # the client's disconnect, seen by the event loop while the worker runs the chunk
            loop.call_soon_threadsafe(scheduler.cancel, cancelled)
            assert cancelled.cancelled.wait(10)

        after = Sequence(engine.tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=4), loop)
        scheduler.submit(cancelled)
        scheduler.submit(after)
        pieces = [piece async for piece in cancelled.pieces()]
        text = "".join([piece async for piece in after.pieces()])
        scheduler.stop()
        return pieces, cancelled.finished, text, metrics.sequences

    leave = None
    pieces, finished, text, outcomes = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert pieces == [] and not finished
    after_prompt = len(engine.tokenizer.encode(PROMPTS[0]))
    assert forwards[:2] == [(8, 0), (8, 8)]                  # two of the 60 chunks, then `after`'s prefill
    assert forwards[2:] == [(min(after_prompt - k, 8), k) for k in range(0, after_prompt, 8)] + \
        [(1, after_prompt + k) for k in range(3)]
    assert outcomes["cancelled"] == 1 and outcomes["finished"] == 1
    assert text == expected_completion(engine, PROMPTS[0], max_new_tokens=4)


def poll(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --- hostile input ----------------------------------------------------------------------------

def assert_openai_error(r: httpx.Response, status: int, param: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error


COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
HOSTILE = [  # (path, body: dict or raw bytes, status, param)
    ("/v1/completions", b'{"model": "default_model", "prompt":', 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"null", 400, None),
    ("/v1/completions", b'{"model": "default_model", "prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b'{"model": "default_model", "prompt": "\\ud800"}', 400, None),
    ("/v1/completions", b'{"model": "default_model", "prompt": "x", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"model": "default_model", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}", 400, None),
    ("/v1/completions", b"[" * 100_000, 400, None),
    ("/v1/chat/completions", b"\xef\xbb\xbf{}", 400, None),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.01}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {**COMPLETION, "top_k": 2.5}, 400, "top_k"),
    ("/v1/completions", {**COMPLETION, "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {**COMPLETION, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {**COMPLETION, "stop": 3}, 400, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {**COMPLETION, "n": 0}, 400, "n"),
    ("/v1/completions", {**COMPLETION, "n": 129}, 400, "n"),
    ("/v1/completions", {**COMPLETION, "best_of": 3, "n": 2}, 400, "best_of"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0, "echo": False}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {**COMPLETION, "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {**COMPLETION, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [["a"]]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", 1]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2], [99_999_999]]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["x", "hello world " * 3000]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 99_999_999]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [5] * 4097}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "hello world " * 3000}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x " * 9000}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, 400, None),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [], "temperature": 1.5}, 400, None),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                      "tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER_TOOL]}, 400, None),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                      "tools": [{**WEATHER_TOOL, "input_schema": {"type": "frob"}}]}, 400, None),
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "system", "content": "x"}]}, 400, None),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                      "tool_choice": {"type": "any"}}, 400, None),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "sometimes", "tools": [WEATHER]}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {
        "name": "get_time"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER, WEATHER]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools.0.function.name"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "frob"}}}]}, 400, "tools.0.function.parameters"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, 400,
     "messages.0.tool_call_id"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400,
     "messages.0.tool_calls"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]}, 400, "messages.0.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x y"}}}, 400,
     "response_format.json_schema.name"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frob"}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(("}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "colour": 1}]}, 400,
     "messages.0.colour"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "annotations": []}]}, 400,
     "messages.0.annotations"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]}, 400,
     "messages.0.audio"),
    ("/v1/chat/completions", {**CHAT, "model": None}, 400, "model"),
    ("/v1/completions", {**COMPLETION, "prompt": None}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "content": "x"}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "with_pieces": True}, 400, "with_pieces"),
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"text": "x"}, 400, "text"),
    ("/detokenize", {"tokens": [1, 99_999_999]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 5000, "max_tokens": None}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 5}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 4000, "messages": [{"role": "user", "content": "x " * 400}]}, 400,
     "max_tokens"),
]


def assert_anthropic_error(r: httpx.Response, status: int):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["message"] and "\n" not in body["error"]["message"]


def test_hostile_requests_get_one_line_openai_errors_and_the_server_stays_up(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, body, status, param in HOSTILE:
            r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
            if path.startswith("/v1/messages"):
                assert_anthropic_error(r, status)
            else:
                assert_openai_error(r, status, param)
        assert_openai_error(http.post("/v1/completions", content=b"x" * (2 << 20)), 413)
        assert_openai_error(http.post("/v1/completions", content=(b"x" * 65536 for _ in range(32))), 413)  # chunked
        assert_openai_error(http.get("/v1/completions"), 405)
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        for extreme in ({"top_p": 5e-324}, {"temperature": 1e-300}, {"seed": -2**63}, {"prompt": ""}):   # valid
            assert http.post("/v1/completions", json={**COMPLETION, **extreme}).status_code == 200, extreme
        for choice in ("auto", "none"):   # Anthropic's tool_choice without tools: nothing to choose from, valid
            body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": []}],
                    "tool_choice": {"type": choice}}
            assert http.post("/v1/messages", json=body).status_code == 200, choice


def json_values(depth: int = 2):
    floats = st.floats(allow_nan=False, allow_infinity=False)     # JSON has neither
    scalars = st.none() | st.booleans() | st.integers() | floats | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                        max_leaves=depth * 4)


def from_schema(schema: dict, components: dict):
    """A hypothesis strategy for the JSON Schema subset that pydantic publishes in /openapi.json."""
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=40)
    if kind == "integer":
        low = schema.get("minimum")
        high = schema.get("maximum", schema["exclusiveMaximum"] - 1 if "exclusiveMaximum" in schema else None)
        return st.integers(min_value=low, max_value=high)
    if kind == "number":
        return st.floats(min_value=schema.get("minimum", schema.get("exclusiveMinimum")), max_value=schema.get("maximum"),
                         exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False)
    if kind == "array":
        items = from_schema(schema.get("items", {}), components) if schema.get("items") else json_values(1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3)
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties:
            values = schema.get("additionalProperties")   # a schema, or true: anything
            return st.dictionaries(st.text(max_size=8), from_schema(values, components) if isinstance(values, dict)
                                   else json_values(1), max_size=3)
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, components) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, components) for k, v in properties.items() if k not in required})
    return json_values()


@st.composite
def fuzzed_request(draw, spec: dict):
    """A body drawn from the published schema, then (mostly) broken in one place."""
    components = spec["components"]["schemas"]
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/messages"]))
    generates = path.startswith("/v1/")
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = draw(from_schema(ref, components))
    body.update(model=MODEL, **({"max_tokens": 1} if generates else {}))   # keep valid requests to one token
    body.pop("max_completion_tokens", None)
    if type(body.get("n")) is int:
        body["n"] = min(body["n"], 2)                     # and to a few choices
    mutation = draw(st.sampled_from(["none", "replace", "add", "remove"]))
    if mutation == "replace":
        key = draw(st.sampled_from(sorted(body)))
        value = draw(json_values())
        if key == "max_tokens" and (value is None or type(value) is int and value > 1):
            value = -1 if value is None else -value   # valid and long: chat's default is the rest of the context
        body[key] = value
    elif mutation == "add":
        body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in body))] = draw(json_values())
    elif mutation == "remove":
        del body[draw(st.sampled_from(sorted(body)))]
        if generates and "max_tokens" not in body:
            body["max_tokens"] = 1
    return path, body


@pytest.fixture(scope="module")
def spec(server):
    return httpx.get(f"{server.url}/openapi.json").json()


def assert_well_formed(r: httpx.Response, path: str, body: dict):
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        return
    assert r.status_code == 200
    if path == "/v1/messages":
        assert r.text.rstrip().endswith('"type": "message_stop"}') if body.get("stream") is True else \
            r.json()["type"] == "message"
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]"), r.text
    elif path == "/tokenize":
        assert isinstance(r.json()["tokens"], list)
    elif path == "/detokenize":
        assert isinstance(r.json()["prompt"], str)
    else:
        assert len(r.json()["choices"]) == expected_choices(body)


def expected_choices(body: dict) -> int:
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
    return prompts * (body.get("n") or 1)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_schema_fuzzing_gets_well_formed_answers_never_5xx(server, spec, data):
    path, body = data.draw(fuzzed_request(spec))
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    event(f"{path} {r.status_code}")     # the mix shows with --hypothesis-show-statistics
    assert_well_formed(r, path, body)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | json_values(3).map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bodies_get_4xx_never_5xx(server, body):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60)
    assert_openai_error(r, r.status_code)
    assert 400 <= r.status_code < 500


def test_server_is_up_after_the_hostile_suites(server):
    assert httpx.get(f"{server.url}/health").status_code == 200


# --- API key, queue limit, body limit ---------------------------------------------------------

def test_api_key_required_everywhere_but_health(guarded_server):
    url = guarded_server.url
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{url}/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}{path}", headers=good).status_code == 200
    assert httpx.post(f"{url}/v1/completions", json=COMPLETION).status_code == 401

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model=MODEL, prompt="x", max_tokens=1)
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert keyed.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2).choices[0].message.role == "assistant"

    count = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}   # Anthropic's SDK sends x-api-key
    refused = httpx.post(f"{url}/v1/messages/count_tokens", json=count, headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{url}/v1/messages/count_tokens", json=count, headers={"x-api-key": API_KEY}).status_code == 200


def test_offloaded_engine_serves_the_resident_text_and_exports_cache_metrics(guarded_server, engine):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{guarded_server.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.json()["choices"][0]["text"] == expected_completion(engine, PROMPTS[0], max_new_tokens=6)
    metrics = guarded_server.metrics(headers)
    assert 0 < metrics["moe_offload_expert_hit_rate"] <= 1
    assert 0 <= metrics["moe_offload_expert_prefetch_recall"] <= 1


def test_full_queue_answers_429_with_retry_after(guarded_server):
    url, headers = guarded_server.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as a:
        with a.stream("POST", "/v1/completions", json=body) as active:
            lines = active.iter_lines()        # kept: a closed line iterator would close the connection
            next(line for line in lines if line.startswith("data: "))
            waiting = raw_request(guarded_server.port, "/v1/completions", body, headers)
            poll(lambda: guarded_server.metrics(headers)["moe_offload_queue_depth"] == 1)
            r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers)
            assert_openai_error(r, 429)
            assert r.headers["Retry-After"] == "1"
            waiting.close()
    poll(lambda: guarded_server.metrics(headers)["moe_offload_active_sequences"] == 0)


def test_a_request_of_several_choices_takes_one_place_in_the_queue(guarded_server):
    """A (n=2) on a batch of one: its second choice waits in the one-place queue as A's place, so B is refused, and
    A's choices both run to their end."""
    url, headers = guarded_server.url, {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "def main():", "max_tokens": 60, "temperature": 0, "stream": True, "n": 2}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as a:
        with a.stream("POST", "/v1/completions", json=body) as active:
            lines = active.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert guarded_server.metrics(headers)["moe_offload_queue_depth"] == 1
            assert_openai_error(httpx.post(f"{url}/v1/completions", json={**body, "n": 1, "stream": False},
                                           headers=headers), 429)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    ended = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert ended == [0, 1], events[-1]


def test_body_limit_is_the_flag(guarded_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{guarded_server.url}/v1/completions", json={**COMPLETION, "prompt": "x" * 5000}, headers=headers)
    assert_openai_error(r, 413)


def _rest_until_closed(connection: socket.socket) -> bytes:
    """What the server still sends before it closes the connection (at most 2 s of waiting)."""
    connection.settimeout(2)
    rest = b""
    try:
        while chunk := connection.recv(4096):
            rest += chunk
    except OSError:
        pass
    return rest


def test_a_body_sent_too_slowly_gets_408_and_the_connection_closes(guarded_server):
    """A client trickling its body (one byte every 0.2 s of 200) is cut off at --body-timeout (2 s)."""
    body = json.dumps({**COMPLETION, "prompt": "x" * 150}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as connection:
        connection.sendall(head)
        connection.settimeout(0.2)
        answer = b""
        for byte in body:
            try:
                connection.sendall(bytes([byte]))
                answer += connection.recv(4096)
            except socket.timeout:
                continue
            except OSError:    # the server closed the connection after answering
                break
            if b"\r\n\r\n" in answer:
                break
        answer += _rest_until_closed(connection)    # the body may come in a later segment than the head
    elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 2 <= elapsed < 10
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "--body-timeout" in error["message"]
    assert httpx.get(f"{guarded_server.url}/health").status_code == 200


def test_serve_rejects_bad_flags_with_one_line(capsys):
    assert main(["serve", "--port", "70000"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: --port 70000 is not a TCP port; use 0-65535"]
    assert main(["serve", "--api-key", ""]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --api-key is empty; give a key, or leave the flag out to serve without one"]


def test_serve_refuses_a_port_in_use_or_a_foreign_host_before_loading_the_model(capsys, monkeypatch):
    monkeypatch.setattr("moe_offload.cli.load_engine", lambda args: pytest.fail("the model loaded before the check"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --port {port}: 127.0.0.1 port {port} is in use; stop what listens there or choose another --port"]
    assert main(["serve", "--host", "192.0.2.1"]) == 1     # TEST-NET-1: never an address of this machine
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --host 192.0.2.1: cannot listen there (Cannot assign requested address); use an address of this "
        "machine, e.g. 127.0.0.1, or 0.0.0.0 for all of them"]


@pytest.fixture(scope="module")
def batch_server():
    """Sixteen sequences decode together."""
    with running_server("--max-batch", "16") as s:
        yield s


def test_sixteen_streaming_clients_decode_together_each_as_it_would_alone(batch_server, engine):
    """16 official-client streams at once, greedy: each reply is the reply its request gets alone. Beside them one
    client leaves during its long prompt's prefill and one mid-decode, without disturbing the others; no 5xx;
    the batch really holds many sequences at once; memory returns to where it was."""
    client = openai.OpenAI(base_url=f"{batch_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"{PROMPTS[i % 4]}{' ' * (i // 4)}" for i in range(16)]
    long_prompt = open(EVAL_TEXT).read()[:6000]      # ~1800 tokens: four prefill chunks
    client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=4, temperature=0)    # warm-up
    wait_idle(batch_server)
    rss_before, before = batch_server.rss_bytes(), batch_server.metrics()

    def stream(prompt: str, leave_after: int | None = None) -> str:
        pieces = []
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        for chunk in response:
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
                if leave_after is not None and len(pieces) >= leave_after:
                    response.close()
                    break
        return "".join(pieces)

    def leave_during_prefill() -> None:
        with httpx.Client(base_url=batch_server.url, timeout=60) as http:
            body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 8, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body):
                poll(lambda: batch_server.metrics()["moe_offload_active_sequences"] >= 2)
            # leaving the `with` closed the connection before any token came

    with concurrent.futures.ThreadPoolExecutor(max_workers=18) as pool:
        replies = [pool.submit(stream, prompt) for prompt in prompts]
        left_mid_decode = pool.submit(stream, PROMPTS[1], 3)
        left_in_prefill = pool.submit(leave_during_prefill)
        texts = [reply.result() for reply in replies]
        left_mid_decode.result(), left_in_prefill.result()
    after = wait_idle(batch_server)
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == expected_completion(engine, prompt, max_new_tokens=24, temperature=0.0), prompt
    assert not any(k.startswith("moe_offload_requests_total") and 'status="5' in k for k in after)
    cancelled = 'moe_offload_sequences_total{outcome="cancelled"}'
    assert after[cancelled] - before[cancelled] == 2
    steps = after["moe_offload_steps_total"] - before["moe_offload_steps_total"]
    assert (after["moe_offload_step_tokens_total"] - before["moe_offload_step_tokens_total"]) / steps > 4
    time.sleep(0.5)
    assert batch_server.rss_bytes() <= rss_before * 1.05
