"""LoRA adapters: a seam beside the model's math, as quantized weights are (`.linear(x)` objects).

    adapters = Adapters.create(config, LoraConfig(rank=8, alpha=16, targets=("attention", "experts")))
    weights = adapters.attach(model.weights)            # a copy whose targeted matrices are LoraWeight
    provider = LoraExperts(model.provider, adapters)    # each expert it brings carries its own adapter
    adapters.save(folder, config)                       # PEFT's adapter_config.json + adapter_model.safetensors
    adapters = Adapters.load(folder, config)

A LoraWeight is its frozen base (a tensor or a quantized weight) plus (alpha / rank) B A, computed in fp32.
The adapters are kept exactly as PEFT lays them out on transformers' model, so saving is renaming:
attention's q/k/v/o_proj are `lora.Linear`s (A (r, in), B (out, r)); the router and each layer's experts are
PEFT `target_parameters` (`ParamWrapper`): the router's 2-D weight like a Linear, the experts' 3-D
`gate_up_proj` (E, 2 ffn, hidden) and `down_proj` (E, hidden, ffn) with A (E r, in) (expert e: rows e r..e r + r)
and B (out, E r) (expert e: columns e, E + e, 2 E + e, ...). So an expert's gate and up share one A, as they
do in PEFT: gate_up is one matrix there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import LoraConfig, ModelConfig
from .errors import UserError
from .experts import DenseExpertFormat, Expert
from .model import LayerWeights, ModelWeights, linear

ATTENTION = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj"}
# model_type -> the router's module in transformers' model (the experts are `mlp.experts` in every one of these)
ROUTER_MODULE = {"mixtral": "mlp.gate", "qwen2_moe": "mlp.gate", "qwen3_moe": "mlp.gate", "olmoe": "mlp.gate",
                 "glm4_moe": "mlp.gate", "phimoe": "mlp.router"}
# PEFT nests the ParamWrappers of one module in its parameters' order: gate_up_proj inside, down_proj outside
EXPERT_MODULE = {"gate_up": "mlp.experts.base_layer", "down": "mlp.experts"}
PREFIX = "base_model.model.model.layers"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraWeight:
    """base x + scale B (A x): the low-rank part in the adapters' dtype (fp32), added in the base's."""

    base: object
    a: torch.Tensor     # (rank, in)
    b: torch.Tensor     # (out, rank)
    scale: float

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.base)
        return y + (F.linear(F.linear(x.to(self.a.dtype), self.a), self.b) * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        return self.scale * self.b @ self.a


def check_family(config: ModelConfig) -> None:
    if config.model_type not in ROUTER_MODULE or config.kv_lora_rank or config.expert_bias:
        raise UserError(f"LoRA: model_type {config.model_type!r} is not supported; supported: "
                        f"{', '.join(ROUTER_MODULE)}")


def shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int, int]]:
    """Each target matrix of a layer -> (out, in, stacked experts), for the targets `lora` names."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = {}
    if "attention" in lora.targets:
        out |= {"wq": (q, c.hidden_size, 1), "wk": (kv, c.hidden_size, 1), "wv": (kv, c.hidden_size, 1),
                "wo": (c.hidden_size, q, 1)}
    if "router" in lora.targets:
        out["router"] = (c.num_experts, c.hidden_size, 1)
    if "experts" in lora.targets:
        out |= {"gate_up": (2 * c.expert_ffn, c.hidden_size, c.num_experts),
                "down": (c.hidden_size, c.expert_ffn, c.num_experts)}
    return out


