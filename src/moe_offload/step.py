"""The decode step: one token of each running sequence through the model, with their positions and KV cache rows
on the device, eager or from CUDA graphs.

    step = DecodeStep(model, cache)            # cache: KVCache.allocate(config, batch=most sequences at once, ...)
    step.set(0, token, position, row=0)        # sequence 0 decodes `token` at `position`, in cache row 0
    logits = step(count=1)                     # (count, vocab) fp32 for sequences 0..count-1; then each one's
                                               # position advances and its greedy choice is its next token
    tokens = step.next_tokens(count)           # those greedy choices, read back to the host

Sequences are the first `count` entries of the step's tables (token, position, cache row); the caller keeps
them compact as sequences come and go (`move`). On CUDA, when every MoE step of a batch can run as one batch
of grouped kernels (ExpertFormat.runs_grouped, and slots for every distinct expert of the batch:
the provider's holds_at_once), the forward of each batch size bucket (1, 2, 4, ...) is captured once as CUDA
graphs and replayed: a resident model's token is one graph; an offloaded model's is cut after each MoE
layer's routing read, and the provider's host work (which experts to copy, the slot table) runs between the
pieces. A bucket larger than `count` repeats sequence 0 in its spare rows (the same token, position and cache
row: the same work and the same experts, so no extra copies) and ignores their results. The first step of a
bucket runs eagerly (it compiles kernels and sizes every buffer the capture then reuses); eager and replayed
steps compute the same bits. Elsewhere every step is eager.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from . import ops
from .model import KVCache, Transformer


class GraphCapture:
    """A forward captured as pieces of CUDA graph, cut where host work must run between them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.pieces: list[tuple[torch.cuda.CUDAGraph, list[Callable[[], None]]]] = []
        self.launch_seconds = 0.0        # host time spent launching pieces, over every replay
        self.host_work_seconds = 0.0     # host time spent between pieces (the routing waits included)

    def record(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Capture `forward()` (nothing runs); its result is overwritten by every replay."""
        torch.cuda.synchronize(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._begin()
            try:
                result = forward()
            finally:
                self.pieces[-1][0].capture_end()     # also after a failure: leave the stream out of capture
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return result

    def cut(self, host_work: Callable[[], None]) -> None:
        """End the current piece here; `host_work` runs after it replays, before the next one."""
        self.pieces[-1][1].append(host_work)
        self.pieces[-1][0].capture_end()
        self._begin()

    def after_piece(self, host_work: Callable[[], None]) -> None:
        """Run `host_work` after the current piece replays."""
        self.pieces[-1][1].append(host_work)

    @torch.inference_mode()      # the host work writes tensors the forward made, in inference mode
    def replay(self) -> None:
        for graph, host_work in self.pieces:
            started = time.perf_counter()
            graph.replay()
            launched = time.perf_counter()
            for work in host_work:
                work()
            self.launch_seconds += launched - started
            self.host_work_seconds += time.perf_counter() - launched

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.pieces.append((graph, []))


class DecodeStep:
    """Batched decode of one model and KV cache; reuse it across generations (the graphs are captured once)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        device = cache.keys[0].device
        self.most = cache.keys[0].shape[0]          # sequences at once: the cache's rows
        with torch.inference_mode():
            self.tokens = torch.zeros((self.most, 1), dtype=torch.int64, device=device)
            self.positions = torch.zeros(self.most, dtype=torch.int64, device=device)
            self.rows = torch.arange(self.most, device=device)
            self.count = torch.ones(1, dtype=torch.int64, device=device)
        self.capturable = {bucket: _capturable(model, cache, bucket) for bucket in _buckets(self.most)}
        self.graphs: dict[int, GraphCapture] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.warm: set[int] = set()

    def set(self, index: int, token: int, position: int | None = None, row: int | None = None) -> None:
        """Sequence `index` decodes `token` next (at `position`, in cache row `row`; else where it left off)."""
        with torch.inference_mode():
            self.tokens[index].fill_(token)
            if position is not None:
                self.positions[index].fill_(position)
            if row is not None:
                self.rows[index].fill_(row)

    def move(self, source: int, target: int) -> None:
        """Sequence `source` becomes sequence `target` (to keep the running ones first as others leave)."""
        with torch.inference_mode():
            for table in (self.tokens, self.positions, self.rows):
                table[target].copy_(table[source])

    def __call__(self, count: int = 1) -> torch.Tensor:
        bucket = next(b for b in _buckets(self.most) if b >= count)
        with torch.inference_mode():
            self.count.fill_(count)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        elif self.capturable[bucket] and bucket in self.warm:
            self._capture(bucket)
        else:
            self.logits[bucket] = self._forward(bucket)
            self.warm.add(bucket)
        return self.logits[bucket][:count]

    def choose(self, tokens: torch.Tensor) -> None:
        """Sequences 0..len(tokens)-1 decode `tokens` (int64, on the device) next, in place of their greedy choices."""
        with torch.inference_mode():
            self.tokens[:len(tokens), 0].copy_(tokens)

    def next_tokens(self, count: int = 1) -> list[int]:
        return self.tokens[:count, 0].tolist()

    def _capture(self, bucket: int) -> None:
        """Capture a bucket's step and replay it; should capture fail, say so once and stay eager (the same bits)."""
        graph = GraphCapture(self.positions.device)
        self.model.provider.graph = graph
        try:
            self.logits[bucket] = graph.record(lambda: self._forward(bucket))
        except RuntimeError as e:
            print(f"warning: decoding without CUDA graphs, capturing the step failed: {str(e).splitlines()[0]}",
                  file=sys.stderr)
            self.capturable = dict.fromkeys(self.capturable, False)
        finally:
            self.model.provider.graph = None
        if self.capturable[bucket]:
            self.graphs[bucket] = graph
            graph.replay()
        else:
            self.logits[bucket] = self._forward(bucket)

    @torch.inference_mode()
    def _forward(self, bucket: int) -> torch.Tensor:
        running = torch.arange(bucket, device=self.count.device) < self.count      # the rest repeat sequence 0
        tokens = torch.where(running[:, None], self.tokens[:bucket], self.tokens[:1])
        positions = torch.where(running, self.positions[:bucket], self.positions[:1])
        rows = torch.where(running, self.rows[:bucket], self.rows[:1])
        logits = self.model(tokens, self.cache, positions, rows)[:, -1]
        self.tokens[:bucket].copy_(torch.where(running[:, None], logits.argmax(-1, keepdim=True), self.tokens[:bucket]))
        self.positions[:bucket].add_(running)
        return logits


def _buckets(most: int) -> list[int]:
    """Batch sizes with their own graphs: powers of two, then `most`."""
    sizes = [1 << i for i in range(most.bit_length()) if 1 << i < most]
    return sizes + [most]


def _capturable(model: Transformer, cache: KVCache, tokens: int) -> bool:
    """Whether a step of `tokens` sequences can be captured: CUDA, the decode kernels, and a provider that runs
    every MoE step of them as one batch of the format's grouped kernels."""
    device = cache.keys[0].device
    provider, config = model.provider, model.config
    if device.type != "cuda" or not ops.AVAILABLE or not hasattr(provider, "holds_at_once"):
        return False
    x = torch.empty(tokens, config.hidden_size, device=device, dtype=cache.keys[0].dtype)
    distinct = min(tokens * config.top_k, config.num_experts)
    return provider.holds_at_once(distinct, tokens) and provider.expert_format.runs_grouped(x, config.top_k)
