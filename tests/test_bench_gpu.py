"""`moe-offload bench` on CUDA at toy size: the synthetic model in the target format, every mode and
routing, the accelerate baseline with real CPU offloading, the budget enforced (run with -m gpu)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_offload.cli import main

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["4/2", "bf16"])
def test_bench_on_cuda_measures_every_entry_within_budget(tmp_path, capsys, quant):
    argv = ["bench", "--synthetic", "tiny", "--quant", quant, "--budget", "396MiB", "--device", "cuda",
            "--prompt-tokens", "16", "--new-tokens", "16", "--warmup-tokens", "4", "--repeats", "2",
            "--prefill-tokens", "600", "--prefill-repeats", "1", "--accelerate", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["link_peak_gbps"] > 5 and report["card_memory_gib"] > 1
    entries = [e for e in report["results"] if e.get("mode") in ("full", "no-prefetch", "no-cache")]
    assert len(entries) == 6
    for e in entries:
        assert e["status"] == "ok", (e.get("mode"), e.get("routing"), e.get("error"))
        assert e["within_budget"] and 0 < e["peak_gpu_gib"] <= 396 / 1024
        assert e["decode_tokens_per_s"] > 0 and e["prefill_tokens_per_s"] > 0
        assert e["h2d_gbps"] > 0 or e["hit_rate"] == 1.0
    accelerate = next(e for e in report["results"] if e.get("mode") == "accelerate")
    assert accelerate["status"] == "ok" and accelerate["offloaded_layer_ms"] > 0 and accelerate["offloaded_layer_gb"] > 0
