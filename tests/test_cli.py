"""The command line as a person uses it: a real process, stdin and stdout; flags that are refused
before the model loads are checked in this process, through `main`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_offload.cli import fit_conversation, main
from moe_offload.tokenizer import Tokenizer

from conftest import SHIPPED_MODEL


def moe_offload(*args, stdin: str = "") -> subprocess.CompletedProcess:
    """`surrogateescape`: a lone surrogate U+DC80-U+DCFF in `args` or `stdin` reaches the process as the
    byte it stands for (0x80-0xFF), as a terminal's bytes that are not UTF-8 reach a program."""
    return subprocess.run([sys.executable, "-m", "moe_offload.cli", *args], input=stdin, capture_output=True,
                          encoding="utf-8", errors="surrogateescape", timeout=300)


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


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


def test_generate_takes_the_prompt_from_a_file_or_standard_input_less_one_final_newline(tmp_path):
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text("def f(x):\n")
    flags = ("generate", "--device", "cpu", "--max-tokens", "8")
    from_flag = moe_offload(*flags, "--prompt", "def f(x):")
    from_stdin = moe_offload(*flags, "--prompt-file", "-", stdin="def f(x):\n")
    from_file = moe_offload(*flags, "--prompt-file", str(prompt_file))
    assert from_flag.returncode == from_stdin.returncode == from_file.returncode == 0
    assert from_flag.stdout.strip() and from_stdin.stdout == from_flag.stdout == from_file.stdout


def test_prompt_file_that_is_missing_or_not_utf8_is_one_error_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("def café():".encode("latin-1"))
    assert one_error_line(capsys, ["generate", "--prompt-file", str(tmp_path / "missing.txt")]) == (
        f"error: --prompt-file {tmp_path / 'missing.txt'}: cannot read it (No such file or directory)")
    assert one_error_line(capsys, ["generate", "--prompt-file", str(tmp_path / "latin1.txt")]) == (
        f"error: --prompt-file {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 7)")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_temperature_that_is_not_a_finite_number_at_least_0_is_one_error_line(capsys, value):
    assert one_error_line(capsys, ["generate", "--prompt", "x", "--temperature", value]) == (
        f"error: --temperature must be a finite number >= 0, got {float(value)}")


def test_prompt_and_prompt_file_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--prompt-file", "-"])
    assert "not allowed with argument --prompt" in capsys.readouterr().err


def test_prompt_that_is_not_utf8_is_one_error_line():
    done = moe_offload("generate", "--device", "cpu", "--prompt", "def f\udce9(x):")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --prompt is not valid UTF-8 (byte 0xe9 at character 5); use UTF-8 text"


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on():
    done = moe_offload("chat", "--device", "cpu", "--max-tokens", "6", stdin="caf\udce9\nhello\n")
    assert done.returncode == 0
    assert "error: that line is not valid UTF-8 (byte 0xe9 at character 3)" in done.stderr
    assert done.stdout.count("> ") == 3  # the bad line refused, the next one answered, then end of input
    assert "Traceback" not in done.stderr


def test_generate_into_a_closed_pipe_stops_quietly():
    """`moe-offload generate ... | head -1`: the reader leaves; no traceback, the status SIGPIPE gives."""
    process = subprocess.Popen([sys.executable, "-m", "moe_offload.cli", "generate", "--device", "cpu", "--prompt",
                                "def f(x):", "--max-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()      # before the first token, so that every write meets the closed pipe
    err = process.stderr.read().decode()
    assert process.wait(300) == 141
    assert "Traceback" not in err and "Exception ignored" not in err and "Error" not in err


def test_chat_drops_its_oldest_turns_once_the_context_is_full_and_says_so():
    lines = ["write a function that adds two numbers", "now one that multiplies them", "and one that divides them",
             "and one that subtracts them", "and a class for all of it"]
    done = moe_offload("chat", "--device", "cpu", "--max-context", "96", "--max-tokens", "24", "--system", "Be brief.",
                       stdin="".join(line + "\n" for line in lines))
    assert done.returncode == 0
    assert done.stdout.count("> ") == len(lines) + 1      # every line answered
    assert "error:" not in done.stderr
    assert ("(dropped the 2 oldest messages: the conversation and --max-tokens 24 must fit the context of 96 tokens)"
            in done.stderr.splitlines())


def test_fit_conversation_keeps_the_system_message_and_the_newest_turn_and_drops_whole_exchanges():
    tokenizer = Tokenizer.from_folder(SHIPPED_MODEL)
    system = {"role": "system", "content": "Be brief."}
    exchanges = [[{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
                 for i in range(4)]
    newest = {"role": "user", "content": "last question"}
    messages = [system, *(m for exchange in exchanges for m in exchange), newest]
    assert fit_conversation(tokenizer, messages, limit=10_000) == (messages, 0)
    limit = len(tokenizer.encode_chat([system, *exchanges[3], newest]))
    assert fit_conversation(tokenizer, messages, limit) == ([system, *exchanges[3], newest], 6)
    assert fit_conversation(tokenizer, messages, limit=1) == ([system, newest], 8)
    assert fit_conversation(tokenizer, messages[1:], limit=1) == ([newest], 8)


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
