"""Routing realism: how well the LRU expert cache and the gate-based prefetch would do on a trained model.

    python benchmarks/routing_locality.py                        # reference-moe-32l, 2048 tokens, fp32, CPU
    python benchmarks/routing_locality.py --model ../shared/fixtures/reference-moe --tokens 512

Decodes the held-out text token by token with teacher forcing (one sequence, or windows of
--window tokens each from an empty KV cache), records every MoE layer's experts and what
`GatePredictor` guesses for the next layers (with and without the target layer's RMSNorm), then
replays the routing through `LayerCache` (offload/cache.py, the provider's own bookkeeping) for
2/4/6 slots per layer, with prefetch off and on. Hit rates count each expert use once; the cache
starts empty. Also shows the classic one-use-at-a-time LRU (each of a token's top-k experts looked
up and inserted in turn, most likely first, so the first miss may evict the second pick), which is what a simple
simulation of "hits counted per expert use" does; the provider never evicts an expert the
current token still needs. Writes JSON to benchmarks/results/ and prints it as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

from moe_offload.config import RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.model import KVCache, own_routing
from moe_offload.offload.cache import LayerCache, LayerStats
from moe_offload.offload.prefetch import GatePredictor

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
SLOTS = (2, 4, 6)
PREDICTED = (1, 2, 3)
DEPTHS = (1, 2)


class RecordingProvider:
    """Serves experts from the resident provider; records each layer's experts and the predictions."""

    def __init__(self, resident, predictors: dict[str, GatePredictor]):
        self.resident, self.predictors = resident, predictors
        self.expert_format = resident.expert_format
        self.routing: list[dict[int, list[int]]] = []                 # per token: layer -> experts
        self.router_order: list[dict[int, list[int]]] = []            # the same, most likely first
        self.predictions: dict[str, list[dict[int, dict[int, list[int]]]]] = {k: [] for k in predictors}

    def new_token(self):
        self.routing.append({})
        self.router_order.append({})
        for name in self.predictors:
            self.predictions[name].append({})

    def experts(self, layer, ids, residual, x):
        self.routing[-1][layer] = sorted(set(ids.flatten().tolist()))
        for name, predictor in self.predictors.items():
            guesses = predictor.predict(layer, residual)
            self.predictions[name][-1][layer] = {target: ranked.tolist() for target, ranked in guesses.items()}
        return self.resident.experts(layer, ids, residual, x)

    def router(self, layer, logits, top_k, renormalize):
        weights, ids = own_routing(layer, logits, top_k, renormalize)
        self.router_order[-1][layer] = ids[0].tolist()
        return weights, ids


def record(model_dir: Path, text_file: Path, tokens: int, window: int):
    engine = Engine.load(RuntimeConfig(model=model_dir, device="cpu", dtype="float32"), progress=False)
    config, model = engine.config, engine.model
    predictors = {"norm": GatePredictor(config, model.weights.layers, max(DEPTHS), max(PREDICTED), apply_norm=True),
                  "raw": GatePredictor(config, model.weights.layers, max(DEPTHS), max(PREDICTED), apply_norm=False)}
    recorder = RecordingProvider(model.provider, predictors)
    model.provider, model.router = recorder, recorder.router
    ids = engine.tokenizer.encode(text_file.read_text())[:tokens]
    if len(ids) < tokens:
        sys.exit(f"error: {text_file} has only {len(ids)} tokens")
    cache = KVCache.allocate(config, 1, window, "cpu", torch.float32)
    for i, token in enumerate(ids):
        recorder.new_token()
        model(torch.tensor([[token]]), cache, start_pos=i % window)
    return config, recorder


def lru_hit_rates(config, routing, slots: int, predictions=None, predicted: int = 0, depth: int = 1) -> dict[int, float]:
    """Per-layer hit rate of the provider's LRU (LayerCache), optionally with prefetch as the provider does it."""
    caches = {layer: LayerCache(slots, 1, LayerStats()) for layer in config.moe_layers}
    order = {layer: i for i, layer in enumerate(config.moe_layers)}
    for t, token_routing in enumerate(routing):
        for layer in config.moe_layers:
            for action, _, _ in caches[layer].schedule(token_routing[layer]):
                if action == "issued" and predicted:
                    for target, ranked in predictions[t][layer].items():
                        if order[target] - order[layer] > depth:
                            continue
                        protected = set()
                        for expert in ranked[:min(predicted, slots)]:
                            protected.add(expert)
                            caches[target].prefetch(expert, protected)
    return {layer: cache.stats.hit_rate for layer, cache in caches.items()}


