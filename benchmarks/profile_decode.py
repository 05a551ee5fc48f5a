"""Where decode time goes for the resident model: per-token time and a torch.profiler table.

    python benchmarks/profile_decode.py [--model DIR] [--device cuda] [--tokens 128] [--out DIR]

Prints the profiler's top operators, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moe_offload.config import RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.model import KVCache


def decode_times(engine: Engine, tokens: int) -> list[float]:
    device = engine.cache.keys[0].device
    cache = KVCache.allocate(engine.config, 1, tokens + 16, device, engine.cache.keys[0].dtype)
    engine.model(torch.tensor([[1, 2, 3]], device=device), cache, 0)
    times, token = [], torch.tensor([[5]], device=device)
    for pos in range(3, tokens + 3):
        start = time.perf_counter()
        logits = engine.model(token, cache, pos)
        token = logits[:, -1].argmax(-1, keepdim=True)
        int(token)  # the per-token sync a real decode loop has
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(RuntimeConfig().model))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    engine = Engine.load(RuntimeConfig(model=args.model, device=args.device), progress=False)
    decode_times(engine, 16)  # warm-up
    times = decode_times(engine, args.tokens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                                if torch.cuda.is_available() else [torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_times(engine, 16)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_decode.txt").write_text(table)
    median = statistics.median(times)
    print(json.dumps({"model": Path(args.model).name, "device": str(engine.cache.keys[0].device),
                      "layers": engine.config.num_layers, "median_token_ms": round(median * 1e3, 3),
                      "tokens_per_s": round(1 / median, 1)}))


if __name__ == "__main__":
    main()
