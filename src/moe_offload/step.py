"""The decode step: one token through the model with its position on the device, eager or from CUDA graphs.

    step = DecodeStep(model, cache)
    step.set(token, position)       # the token to decode next and its position (after prefill, or a sampled one)
    logits = step()                 # (vocab,) fp32; then the position advances and the greedy choice is next
    token = step.next_token()       # that greedy choice, read back to the host

On CUDA, when every MoE step can run as one batch of grouped kernels (ExpertFormat.runs_grouped, and as
many expert slots per layer as a step has (token, choice) pairs), the forward is captured once as CUDA
graphs and replayed for every token: a resident model's token is one graph; an offloaded model's is cut
after each MoE layer's routing read, and the provider's host work (which experts to copy, the slot table)
runs between the pieces. The first step runs eagerly (it compiles kernels and sizes every buffer the
capture then reuses); eager and replayed steps compute the same bits. Elsewhere every step is eager.
"""

from __future__ import annotations

import sys
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
            graph.replay()
            for work in host_work:
                work()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.pieces.append((graph, []))


class DecodeStep:
    """Batch-1 decode of one model and KV cache; reuse it across generations (the graphs are captured once)."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache = model, cache
        device = cache.keys[0].device
        with torch.inference_mode():
            self.token = torch.zeros((1, 1), dtype=torch.int64, device=device)
            self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.capturable = _capturable(model, cache)
        self.graph: GraphCapture | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0

    def set(self, token: int, position: int | None = None) -> None:
        """The next step decodes `token` (at `position`, else where the last step left off)."""
        with torch.inference_mode():
            self.token.fill_(token)
            if position is not None:
                self.position.fill_(position)

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
        elif self.capturable and self.steps > 0:
            self._capture()
        else:
            self.logits = self._forward()
        self.steps += 1
        return self.logits

    def _capture(self) -> None:
        """Capture the step and replay it; should capture fail, say so once and stay eager (the same bits)."""
        graph = GraphCapture(self.position.device)
        self.model.provider.graph = graph
        try:
            self.logits = graph.record(self._forward)
        except RuntimeError as e:
            print(f"warning: decoding without CUDA graphs, capturing the step failed: {str(e).splitlines()[0]}",
                  file=sys.stderr)
            self.capturable = False
        finally:
            self.model.provider.graph = None
        if self.capturable:
            self.graph = graph
            graph.replay()
        else:
            self.logits = self._forward()

    def next_token(self) -> int:
        return int(self.token)

    @torch.inference_mode()
    def _forward(self) -> torch.Tensor:
        logits = self.model(self.token, self.cache, start_pos=self.position)[0, -1]
        self.token.copy_(logits.argmax().view(1, 1))
        self.position.add_(1)
        return logits


def _capturable(model: Transformer, cache: KVCache) -> bool:
    """Whether the step can be captured: CUDA, the decode kernels, and a provider whose every MoE step of one
    token runs as one batch of the format's grouped kernels."""
    device = cache.keys[0].device
    provider, config = model.provider, model.config
    if device.type != "cuda" or not ops.AVAILABLE or not hasattr(provider, "runs_static"):
        return False
    token = torch.empty(1, config.hidden_size, device=device, dtype=cache.keys[0].dtype)
    return provider.runs_static(1, config.top_k) and provider.expert_format.runs_grouped(token, config.top_k)
