"""Experts computed on the CPU, where they lie in the host store, instead of copied to the device.

    calibration = calibrate(store.buffer(0, 0), fmt, device, hidden, dtype)   # at start: link and CPU GB/s
    cpu = CpuExperts(store, fmt, device, CostModel(calibration, fmt.nbytes))     # None: only static CPU layers
    provider = OffloadedExperts(store, fmt, {0: 0, 1: 2}, device, cpu=cpu)      # 0 slots: layer 0 runs on the CPU

At batch 1 a missed expert is read once: a copy reads it at the link's speed (PCIe Gen4 ~25 GB/s, Gen5 ~55), the
CPU at host memory's (dual-channel DDR5 60-90 GB/s, a server's far more) and ships only the activations. Two
ways to use that:
- static (`--cpu-moe-layers N`, llama.cpp's --n-cpu-moe): the experts of the first N MoE layers never go to the
  device; the planner gives those layers no slots and the CPU computes every pair of theirs, prefill included;
- dynamic (`--cpu-experts auto`): in a decode step (at most cpu_kernels.MAX_ROWS tokens) each miss goes to the
  link or to the CPU, whichever finishes it sooner given what is queued on each (`CostModel.split`: greedy list
  scheduling on calibrated speeds), so that both finish the layer's misses at about the same time; hits stay on
  the device, and so do prefill's misses (streamed through the slots).

The CPU's work fits the provider's one host read per layer: the experts' input x comes back in that same read,
a worker thread computes the CPU's pairs (the C kernels let go of the GIL) while the main thread queues the
copies, and their products go to the device into a rows buffer and a mask of the step's pairs: the model takes
those rows in place of the slots' products (experts.Computed) and sums every pair in its fixed order, as always.
Shapes do not change from step to step, so a captured decode step (step.py) replays with them; the slot table
points the CPU's pairs at a slot the step reads anyway (their products there are dropped). The CPU's products are
fp32 sums over the exact weights (quant/cpu_kernels.py): they differ from the device's in the last bits, not more.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..experts import Computed, DenseExpertFormat, ExpertFormat
from ..quant import cpu_kernels
from ..quant.weight import HQQExpertFormat
from .cache import OffloadStats
from .store import ExpertStore

CHOICES = ("auto", "off")                       # --cpu-experts
ROW_COUNTS = (1, 2, 4, cpu_kernels.MAX_ROWS)   # rows of x the CPU kernel is timed at
TIMED_RUNS = 3                                  # the median of these, after one warm-up


@dataclass(frozen=True)
class Calibration:
    """Measured speeds: host-to-device copies of one expert, and the CPU kernel over one expert at each row count."""

    link_gbps: float
    cpu_gbps: tuple[tuple[int, float], ...]     # (rows, GB/s of the expert's bytes), rows ascending

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def cpu_seconds(self, nbytes: int, rows: int) -> float:
        """One expert over `rows` rows: a pass over its bytes per MAX_ROWS rows, each at the speed measured for the
        smallest timed row count that covers it."""
        passes, last = divmod(rows, cpu_kernels.MAX_ROWS)
        seconds = passes * nbytes / (self.cpu_gbps[-1][1] * 1e9)
        if last:
            seconds += nbytes / (next(gbps for count, gbps in self.cpu_gbps if count >= last) * 1e9)
        return seconds

    def describe(self) -> str:
        cpu = ", ".join(f"{gbps:.1f} at {rows} row{'s' * (rows > 1)}" for rows, gbps in self.cpu_gbps)
        return f"CPU experts: link {self.link_gbps:.1f} GB/s, CPU kernel {cpu} GB/s ({cpu_kernels.backend()})"


def unsupported(config: ModelConfig, expert_format: ExpertFormat) -> str | None:
    """Why the CPU cannot run this model's experts (cpu_swiglu: plain SwiGLU, dense or HQQ, no biases), or None."""
    if config.swiglu_limit or config.expert_bias:
        return "the CPU runs plain SwiGLU experts without biases, and this model's are gpt-oss's"
    if not isinstance(expert_format, (DenseExpertFormat, HQQExpertFormat)):
        return f"the CPU runs dense or HQQ experts, not {type(expert_format).__name__}; quantize them with --quant"
    return None


