"""Routing traces: record a trained model's expert choices, replay them onto a synthetic model.

Random weights route almost uniformly, which hides the locality that the expert cache and the
prefetcher live on. So the benchmarks also run a synthetic full-size model whose routers are
overridden, token by token and layer by layer, by the choices a trained model of the same depth
made on real text (compute and copies stay real; only the choice of experts is replayed).

    trace = record_routing("fixtures/reference-moe-32l", "data/eval-networkx.txt", tokens=3072)
    trace.save("benchmarks/traces/reference-moe-32l.safetensors")
    trace = RoutingTrace.load("benchmarks/traces/reference-moe-32l.safetensors")
    router = ReplayRouter(trace, device, moe_layers)           # Transformer(..., router=router): one sequence
    router = ReplayRouter(trace, device, moe_layers, sequences=rows)   # a batch: router.place(row, token) each
    predictor = ReplayPredictor(trace, router, depth=1, top_n=2)   # the offload provider's predictor

Trace file format (version 1): one safetensors file, tensors

    token_ids       int32 (tokens,)                        the text, as the model's tokenizer encoded it
    expert_ids      int8  (tokens, layers, top_k)          experts chosen per token and MoE layer, in router order
    expert_weights  float16 (tokens, layers, top_k)        their routing weights (renormalised if the model does)
    predicted_ids   int8  (tokens, layers, depth, ranked)  the gate-based prediction made at layer l for
                                                           layer l+d (d = 1..depth), most likely first;
                                                           -1 where l+d is past the last MoE layer

and string metadata: format ("moe-offload routing trace"), version, model, text, window,
num_experts, top_k, depth, ranked, predictor. Tokens are recorded with teacher forcing over
consecutive windows of `window` tokens, each window from an empty KV cache (the fixtures were
trained on 512-token windows). Predictions are exactly what `offload.prefetch.GatePredictor`
(router of layer l+d, after its RMSNorm, applied to the residual entering layer l's MoE block)
returns for that single token, so replayed prefetch is as good as the trained model's own gates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError

TRACE_FORMAT = "moe-offload routing trace"
TRACE_VERSION = "1"
RECORD_WINDOW = 512      # tokens per teacher-forced window: the fixtures' training length
RECORD_DEPTH = 2         # predictions for layers l+1 .. l+RECORD_DEPTH
RECORD_RANKED = 4        # experts kept per prediction, most likely first


@dataclass
class RoutingTrace:
    token_ids: torch.Tensor        # int32 (tokens,)
    expert_ids: torch.Tensor       # int8 (tokens, layers, top_k)
    expert_weights: torch.Tensor   # float16 (tokens, layers, top_k)
    predicted_ids: torch.Tensor    # int8 (tokens, layers, depth, ranked)
    metadata: dict[str, str]

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({"token_ids": self.token_ids.contiguous(), "expert_ids": self.expert_ids.contiguous(),
                   "expert_weights": self.expert_weights.contiguous(), "predicted_ids": self.predicted_ids.contiguous()},
                  partial, metadata=self.metadata)
        partial.replace(path)    # never a half-written trace

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such routing trace; record one with `moe-offload bench record-routing`")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            raise UserError(f"{path}: not a readable routing trace ({e}); record it again") from None
        if metadata.get("format") != TRACE_FORMAT or metadata.get("version") != TRACE_VERSION:
            raise UserError(f"{path}: not a version {TRACE_VERSION} routing trace (format {metadata.get('format')!r}, "
                            f"version {metadata.get('version')!r}); record it again")
        missing = {"token_ids", "expert_ids", "expert_weights", "predicted_ids"} - set(tensors)
        if missing:
            raise UserError(f"{path}: routing trace lacks {', '.join(sorted(missing))}; record it again")
        return cls(metadata=metadata, **tensors)

    def check_fits(self, num_moe_layers: int, num_experts: int, top_k: int) -> None:
        """Replaying needs the same number of MoE layers, experts and top-k as the recording."""
        if (self.num_layers, self.num_experts, self.top_k) != (num_moe_layers, num_experts, top_k):
            raise UserError(
                f"routing trace of {self.metadata.get('model')!r} has {self.num_layers} MoE layers, "
                f"{self.num_experts} experts, top-{self.top_k}, but the model has {num_moe_layers}, {num_experts}, "
                f"top-{top_k}; record a trace from a model of the same shape, or use --routing own")


class RecordingRouter:
    """Routes as the model does and keeps what it chose: layer -> list of (ids, weights) per forward."""

    def __init__(self, router):
        self.router = router
        self.chosen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, layer, logits, top_k, renormalize):
        weights, ids = self.router(layer, logits, top_k, renormalize)
        self.chosen.setdefault(layer, []).append((ids.cpu(), weights.cpu()))
        return weights, ids


class RecordingProvider:
    """Wraps the model's provider; for every token entering a MoE layer, asks `predictor` what it
    would prefetch for that token alone: layer -> list of (tokens, depth, ranked) per forward."""

    def __init__(self, provider, predictor, moe_layers: tuple[int, ...], depth: int, ranked: int):
        self.provider = provider
        self.expert_format = provider.expert_format
        self.predictor = predictor
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.moe_layers = moe_layers
        self.depth = depth
        self.ranked = ranked
        self.predicted: dict[int, list[torch.Tensor]] = {}

    def experts(self, layer, expert_ids, residual, x):
        rows = torch.full((residual.shape[0], self.depth, self.ranked), -1, dtype=torch.int8)
        for t in range(residual.shape[0]):
            for target, ids in self.predictor.predict(layer, residual[t:t + 1]).items():
                distance = self.position[target] - self.position[layer]
                rows[t, distance - 1] = ids[:self.ranked].to(torch.int8)
        self.predicted.setdefault(layer, []).append(rows)
        yield from self.provider.experts(layer, expert_ids, residual, x)


def record_routing(model_dir, text_file, tokens: int, window: int = RECORD_WINDOW, depth: int = RECORD_DEPTH,
                   ranked: int = RECORD_RANKED, progress: bool = True) -> RoutingTrace:
    """Teacher-force the first `tokens` tokens of `text_file` through the model at `model_dir`
    (our Engine, fp32 on the CPU) and record its routing and gate-based predictions."""
    from ..config import RuntimeConfig
    from ..engine import Engine
    from ..model import KVCache
    from ..offload.prefetch import GatePredictor

    text_path = Path(text_file)
    if not text_path.is_file():
        raise UserError(f"--text {text_path}: no such file; pass held-out text to record routing on")
    if tokens < 1 or window < 1:
        raise UserError(f"--tokens and the window must be at least 1, got {tokens} and {window}")
    engine = Engine.load(RuntimeConfig(model=model_dir, device="cpu", dtype="float32"), progress=progress)
    config = engine.config
    token_ids = engine.tokenizer.encode(text_path.read_text(encoding="utf-8"))
    if len(token_ids) < tokens:
        raise UserError(f"--text {text_path}: has {len(token_ids)} tokens, fewer than --tokens {tokens}; "
                        f"pass a longer text or fewer tokens")
    token_ids = token_ids[:tokens]
    ranked = min(ranked, config.num_experts)
    model = engine.model
    recorder = RecordingRouter(model.router)
    predictor = GatePredictor(config, model.weights.layers, depth=depth, top_n=config.num_experts, apply_norm=True)
    provider = RecordingProvider(model.provider, predictor, config.moe_layers, depth, ranked)
    model.router, model.provider = recorder, provider
    window = min(window, engine.max_context)
    cache = KVCache.allocate(config, batch=1, max_len=window, device="cpu", dtype=torch.float32)
    starts = range(0, tokens, window)
    for i, start in enumerate(starts):
        model(torch.tensor([token_ids[start:start + window]]), cache, start_pos=0, last_only=True)
        if progress:
            print(f"recorded {min(start + window, tokens)}/{tokens} tokens", flush=True)
    layers = config.moe_layers
    ids = torch.stack([torch.cat([c[0] for c in recorder.chosen[layer]]) for layer in layers], dim=1)
    weights = torch.stack([torch.cat([c[1] for c in recorder.chosen[layer]]) for layer in layers], dim=1)
    predicted = torch.stack([torch.cat(provider.predicted[layer]) for layer in layers], dim=1)
    metadata = {
        "format": TRACE_FORMAT, "version": TRACE_VERSION, "model": Path(model_dir).name, "text": text_path.name,
        "window": str(window), "num_experts": str(config.num_experts), "top_k": str(config.top_k),
        "depth": str(depth), "ranked": str(ranked),
        "predictor": "GatePredictor(apply_norm=True): router of layer l+d after its RMSNorm on the residual entering layer l's MoE block",
    }
    return RoutingTrace(torch.tensor(token_ids, dtype=torch.int32), ids.to(torch.int8), weights.to(torch.float16),
                        predicted, metadata)


class ReplayRouter:
    """A `Transformer` router that returns the recorded choices instead of the model's own.

    One sequence (the default): forward i covers trace tokens [start, start + T): each forward advances by its
    token count, wrapping to the trace's beginning when the next forward would run past its end. `seek(p)`
    places the next forward at token p.

    Several sequences (`sequences`: the KV cache's rows): each sequence replays its own stretch. `place(row, p)`
    makes the sequence in cache row `row` read trace token (p + position) mod the trace's length for its token at
    `position`, in prefill and in decode; `prefilling(row)` says whose prompt the next prefill forwards carry
    (a cache-row view gives no row). The model tells the router each forward's positions and cache rows
    (`begin_forward`); in decode they are device tensors, so the trace tokens of every row are looked up on the
    device and a captured CUDA graph replays each row's own trace, token after token, wherever it sits.

    Choices are indexed by MoE layer order. The position lives on the device and advances there, so a
    captured CUDA graph replays the trace token after token.
    """

    def __init__(self, trace: RoutingTrace, device, moe_layers: tuple[int, ...], sequences: int = 0):
        self.ids = trace.expert_ids.to(device=device, dtype=torch.int64)
        self.weights = trace.expert_weights.to(device=device, dtype=torch.float32)
        self.num_tokens = trace.num_tokens
        self.first_layer = moe_layers[0]
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.start = torch.zeros((), dtype=torch.int64, device=device)       # first trace token of the current forward
        self.next_start = torch.zeros((), dtype=torch.int64, device=device)
        # several sequences: each cache row's first trace token, and the trace tokens of the current forward
        self.offsets = torch.zeros(sequences, dtype=torch.int64, device=device) if sequences else None
        self.prefill_row = 0
        self.current: torch.Tensor | None = None

    def seek(self, token: int) -> None:
        self.next_start.fill_(token % self.num_tokens)

    def place(self, row: int, token: int) -> None:
        """Several sequences: the one in cache row `row` reads trace token (token + position) mod length."""
        self.offsets[row].fill_(token % self.num_tokens)

    def prefilling(self, row: int) -> None:
        """Several sequences: the prompt chunks forwarded next belong to the sequence in cache row `row`."""
        self.prefill_row = row

    def begin_forward(self, start_pos: int | torch.Tensor, rows: torch.Tensor | None, batch: int, length: int) -> None:
        """Called by the model before each forward; with several sequences, finds the forward's trace tokens."""
        if self.offsets is None:
            return
        self._check_length(batch * length)
        if isinstance(start_pos, torch.Tensor):          # decode: row b's token at start_pos[b], in cache row rows[b]
            self.current = (self.offsets[rows] + start_pos) % self.num_tokens
            return
        offsets = self.offsets[self.prefill_row:self.prefill_row + 1] if batch == 1 else self.offsets[:batch]
        steps = torch.arange(start_pos, start_pos + length, device=offsets.device)
        self.current = ((offsets[:, None] + steps[None, :]) % self.num_tokens).flatten()

    def rows(self, length: int) -> torch.Tensor:
        """The trace rows of the current forward's `length` tokens, on the device."""
        if self.offsets is not None:
            return self.current
        return self.start + torch.arange(length, device=self.start.device)

    def _check_length(self, length: int) -> None:
        if length > self.num_tokens:
            raise UserError(f"a forward of {length} tokens is longer than the routing trace ({self.num_tokens} tokens); "
                            f"record a longer trace or use a shorter prompt")

    def __call__(self, layer, logits, top_k, renormalize):
        length = logits.shape[0]
        if self.offsets is not None:
            if self.current is None or self.current.shape[0] != length:
                raise RuntimeError("a replay of several sequences needs the model's begin_forward before routing")
            rows = self.current
        else:
            self._check_length(length)
            if layer == self.first_layer:
                fits = self.next_start + length <= self.num_tokens
                self.start.copy_(torch.where(fits, self.next_start, torch.zeros_like(self.next_start)))
                self.next_start.copy_(self.start + length)
            rows = self.rows(length)
        column = self.position[layer]
        return self.weights[rows, column], self.ids[rows, column]


class ReplayPredictor:
    """The `ExpertPredictor` that goes with a `ReplayRouter`: the recorded gate-based predictions
    for the tokens the router is replaying. For several tokens (prefill) experts are ranked by
    how many tokens predicted them (ties by expert id; experts no token predicted are -1).
    `costs_as`: a predictor run too, its guesses dropped, so that a replay pays what it would cost."""

    def __init__(self, trace: RoutingTrace, router: ReplayRouter, moe_layers: tuple[int, ...], depth: int, top_n: int,
                 costs_as=None):
        recorded_depth = trace.predicted_ids.shape[2]
        recorded_ranked = trace.predicted_ids.shape[3]
        if depth > recorded_depth or top_n > recorded_ranked:
            raise UserError(f"the routing trace holds predictions {recorded_depth} layers ahead, {recorded_ranked} experts "
                            f"each; asked for depth {depth} and {top_n} experts: lower them or record a deeper trace")
        device = router.ids.device
        self.predicted = trace.predicted_ids[:, :, :depth, :top_n].to(device=device, dtype=torch.int64)
        self.num_experts = trace.num_experts
        self.router = router
        self.moe_layers = moe_layers
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.depth = depth
        self.top_n = top_n
        self.costs_as = costs_as

    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.costs_as is not None:
            self.costs_as.predict(layer, residual)
        column = self.position[layer]
        length = residual.shape[0]
        rows = self.router.rows(length)
        out = {}
        for distance in range(1, self.depth + 1):
            if column + distance >= len(self.moe_layers):
                break
            ranked = self.predicted[rows, column, distance - 1]          # (tokens, top_n)
            out[self.moe_layers[column + distance]] = ranked[0] if length == 1 else self._votes(ranked)
        return out

    def _votes(self, ranked: torch.Tensor) -> torch.Tensor:
        """The top_n experts by how many tokens predicted them, ties to the lower id; -1 for unvoted places."""
        named = ranked.flatten()
        votes = torch.zeros(self.num_experts + 1, device=ranked.device).index_add_(0, named + 1, torch.ones_like(named, dtype=torch.float32))[1:]
        score = votes * (self.num_experts + 1) - torch.arange(self.num_experts, device=ranked.device)
        top = torch.topk(score, min(self.top_n, self.num_experts)).indices
        return torch.where(votes[top] > 0, top, -1)
