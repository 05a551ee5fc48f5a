"""Speculative expert prediction: guess which experts later layers will use. Predicts only; moves nothing.

    predictor = GatePredictor(config, model.weights.layers, depth=1, top_n=2)
    predictor.predict(layer=3, residual=h)     # -> {4: tensor([5, 1])}: layer 4 will probably use experts 5, then 1

The residual stream changes slowly from layer to layer, so layer l+d's router applied to the
residual entering layer l's MoE block is a good guess of layer l+d's experts (Eliseev & Mazur,
2023, §3.2). The offloaded provider calls `predict` once per MoE layer per forward, reads the
guesses back to the host in the same read as the layer's own routing, and starts copies of the
predicted experts that are not on the device yet.

Anything with a `predict(layer, residual)` method of the `ExpertPredictor` shape can stand in
(e.g. a replay of recorded routing in the benchmarks).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig
from ..model import LayerWeights, linear
from ..ops import rms_norm


class ExpertPredictor(Protocol):
    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, torch.Tensor]:
        """Called during MoE layer `layer` with the residual stream entering its MoE block, (tokens, hidden).
        Returns {future MoE layer: int64 (n,) expert ids on the device, most likely first; -1 for none}, as
        queued device work: nothing is read back here (a CUDA graph may be capturing it). It must not change
        any state the model computes with."""
        ...


class GatePredictor:
    """Applies the routers of the next `depth` MoE layers to the current residual.

    `apply_norm`: scale the residual by the target layer's post-attention RMSNorm before its gate, as that
    layer will (False feeds the raw residual). The norm's weight is folded into the router at construction,
    so the guesses for every target layer are one GEMV on the normalized residual. For several tokens
    (prefill) the experts are ranked by their router probability summed over tokens.
    """

    def __init__(self, config: ModelConfig, layers: list[LayerWeights], depth: int, top_n: int, apply_norm: bool = True):
        if depth < 1 or top_n < 1:
            raise ValueError(f"prefetch depth and experts must be at least 1, got depth={depth}, experts={top_n}")
        self.eps = config.rms_norm_eps
        self.num_experts = config.num_experts
        self.top_n = min(top_n, config.num_experts)
        self.apply_norm = apply_norm
        moe = config.moe_layers
        # layer -> the next `depth` MoE layers after it, and their stacked (norm-folded) routers
        self.targets = {layer: moe[i + 1:i + 1 + depth] for i, layer in enumerate(moe)}
        self.gates = {layer: torch.cat([self._gate(layers[t]) for t in targets])
                      for layer, targets in self.targets.items() if targets}

    def _gate(self, weights: LayerWeights) -> torch.Tensor:
        router = weights.router
        if not self.apply_norm:
            return router
        return (router.float() * weights.mlp_norm.float()).to(router.dtype)

    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, torch.Tensor]:
        targets = self.targets.get(layer, ())
        if not targets:
            return {}
        x = rms_norm(residual, None, self.eps) if self.apply_norm else residual
        logits = linear(x, self.gates[layer]).float().view(-1, len(targets), self.num_experts)
        probs = torch.softmax(logits, dim=-1).sum(dim=0)            # (targets, experts)
        ranked = torch.topk(probs, self.top_n).indices
        return dict(zip(targets, ranked.unbind(0)))