def calibrate(source: torch.Tensor, expert_format: ExpertFormat, device: torch.device, hidden_size: int,
              dtype: torch.dtype, threads: int | None = None) -> Calibration:
    """Time copies of one stored expert (`source`, uint8 on the host) to `device` and the CPU kernel over it, on
    activations of `dtype` (milliseconds at start)."""
    target = torch.empty_like(source, device=device)

    def copy():
        target.copy_(source, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    link = source.numel() / _median_seconds(copy) / 1e9
    cpu = []
    for rows in ROW_COUNTS:
        x = torch.randn(rows, hidden_size).to(dtype)
        seconds = _median_seconds(lambda: cpu_kernels.cpu_swiglu(expert_format, source, x, threads))
        cpu.append((rows, source.numel() / seconds / 1e9))
    return Calibration(link, tuple(cpu))


def _median_seconds(work: Callable[[], object]) -> float:
    work()
    times = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return max(statistics.median(times), 1e-9)


class CostModel:
    """When the link and the CPU will be done with what is queued on each (host-clock estimates from the
    calibration), and the split of a step's misses that finishes them soonest."""

    def __init__(self, calibration: Calibration, nbytes: int, clock: Callable[[], float] = time.perf_counter):
        self.calibration, self.nbytes, self.clock = calibration, nbytes, clock
        self.link_free_at = self.cpu_free_at = 0.0

    def queue_copy(self) -> None:
        """A copy of one expert was queued on the link (a miss or a prefetch)."""
        self.link_free_at = max(self.clock(), self.link_free_at) + self.calibration.copy_seconds(self.nbytes)

    def split(self, misses: dict[int, int], room: int) -> set[int]:
        """Misses (expert -> rows of x that use it) -> those the CPU computes; at most `room` are copied (the layer's
        free slots). Greedy, most rows first: each goes where it would finish sooner, the link on a tie."""
        now = self.clock()
        link, cpu = max(now, self.link_free_at), max(now, self.cpu_free_at)
        on_cpu, copied = set(), 0
        for expert, rows in sorted(misses.items(), key=lambda miss: (-miss[1], miss[0])):
            copy_done = link + self.calibration.copy_seconds(self.nbytes)
            cpu_done = cpu + self.calibration.cpu_seconds(self.nbytes, rows)
            if copied < room and copy_done <= cpu_done:
                link, copied = copy_done, copied + 1
            else:
                cpu = cpu_done
                on_cpu.add(expert)
        self.cpu_free_at = cpu           # the copies join the link's queue as they are issued (queue_copy)
        return on_cpu


class CpuExperts:
    """Runs pairs of a step on the CPU from the host store, in a worker thread, into the step's RowBuffers."""

    def __init__(self, store: ExpertStore, expert_format: ExpertFormat, device, costs: CostModel | None = None,
                 threads: int | None = None):
        self.store, self.expert_format, self.device = store, expert_format, torch.device(device)
        self.costs = costs               # None: no dynamic choice, only the layers without slots run here
        self.threads = threads
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-experts")

    def takes(self, tokens: int) -> bool:
        """Whether misses of a step of `tokens` tokens may run here (a decode step; prefill streams on the device)."""
        return self.costs is not None and tokens <= cpu_kernels.MAX_ROWS

    def start(self, layer: int, x: torch.Tensor, out: "RowBuffers", pairs: list[int], experts: set[int],
              stats: OffloadStats) -> Future | None:
        """Start computing the pairs of `experts` into `out` (x: the step's input on the host; pairs: each pair's
        expert); None: nothing to compute, nor a mask to clear on the device."""
        if not experts:                  # nothing to compute: the mask goes out cleared, once
            if out.clear:
                return None
            out.chosen.zero_()
            done = Future()
            done.set_result(out)
            return done
        return self.worker.submit(self._run, layer, x, pairs, sorted(experts), out, stats)

    @staticmethod
    def finish(job: Future) -> None:
        """Wait for the job; its rows and mask go to the device (queued on the current stream)."""
        job.result().send()

    @torch.inference_mode()     # the buffers were made in the forward's inference mode; this is another thread
    def _run(self, layer: int, x: torch.Tensor, pairs: list[int], experts: list[int], buffers: "RowBuffers",
             stats: OffloadStats) -> "RowBuffers":
        started = time.perf_counter()
        top_k = len(pairs) // x.shape[0]
        buffers.chosen.zero_()
        for expert in experts:
            chosen = [p for p, e in enumerate(pairs) if e == expert]
            rows = x[[p // top_k for p in chosen]]
            buffers.host[chosen] = cpu_kernels.cpu_swiglu(self.expert_format, self.store.buffer(layer, expert), rows,
                                                          self.threads)
            buffers.chosen[chosen] = True
            stats.cpu_bytes += -(-len(chosen) // cpu_kernels.MAX_ROWS) * self.store.nbytes
        stats.cpu_seconds += time.perf_counter() - started
        return buffers


class RowBuffers:
    """Where the CPU's products of a step go: host rows and mask (pinned on CUDA), and their device twins (one set
    per layer and step shape, made by the provider's read buffers)."""

    def __init__(self, pairs: int, hidden: int, dtype: torch.dtype, device: torch.device):
        pinned = device.type == "cuda"
        self.host = torch.zeros(pairs, hidden, dtype=dtype, pin_memory=pinned)
        self.chosen = torch.zeros(pairs, dtype=torch.bool, pin_memory=pinned)
        self.rows = torch.zeros(pairs, hidden, dtype=dtype, device=device)
        self.mask = torch.zeros(pairs, dtype=torch.bool, device=device)
        self.clear = True                # the device mask takes no row

    def send(self) -> None:
        """Queue the host rows and mask to the device (the host buffers are rewritten only a layer's step later, after
        a routing read has waited for everything queued before it)."""
        self.rows.copy_(self.host, non_blocking=True)
        self.mask.copy_(self.chosen, non_blocking=True)
        self.clear = not self.chosen.any()

    def computed(self, whole: bool) -> Computed:
        """The device rows and mask as a batch takes them (`whole`: every pair ran on the CPU)."""
        return Computed(self.rows, None if whole else self.mask)
