"""Perplexity over non-overlapping windows (perplexity.py) against transformers on the same windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_offload.cli import main
from moe_offload.config import RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.errors import UserError
from moe_offload.perplexity import perplexity, windows_of

from conftest import EVAL_TEXT, SHIPPED_MODEL

TEXT = EVAL_TEXT
WINDOWS, WINDOW = 3, 512


def transformers_perplexity(folder, windows: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids])).logits[0]
            nll += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def test_shipped_model_perplexity_matches_transformers_on_the_same_windows():
    engine = Engine.load(RuntimeConfig(model=SHIPPED_MODEL, device="cpu", dtype="float32"), progress=False)
    token_ids = engine.tokenizer.encode(TEXT.read_text()[:20000])
    ours = perplexity(engine, token_ids, WINDOW, max_windows=WINDOWS)
    assert ours.windows == WINDOWS and ours.predicted == WINDOWS * (WINDOW - 1)
    reference = transformers_perplexity(SHIPPED_MODEL, windows_of(token_ids, WINDOW, WINDOWS))
    assert abs(ours.perplexity / reference - 1) < 0.005, (ours.perplexity, reference)


def test_windows_do_not_overlap_and_the_tail_is_dropped():
    chunks = windows_of(list(range(10)), 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UserError, match="fewer than one window"):
        windows_of(list(range(3)), 4)
    with pytest.raises(UserError, match=r"--max-windows must be 0 \(all windows\) or more, got -1"):
        windows_of(list(range(10)), 4, max_windows=-1)


def test_cli_prints_the_perplexity_and_rejects_bad_windows(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(TEXT.read_text()[:3000])
    assert main(["perplexity", "--text", str(text), "--window", "64", "--max-windows", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "over 2 windows of 64 tokens" in out
    assert main(["perplexity", "--text", str(text), "--window", "4096", "--device", "cpu", "--max-context", "512"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --window 4096 exceeds")
    assert main(["perplexity", "--text", str(tmp_path / "missing.txt"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip().endswith("missing.txt: no such file; pass a UTF-8 text file to measure on")
