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
