"""The command line as a person uses it: a real process, stdin and stdout."""

from __future__ import annotations

import subprocess
import sys


def moe_offload(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_offload.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_generate_streams_text_then_prints_one_stats_line():
    done = moe_offload("generate", "--device", "cpu", "--prompt", "def add(a, b):", "--max-tokens", "8")
    assert done.returncode == 0
    assert done.stdout.strip()
    stats = done.stderr.strip().splitlines()[-1]
    assert stats.startswith("prompt tokens: ") and "new tokens: 8" in stats and "tokens/s" in stats


def test_chat_keeps_history_and_exits_cleanly_on_end_of_input():
    done = moe_offload("chat", "--device", "cpu", "--max-tokens", "6", stdin="hello\nand again\n")
    assert done.returncode == 0
    assert done.stdout.count("> ") == 3  # two turns answered, then the prompt that met end of input
    assert "Traceback" not in done.stderr


def test_generate_takes_the_sampling_flags_and_prints_what_the_engine_makes():
    from moe_offload.config import RuntimeConfig, SamplingParams
    from moe_offload.engine import Engine

    flags = ["--temperature", "0.9", "--seed", "4", "--top-k", "30", "--min-p", "0.05", "--repetition-penalty", "1.3",
             "--presence-penalty", "0.4", "--frequency-penalty", "0.2"]
    done = moe_offload("generate", "--device", "cpu", "--prompt", "def add(a, b):", "--max-tokens", "12", *flags)
    engine = Engine.load(RuntimeConfig(device="cpu"), progress=False)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, top_k=30, min_p=0.05, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.2)
    assert done.returncode == 0
    assert done.stdout == engine.stream(engine.tokenizer.encode("def add(a, b):"), params).text() + "\n"


def test_a_bad_sampling_flag_is_one_line_naming_the_flag():
    done = moe_offload("generate", "--device", "cpu", "--prompt", "x", "--min-p", "2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["error: --min-p must be in [0, 1], got 2.0"]