def classic_lru_hit_rates(config, routing, slots: int) -> dict[int, float]:
    """Each expert use looked up in turn (router order: most likely first); a miss inserts it,
    evicting the least recently used, which may be the token's other expert."""
    rates = {}
    for layer in config.moe_layers:
        lru, hits, uses = OrderedDict(), 0, 0
        for token_routing in routing:
            for expert in token_routing[layer]:
                uses += 1
                if expert in lru:
                    hits += 1
                    lru.move_to_end(expert)
                else:
                    if len(lru) == slots:
                        lru.popitem(last=False)
                    lru[expert] = None
        rates[layer] = hits / uses
    return rates


def recall_precision(config, routing, predictions, predicted: int, depth: int) -> tuple[float, float]:
    stats = LayerStats()
    order = {layer: i for i, layer in enumerate(config.moe_layers)}
    for t, token_routing in enumerate(routing):
        for layer in config.moe_layers:
            for target, ranked in predictions[t][layer].items():
                if order[target] - order[layer] == depth:
                    stats.record_prediction(depth, ranked[:predicted], token_routing[target])
    hit = stats.predicted_used[depth]
    return hit / stats.used_predicted[depth], hit / stats.predicted[depth]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "reference-moe-32l")
    parser.add_argument("--text", type=Path, default=REPO / "data" / "eval-networkx.txt")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=None, help="tokens per KV-cache window (default: --tokens, one sequence)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/routing_locality_<model>.json)")
    args = parser.parse_args()
    window = args.window or args.tokens
    torch.set_num_threads(args.threads)
    started = time.time()
    config, rec = record(args.model, args.text, args.tokens, window)
    result = {"model": args.model.name, "text": args.text.name, "tokens": args.tokens, "window": window,
              "dtype": "float32", "device": "cpu", "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "lru": {}, "classic_lru": {}, "prefetch_recall": {}, "lru_with_prefetch": {}}
    for slots in SLOTS:
        per_layer = lru_hit_rates(config, rec.routing, slots)
        classic = classic_lru_hit_rates(config, rec.router_order, slots)
        result["lru"][slots] = {"mean": mean(per_layer.values()), "per_layer": per_layer}
        result["classic_lru"][slots] = {"mean": mean(classic.values()), "per_layer": classic}
        for predicted in (1, 2):
            rates = lru_hit_rates(config, rec.routing, slots, rec.predictions["norm"], predicted, depth=1)
            result["lru_with_prefetch"][f"{slots}_slots_{predicted}_predicted_d1"] = mean(rates.values())
    for name in ("norm", "raw"):
        for depth in DEPTHS:
            for predicted in PREDICTED:
                recall, precision = recall_precision(config, rec.routing, rec.predictions[name], predicted, depth)
                result["prefetch_recall"][f"{name}_d{depth}_n{predicted}"] = {"recall": recall, "precision": precision}
    result["seconds"] = time.time() - started

    print(f"{args.model.name}: {args.tokens} tokens of {args.text.name}, window {window}, fp32 CPU")
    print("slots | LRU hit rate (mean of layers) | classic one-at-a-time LRU | LRU + prefetch top-1 / top-2 (d=1)")
    for slots in SLOTS:
        p = result["lru_with_prefetch"]
        print(f"{slots} | {result['lru'][slots]['mean']:.3f} | {result['classic_lru'][slots]['mean']:.3f} | "
              f"{p[f'{slots}_slots_1_predicted_d1']:.3f} / {p[f'{slots}_slots_2_predicted_d1']:.3f}")
    print("predictor | lookahead | predicted | recall | precision")
    for key, value in result["prefetch_recall"].items():
        name, depth, n = key.split("_")
        print(f"{name} | {depth[1:]} | {n[1:]} | {value['recall']:.3f} | {value['precision']:.3f}")
    out = args.out or REPO / "benchmarks" / "results" / f"routing_locality_{args.model.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("model", "tokens", "window", "seconds")}
                     | {"lru_mean": {s: round(result["lru"][s]["mean"], 4) for s in SLOTS}}))


if __name__ == "__main__":
    main()