class Adapters:
    """Every adapter of a model: (layer, target) -> (A, B) fp32 leaf tensors in PEFT's layout."""

    def __init__(self, lora: LoraConfig, pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]):
        self.lora = lora
        self.pairs = pairs

    @classmethod
    def create(cls, config: ModelConfig, lora: LoraConfig, device="cpu", seed: int = 0) -> "Adapters":
        """A as PEFT initialises it (Kaiming-uniform, a = sqrt 5), B zero: the model starts unchanged."""
        check_family(config)
        generator = torch.Generator().manual_seed(seed)
        pairs = {}
        for layer in range(config.num_layers):
            for target, (rows, cols, experts) in shapes(config, lora).items():
                if target in ("router", "gate_up", "down") and layer not in config.moe_layers:
                    continue
                bound = 1 / math.sqrt(cols)    # kaiming_uniform_(a=sqrt(5)) on a (rank, cols) matrix
                a = (torch.rand(lora.rank * experts, cols, generator=generator) * 2 - 1) * bound
                b = torch.zeros(rows, lora.rank * experts)
                pairs[layer, target] = a.to(device).requires_grad_(), b.to(device).requires_grad_()
        return cls(lora, pairs)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.pairs.values() for t in pair]

    def layer_parameters(self, layer: int, targets: Sequence[str]) -> list[torch.Tensor]:
        return [t for target in targets if (layer, target) in self.pairs for t in self.pairs[layer, target]]

    def weight(self, layer: int, target: str, base: object, expert: int = 0, rows: slice = slice(None)) -> LoraWeight:
        a, b = self.pairs[layer, target]
        experts, rank = a.shape[0] // self.lora.rank, self.lora.rank
        return LoraWeight(base, a[expert * rank:(expert + 1) * rank], b[rows, expert::experts], self.lora.scale)

    # -- the model's weights with adapters -------------------------------------------------------

    def attach(self, weights: ModelWeights) -> ModelWeights:
        """A copy of `weights` whose attention and router matrices carry their adapters (the experts: LoraExperts)."""
        return replace(weights, layers=[self._layer(i, layer) for i, layer in enumerate(weights.layers)])

    def _layer(self, index: int, layer: LayerWeights) -> LayerWeights:
        attn = replace(layer.attn, **{name: self.weight(index, name, getattr(layer.attn, name))
                                      for name in ATTENTION if (index, name) in self.pairs})
        router = self.weight(index, "router", layer.router) if (index, "router") in self.pairs else layer.router
        return replace(layer, attn=attn, router=router)

    def expert(self, layer: int, expert_id: int, base: Expert) -> Expert:
        if (layer, "gate_up") not in self.pairs:
            return base
        ffn = self.pairs[layer, "gate_up"][1].shape[0] // 2
        return Expert(w1=self.weight(layer, "gate_up", base.w1, expert_id, slice(0, ffn)),
                      w2=self.weight(layer, "down", base.w2, expert_id),
                      w3=self.weight(layer, "gate_up", base.w3, expert_id, slice(ffn, 2 * ffn)))

    def merged(self, weights: ModelWeights) -> ModelWeights:
        """For inference: attention and router adapters added into plain-tensor weights (rounded once to their
        dtype); quantized ones keep theirs on the fly."""
        return replace(weights, layers=[_merge_layer(self._layer(i, layer)) for i, layer in enumerate(weights.layers)])

    def merged_expert(self, layer: int, expert_id: int, base: Expert) -> Expert:
        """A full-precision expert with its adapter added, in fp32 (the format's pack rounds it once)."""
        return Expert(*(_merge(w) for w in self.expert(layer, expert_id, base)))

    # -- PEFT's files ------------------------------------------------------------------------------

    def state_dict(self, config: ModelConfig) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, target), (a, b) in self.pairs.items():
            module = _module(config, target)
            out[f"{PREFIX}.{layer}.{module}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            out[f"{PREFIX}.{layer}.{module}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        return out

    def save(self, folder: Path, config: ModelConfig) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        targets = self.lora.targets
        peft = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.lora.rank, "lora_alpha": self.lora.alpha,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": None,
            "target_modules": sorted(m.split(".")[-1] for m in ATTENTION.values()) if "attention" in targets else None,
            "target_parameters": ([f"{ROUTER_MODULE[config.model_type]}.weight"] if "router" in targets else [])
                                 + (["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if "experts" in targets else []),
        }
        _write_atomically(folder / WEIGHTS_FILE, lambda path: save_file(self.state_dict(config), path))
        _write_atomically(folder / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(peft, indent=2) + "\n"))

    @classmethod
    def load(cls, folder: Path, config: ModelConfig, device="cpu") -> "Adapters":
        """A PEFT LoRA folder (ours, or PEFT's own for these targets) -> Adapters; one error line for what does
        not fit the model."""
        folder = Path(folder)
        check_family(config)
        try:
            peft = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(folder / WEIGHTS_FILE)
        except (OSError, ValueError) as e:
            raise UserError(f"--lora {folder}: not a PEFT adapter folder ({CONFIG_FILE} and {WEIGHTS_FILE}): {e}") from None
        if peft.get("peft_type") != "LORA" or peft.get("use_dora") or peft.get("use_rslora"):
            raise UserError(f"--lora {folder}: only plain LoRA adapters are supported (peft_type LORA, no DoRA or rsLoRA)")
        lora = LoraConfig(rank=int(peft["r"]), alpha=float(peft["lora_alpha"]), targets=_targets(peft, config, folder))
        expected = shapes(config, lora)
        pairs = {}
        for layer in range(config.num_layers):
            for target, (rows, cols, experts) in expected.items():
                a_name = f"{PREFIX}.{layer}.{_module(config, target)}.lora_A.weight"
                if a_name not in tensors:
                    continue
                a, b = tensors[a_name], tensors.get(a_name.replace("lora_A", "lora_B"))
                if b is None or a.shape != (lora.rank * experts, cols) or b.shape != (rows, lora.rank * experts):
                    raise UserError(f"--lora {folder}: {a_name} and its lora_B do not fit this model (expected "
                                    f"({lora.rank * experts}, {cols}) and ({rows}, {lora.rank * experts}))")
                pairs[layer, target] = a.float().to(device), b.float().to(device)
        if not pairs:
            raise UserError(f"--lora {folder}: no adapter tensor names a module of this model")
        return cls(lora, pairs)


class LoraExperts:
    """An ExpertProvider whose experts carry their adapters: each batch of the inner provider, with the expert in
    each slot wrapped (the inner provider says which expert a slot holds). The format runs no grouped kernels:
    those know nothing of adapters."""

    def __init__(self, inner, adapters: Adapters):
        self.inner = inner
        self.adapters = adapters
        self.expert_format = Ungrouped(inner.expert_format)

    def __getattr__(self, name):        # summary(), holds_at_once(), caches...: the inner provider's
        return getattr(self.inner, name)

    def experts(self, layer, ids, residual, x):
        for batch in self.inner.experts(layer, ids, residual, x):
            yield batch._replace(experts=AdaptedSlots(self.adapters, layer, batch.experts, self.inner.slot_experts(layer)))


class AdaptedSlots(Sequence):
    """A layer's slot experts, each with the adapter of the expert it holds, wrapped when asked for."""

    def __init__(self, adapters: Adapters, layer: int, experts: Sequence[Expert], held: dict[int, int]):
        self.adapters, self.layer, self.base, self.held = adapters, layer, experts, held

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, slot: int) -> Expert:
        return self.adapters.expert(self.layer, self.held[slot], self.base[slot])


