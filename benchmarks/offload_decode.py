"""Offloaded decode of a Mixtral-8x7B-shaped synthetic model in bf16 under a GPU memory budget (CUDA only).

    python benchmarks/offload_decode.py --budget 24GiB --out $OUT/offload_decode.json

One process: measures the pinned host-to-device peak with the store's own buffers (and the rate of
back-to-back 9.4 MB copies, a Qwen3-30B-A3B expert's size, to see the per-copy overhead), plans the
budget (offload/planner.py), fills the host store with full-size random experts generated on the
GPU (bench/synthetic.py), then for prefetch on and off decodes --tokens greedy tokens after a
short prompt and --warmup tokens, and reports decode tokens/s, hit rate, bytes moved, achieved
host-to-device GB/s (bytes loaded over decode wall time), link busy (that over the measured peak),
the transfer-bound ceiling BW / ((1 - h) * 64 * bytes_per_expert) at the measured hit rate h
(BW = the measured peak) and the fraction of it reached, copy-wait time, and
torch.cuda.max_memory_allocated() against the budget (also enforced with
set_per_process_memory_fraction). Routing: the random weights' own (almost uniform; DESIGN.md §5).
The last line printed is the JSON report.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_offload.bench.synthetic import SyntheticCheckpoint
from moe_offload.config import OffloadConfig
from moe_offload.generate import prefill
from moe_offload.model import KVCache, Transformer
from moe_offload.offload.planner import parse_size, plan_for
from moe_offload.offload.prefetch import GatePredictor
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.offload.store import ExpertStore

DTYPE = torch.bfloat16


def pinned_peak_gbps(store: ExpertStore, device, repeats: int = 10) -> float:
    """Host-to-device GB/s of one expert-sized copy from the store's pinned RAM, best of `repeats`."""
    target = torch.empty(store.nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = 0.0
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            target.copy_(store.buffer(0, i % store.num_experts), non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = max(best, store.nbytes / (start.elapsed_time(end) / 1000) / 1e9)
    del target
    return best


def small_copies_gbps(store: ExpertStore, device, size: int = 9_437_184, count: int = 64) -> float:
    """GB/s of `count` back-to-back copies of `size` bytes (a bf16 Qwen3-30B-A3B expert) from pinned RAM,
    each followed by an event record as the provider does: shows the per-copy overhead for small experts."""
    per_expert = store.nbytes // size
    target = torch.empty((count, size), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    events = [torch.cuda.Event() for _ in range(count)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 0.0
    for _ in range(3):
        with torch.cuda.stream(stream):
            start.record(stream)
            for i in range(count):
                expert, part = divmod(i, per_expert)
                target[i].copy_(store.buffer(0, expert % store.num_experts)[part * size:(part + 1) * size], non_blocking=True)
                events[i].record(stream)
            end.record(stream)
        end.synchronize()
        best = max(best, count * size / (start.elapsed_time(end) / 1000) / 1e9)
    del target
    return best


def decode(config, weights, store, fmt, plan, device, prefetch: int, args) -> dict:
    predictor = GatePredictor(config, weights.layers, depth=1, top_n=prefetch) if prefetch else None
    provider = OffloadedExperts(store, fmt, plan.slots, device, predictor, measure_time=True)
    model = Transformer(config, weights, provider)
    cache = KVCache.allocate(config, 1, plan.max_context, device, DTYPE)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=generator).tolist()
    torch.cuda.synchronize()
    started = time.perf_counter()
    logits = prefill(model, cache, prompt, device)
    torch.cuda.synchronize()
    prefill_seconds = time.perf_counter() - started
    position, times = len(prompt), []
    for step in range(args.warmup + args.tokens):
        if step == args.warmup:
            provider.summary()        # settle pending timings, then count from here
            provider.stats.reset()
            torch.cuda.reset_peak_memory_stats(device)
        token = int(logits[-1].argmax())
        started = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), cache, start_pos=position)[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        position += 1
    measured = times[args.warmup:]
    seconds = sum(measured)
    stats = provider.summary()
    result = {
        "mode": f"LRU + prefetch top-{prefetch}, lookahead 1" if prefetch else "LRU, no prefetch",
        "prefill_tokens": len(prompt), "prefill_seconds": prefill_seconds,
        "decode_tokens": args.tokens, "decode_tokens_per_s": args.tokens / seconds,
        "median_token_seconds": statistics.median(measured),
        "max_memory_allocated": torch.cuda.max_memory_allocated(device), **stats,
        "achieved_h2d_gbps": stats["bytes_loaded"] / seconds / 1e9,
    }
    del model, provider, cache
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="24GiB", help="GPU memory budget (default: %(default)s)")
    parser.add_argument("--cpu-memory", default=None, help="host RAM for experts (default: all in pinned RAM)")
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24, help="decode tokens measured per mode")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[2, 0], help="predicted experts per mode; 0: no prefetch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offload_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: offload_decode.py needs CUDA")
    device = torch.device("cuda")
    budget = parse_size(args.budget, "--budget")
    cpu_memory = parse_size(args.cpu_memory, "--cpu-memory") if args.cpu_memory else None
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(device).total_memory))

    ckpt = SyntheticCheckpoint.create("mixtral-8x7b", None, device=device)
    config = ckpt.config
    fmt, expert_buffer = ckpt.expert_storage(DTYPE)
    plan = plan_for(config, fmt.nbytes, DTYPE, args.max_context,
                    OffloadConfig(enabled=True, gpu_memory=budget, cpu_memory=cpu_memory), device)
    print(plan.describe(), flush=True)
    started = time.perf_counter()
    weights = ckpt.dense_weights(device, DTYPE)
    store = ExpertStore(config.moe_layers, config.num_experts, fmt.nbytes, plan.ram_experts, pin=True)
    pin_seconds = time.perf_counter() - started
    for layer in config.moe_layers:
        for expert in range(config.num_experts):
            store.write(layer, expert, expert_buffer(layer, expert))
    torch.cuda.synchronize()
    build_seconds = time.perf_counter() - started
    peak = pinned_peak_gbps(store, device)
    small = small_copies_gbps(store, device)
    print(f"built in {build_seconds:.1f} s (pinning {pin_seconds:.1f} s); pinned H2D peak {peak:.1f} GB/s "
          f"({fmt.nbytes / 1e6:.1f} MB copies); {small:.1f} GB/s in back-to-back 9.4 MB copies", flush=True)

    results = []
    uses_per_token = len(config.moe_layers) * config.top_k
    for prefetch in args.prefetch:
        r = decode(config, weights, store, fmt, plan, device, prefetch, args)
        r["link_busy"] = r["achieved_h2d_gbps"] / peak
        r["ceiling_tokens_per_s"] = peak * 1e9 / ((1 - r["hit_rate"]) * uses_per_token * fmt.nbytes)
        r["fraction_of_ceiling"] = r["decode_tokens_per_s"] / r["ceiling_tokens_per_s"]
        r["within_budget"] = r["max_memory_allocated"] <= budget
        results.append(r)
        print(f"{r['mode']}: {r['decode_tokens_per_s']:.2f} tokens/s, hit rate {r['hit_rate']:.3f}, "
              f"{r['achieved_h2d_gbps']:.1f} GB/s achieved, link busy {r['link_busy']:.2f}, "
              f"{r['fraction_of_ceiling']:.2f} of the ceiling {r['ceiling_tokens_per_s']:.2f} tokens/s, "
              f"waiting {r['wait_seconds']:.2f} s, peak memory {r['max_memory_allocated'] / 2**30:.2f} GiB "
              f"of {budget / 2**30:.2f}", flush=True)

    report = {
        "benchmark": "offload_decode", "model": "synthetic mixtral-8x7b shapes, bf16, random weights (own routing)",
        "card": torch.cuda.get_device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(sys.argv), "torch": torch.__version__,
        "budget_bytes": budget, "plan": plan.describe(), "slots": plan.slots, "expert_nbytes": fmt.nbytes,
        "pinned_peak_gbps": peak, "small_copies_gbps_9_4MB": small, "build_seconds": build_seconds, "pin_seconds": pin_seconds, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
