"""CPU: one expert's SwiGLU (quant/cpu_kernels.py) on Mixtral-8x7B's expert shape, against the host's read bandwidth.

    python benchmarks/cpu_experts.py                        # every core; 2, 3, 4 bits and bf16; 1, 2, 4, 8 rows
    python benchmarks/cpu_experts.py --threads 16 --formats 2 bf16 --rows 1

In one run, on the same threads:
1. the host's memory read bandwidth: torch's sum over a fp32 tensor of --bandwidth-gib GiB with
   torch.set_num_threads(threads), the best of a few, measured again before each format;
2. random experts built directly in the packed format (HQQ at the paper's group sizes with 8-bit scales and
   zeros: random code bytes, meta of plausible steps and minimums; bf16: random normal weights), --copies of
   each so that no call finds the last one's bytes in the cache;
3. cpu_swiglu with 1, 2, 4 and 8 rows of bf16 x: the median and the best time of --repeats calls after a
   warm-up, the packed bytes read per second (the expert's buffer size over the median time; over the best
   time too) and that as a fraction of the format's (1).
On a machine shared with other work the best time says what the kernel can do, the median what it did.
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import torch

from moe_offload.config import QuantSpec
from moe_offload.experts import DenseExpertFormat
from moe_offload.quant import cpu_kernels
from moe_offload.quant.weight import HQQExpertFormat

TARGET = 0.60   # of the measured host read bandwidth


def host_read_bandwidth(gib: float, repeats: int = 5) -> float:
    """GB/s of torch's sum over a fp32 tensor of `gib` GiB (on torch's threads), the best of `repeats`: the
    most the host gave, so that a kernel's fraction of it is not flattered by a slow moment."""
    tensor = torch.ones(int(gib * 2 ** 30) // 4)
    tensor.sum()
    return tensor.numel() * 4 / 1e9 / min(seconds(tensor.sum) for _ in range(repeats))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def random_hqq_expert(fmt: HQQExpertFormat, generator: torch.Generator) -> torch.Tensor:
    """A buffer of random code bytes (every byte is valid codes) whose meta holds plausible (step, min)s:
    scales about 0.01-0.02, zeros across the code range."""
    buffer = torch.randint(0, 256, (fmt.nbytes,), dtype=torch.uint8, generator=generator)
    top = 2 ** fmt.spec.bits - 1
    for slots in fmt.format.slots:
        meta = slots[3].view(buffer)                       # (runs, [scale, zero], [step, min])
        meta[:, 0] = torch.tensor([0.01 / 255, 0.01])
        meta[:, 1] = torch.tensor([top / 255, 0.0])
    return buffer


def random_dense_expert(fmt: DenseExpertFormat, generator: torch.Generator) -> torch.Tensor:
    buffer = torch.zeros(fmt.nbytes, dtype=torch.uint8)
    for slot in fmt.slots:
        slot.view(buffer).copy_(torch.randn(slot.shape, generator=generator) * 0.02)
    return buffer


def time_calls(fmt, buffers: list[torch.Tensor], x: torch.Tensor, threads: int, repeats: int) -> list[float]:
    """Seconds of `repeats` calls, sorted, the experts taken in turn, after one warm-up call on each."""
    experts = itertools.cycle(buffers)

    def call():
        cpu_kernels.cpu_swiglu(fmt, next(experts), x, threads)

    for _ in buffers:
        call()
    return sorted(seconds(call) for _ in range(repeats))


def expert_format(name: str, hidden: int, ffn: int):
    if name == "bf16":
        return DenseExpertFormat(hidden, ffn, torch.bfloat16)
    return HQQExpertFormat(hidden, ffn, QuantSpec(int(name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=cpu_kernels.default_threads())
    parser.add_argument("--formats", nargs="+", default=["2", "3", "4", "bf16"], help="expert bits, or bf16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--copies", type=int, default=2, help="experts of each format, called in turn")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bandwidth-gib", type=float, default=2.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    backend = cpu_kernels.backend()
    print(f"backend {backend}; {args.threads} threads; host read bandwidth: torch sum over {args.bandwidth_gib:g} GiB")
    print(f"{'format':>6} {'MB':>7} {'host GB/s':>9} {'rows':>4} {'ms':>8} {'GB/s':>7} {'of host':>7} "
          f"{'best ms':>8} {'GB/s':>7} {'of host':>7}")

    generator = torch.Generator().manual_seed(0)
    results = []
    for name in args.formats:
        bandwidth = host_read_bandwidth(args.bandwidth_gib)
        fmt = expert_format(name, args.hidden, args.ffn)
        make = random_dense_expert if name == "bf16" else random_hqq_expert
        buffers = [make(fmt, generator) for _ in range(args.copies)]
        for rows in args.rows:
            x = torch.randn(rows, args.hidden, generator=generator).to(torch.bfloat16)
            times = time_calls(fmt, buffers, x, args.threads, args.repeats)
            median, best = statistics.median(times), times[0]
            gbps, best_gbps = fmt.nbytes / 1e9 / median, fmt.nbytes / 1e9 / best
            results.append({"format": name, "rows": rows, "bytes": fmt.nbytes, "host_read_gbps": round(bandwidth, 2),
                            "ms": round(median * 1e3, 3), "gbps": round(gbps, 2), "of_host": round(gbps / bandwidth, 3),
                            "best_ms": round(best * 1e3, 3), "best_gbps": round(best_gbps, 2),
                            "best_of_host": round(best_gbps / bandwidth, 3)})
            print(f"{name:>6} {fmt.nbytes / 1e6:7.1f} {bandwidth:9.1f} {rows:4d} {median * 1e3:8.2f} {gbps:7.1f} "
                  f"{gbps / bandwidth:7.0%} {best * 1e3:8.2f} {best_gbps:7.1f} {best_gbps / bandwidth:7.0%}")
        del buffers

    print(json.dumps({"benchmark": "cpu_experts", "backend": backend, "threads": args.threads, "cpu": cpu_name(),
                      "cores": cpu_kernels.default_threads(), "hidden": args.hidden, "ffn": args.ffn,
                      "target_of_host": TARGET, "results": results}))


if __name__ == "__main__":
    main()