class Ungrouped:
    """An expert format, but every expert runs on its own."""

    def __init__(self, inner):
        self.inner = inner
        self.nbytes = inner.nbytes

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def runs_grouped(self, x: torch.Tensor, top_k: int) -> bool:
        return False


def merges_experts(expert_format) -> bool:
    """Whether adapters can be added into this format's experts before they are packed (unquantized ones)."""
    return type(expert_format) is DenseExpertFormat


def _merge(weight):
    """A LoraWeight over a plain tensor -> that tensor plus its update, in fp32; anything else as it is."""
    if isinstance(weight, LoraWeight) and isinstance(weight.base, torch.Tensor):
        return weight.base.float() + weight.delta().to(weight.base.device)
    return weight


def _merge_layer(layer: LayerWeights) -> LayerWeights:
    def rounded(w):
        merged = _merge(w)
        return merged.to(w.base.dtype) if merged is not w else w

    attn = replace(layer.attn, **{name: rounded(getattr(layer.attn, name)) for name in ATTENTION})
    return replace(layer, attn=attn, router=rounded(layer.router))


def _module(config: ModelConfig, target: str) -> str:
    if target in ATTENTION:
        return ATTENTION[target]
    return ROUTER_MODULE[config.model_type] if target == "router" else EXPERT_MODULE[target]


def _targets(peft: dict, config: ModelConfig, folder: Path) -> tuple[str, ...]:
    modules = set(peft.get("target_modules") or ())
    parameters = set(peft.get("target_parameters") or ())
    targets = []
    if modules:
        if not modules <= {m.split(".")[-1] for m in ATTENTION.values()}:
            raise UserError(f"--lora {folder}: target_modules {sorted(modules)}: only q_proj, k_proj, v_proj and "
                            f"o_proj are supported")
        targets.append("attention")
    router = f"{ROUTER_MODULE[config.model_type]}.weight"
    if router in parameters:
        targets.append("router")
    if {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= parameters:
        targets.append("experts")
    if parameters - {router, "mlp.experts.gate_up_proj", "mlp.experts.down_proj"} or not targets:
        raise UserError(f"--lora {folder}: target_parameters {sorted(parameters)}: supported are {router}, and "
                        f"mlp.experts.gate_up_proj with mlp.experts.down_proj")
    return tuple(targets)


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(str(partial))
    partial.replace(path)
