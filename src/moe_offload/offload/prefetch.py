"""Speculative expert prediction: guess which experts later layers will use. Predicts only; moves nothing.

    predictor = GatePredictor(config, model.weights.layers, depth=1, top_n=2)
    predictor.predict(layer=3, residual=h)     # -> {4: [5, 1]}: layer 4 will probably use experts 5, then 1

The residual stream changes slowly from layer to layer, so layer l+d's router applied to the
residual entering layer l's MoE block is a good guess of layer l+d's experts (Eliseev & Mazur,
2023, §3.2). The offloaded provider calls `predict` once per MoE layer per forward and starts
copies of the predicted experts that are not on the device yet.

Anything with a `predict(layer, residual)` method of the `ExpertPredictor` shape can stand in
(e.g. a replay of recorded routing in the benchmarks).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import ModelConfig
from ..model import LayerWeights, linear, rms_norm


class ExpertPredictor(Protocol):
    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, list[int]]:
        """Called during MoE layer `layer` with the residual stream entering its MoE block,
        (tokens, hidden). Returns {future MoE layer: [expert ids, most likely first]}; layers or
        experts it has no guess for are simply left out. It must not change any state the model
        computes with."""
        ...


class GatePredictor:
    """Applies the routers of the next `depth` MoE layers to the current residual.

    `apply_norm`: scale the residual by the target layer's post-attention RMSNorm before its gate,
    as that layer will (False feeds the raw residual). For several tokens (prefill) the experts
    are ranked by their router probability summed over tokens.
    """

    def __init__(self, config: ModelConfig, layers: list[LayerWeights], depth: int, top_n: int, apply_norm: bool = True):
        if depth < 1 or top_n < 1:
            raise ValueError(f"prefetch depth and experts must be at least 1, got depth={depth}, experts={top_n}")
        self.eps = config.rms_norm_eps
        self.layers = layers
        self.top_n = min(top_n, config.num_experts)
        self.apply_norm = apply_norm
        moe = config.moe_layers
        # layer -> the next `depth` MoE layers after it
        self.targets = {layer: moe[i + 1:i + 1 + depth] for i, layer in enumerate(moe)}

    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, list[int]]:
        targets = self.targets.get(layer, ())
        if not targets:
            return {}
        ranked = []
        for target in targets:
            w = self.layers[target]
            x = rms_norm(residual, w.mlp_norm, self.eps) if self.apply_norm else residual
            probs = torch.softmax(linear(x, w.router).float(), dim=-1).sum(dim=0)   # (experts,)
            ranked.append(torch.topk(probs, self.top_n).indices)
        ids = torch.stack(ranked).tolist()   # one host sync for every target layer
        return dict(zip(targets, ids))
