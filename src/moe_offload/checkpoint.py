"""Reading Hugging Face checkpoint folders, lazily, with every name mapped in one table.

    ckpt = Checkpoint.open("path/to/Mixtral-8x7B")          # config.json + safetensors (sharded or not)
    weights = ckpt.dense_weights(device, dtype)             # everything but the routed experts
    expert = ckpt.expert(layer=3, expert_id=5)              # Expert of CPU tensors in the file's dtype

Tensors are memory-mapped by safetensors and read one at a time, so loading never holds the
whole file twice. Every tensor's shape is checked against config.json as it is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .config import ConfigError, ModelConfig
from .errors import UserError
from .experts import Biased, Expert
from .model import AttentionWeights, LayerWeights, ModelWeights


class CheckpointError(UserError):
    pass


class MoeNames(NamedTuple):
    block: str                       # the MoE block's prefix in a layer
    experts: tuple[str, str, str]    # routed expert weight names for w1, w2, w3
    shared: str = "shared_expert"    # the shared expert's prefix in the block
    router: str = "gate"
    # gpt-oss: a layer's experts in two tensors, `gate_up_proj` (E, hidden, 2 ffn; gate and up columns interleaved)
    # and `down_proj` (E, ffn, hidden), with `_bias` (E, out); or as published, MXFP4 `_blocks` and `_scales` of the
    # (out, in) matrices. `experts` then names each expert's matrices only for our own files (quantized folders).
    fused: bool = False


_MLP_NAMES = ("gate_proj", "down_proj", "up_proj")  # dense MLPs and shared experts: w1, w2, w3
_MOE_NAMES = {
    "mixtral": MoeNames("block_sparse_moe", ("w1", "w2", "w3")),
    "qwen2_moe": MoeNames("mlp", _MLP_NAMES),
    "qwen3_moe": MoeNames("mlp", _MLP_NAMES),
    "olmoe": MoeNames("mlp", _MLP_NAMES),
    "phimoe": MoeNames("block_sparse_moe", ("w1", "w2", "w3")),
    "glm4_moe": MoeNames("mlp", _MLP_NAMES, shared="shared_experts"),
    "deepseek_v3": MoeNames("mlp", _MLP_NAMES, shared="shared_experts"),
    "deepseek_v2": MoeNames("mlp", _MLP_NAMES, shared="shared_experts"),
    "gpt_oss": MoeNames("mlp", _MLP_NAMES, router="router", fused=True),
}


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_tensor_names(config: ModelConfig, layer: int, expert_id: int) -> tuple[str, str, str]:
    block, names = _MOE_NAMES[config.model_type][:2]
    return tuple(f"{layer_prefix(layer)}.{block}.experts.{expert_id}.{n}.weight" for n in names)


def experts_fused(config: ModelConfig) -> bool:
    """Whether a layer's experts are stored together (gpt-oss), not as tensors of their own."""
    return _MOE_NAMES[config.model_type].fused


def expert_shapes(config: ModelConfig) -> tuple[tuple[int, int], ...]:
    return _mlp_shapes(config.hidden_size, config.expert_ffn)


def _mlp_shapes(hidden: int, ffn: int) -> tuple[tuple[int, int], ...]:
    return (ffn, hidden), (hidden, ffn), (ffn, hidden)


def dense_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor of the checkpoint: hub name -> shape."""
    c = config
    norms = ("weight", "bias") if c.norm == "layer" else ("weight",)
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
    shapes.update({f"model.norm.{n}": (c.hidden_size,) for n in norms})
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    if c.lm_head_bias:
        shapes["lm_head.bias"] = (c.vocab_size,)
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    names = _MOE_NAMES[c.model_type]
    for i in range(c.num_layers):
        p = layer_prefix(i)
        for n in norms:
            shapes[f"{p}.input_layernorm.{n}"] = (c.hidden_size,)
            shapes[f"{p}.post_attention_layernorm.{n}"] = (c.hidden_size,)
        if c.kv_lora_rank:
            shapes.update(_latent_attention_shapes(c, f"{p}.self_attn"))
        for proj, out in () if c.kv_lora_rank else (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (out, c.hidden_size)
            if c.qkv_bias:
                shapes[f"{p}.self_attn.{proj}_proj.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (c.hidden_size, c.num_heads * (c.v_head_dim or c.head_dim))
        if c.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.attention_sinks:
            shapes[f"{p}.self_attn.sinks"] = (c.num_heads,)
        if c.qk_norm == "head":
            shapes[f"{p}.self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (c.head_dim,)
        elif c.qk_norm == "full":
            shapes[f"{p}.self_attn.q_norm.weight"] = (q_out,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (kv_out,)
        if i in c.dense_layers:
            for name, shape in zip(_MLP_NAMES, _mlp_shapes(c.hidden_size, c.dense_ffn)):
                shapes[f"{p}.mlp.{name}.weight"] = shape
            continue
        shapes[f"{p}.{names.block}.{names.router}.weight"] = (c.num_experts, c.hidden_size)
        if c.router_bias:
            shapes[f"{p}.{names.block}.{names.router}.bias"] = (c.num_experts,)
        if c.score_correction_bias:
            shapes[f"{p}.{names.block}.gate.e_score_correction_bias"] = (c.num_experts,)
        if c.shared_expert_ffn:
            for name, shape in zip(_MLP_NAMES, _mlp_shapes(c.hidden_size, c.shared_expert_ffn)):
                shapes[f"{p}.{names.block}.{names.shared}.{name}.weight"] = shape
        if c.shared_expert_gated:
            shapes[f"{p}.{names.block}.shared_expert_gate.weight"] = (1, c.hidden_size)
    return shapes


def _latent_attention_shapes(c: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    q_out = c.num_heads * c.head_dim
    if c.q_lora_rank:
        shapes = {f"{prefix}.q_a_proj.weight": (c.q_lora_rank, c.hidden_size),
                  f"{prefix}.q_a_layernorm.weight": (c.q_lora_rank,),
                  f"{prefix}.q_b_proj.weight": (q_out, c.q_lora_rank)}
    else:
        shapes = {f"{prefix}.q_proj.weight": (q_out, c.hidden_size)}
    nope = c.head_dim - c.rotary_dim
    return shapes | {f"{prefix}.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.rotary_dim, c.hidden_size),
                     f"{prefix}.kv_a_layernorm.weight": (c.kv_lora_rank,),
                     f"{prefix}.kv_b_proj.weight": (c.num_heads * (nope + c.v_head_dim), c.kv_lora_rank)}


@dataclass
class Checkpoint:
    folder: Path
    config: ModelConfig
    hf_config: dict
    file_of: dict[str, Path]  # tensor name -> safetensors file
    # Open files, one per shard: opening parses the shard's whole header, which for a shard of a
    # many-expert model (Qwen3-30B-A3B: ~1150 tensors) costs more than reading a small expert.
    open_files: dict[Path, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such model folder; pass --model with a folder holding config.json and *.safetensors")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; a model folder needs config.json")
        try:
            hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        try:
            config = ModelConfig.from_hf(hf_config)
        except ConfigError as e:
            raise CheckpointError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None
        return cls(folder, config, hf_config, _index_tensors(folder))

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """One tensor as stored (CPU, the file's dtype), its shape checked."""
        path, t = self._read(name, lambda stored: stored.get_tensor(name))
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}, but config.json implies {list(shape)}"
            )
        if t.dtype == torch.float8_e4m3fn:
            return self._dequantize_fp8(name, t)
        return t

    def _dequantize_fp8(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's published weights: float8 e4m3 times `{name}_scale_inv`, one fp32 scale per block of
        quantization_config's weight_block_size (128 x 128; edge blocks smaller) -> fp32, exactly."""
        block = self.hf_config.get("quantization_config", {}).get("weight_block_size", (128, 128))
        rows, cols = weight.shape
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        scale = self.tensor(f"{name}_scale_inv", grid).float()
        scale = scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
        return weight.float() * scale

    def expert(self, layer: int, expert_id: int) -> Expert:
        if experts_fused(self.config):
            return self._fused_expert(layer, expert_id)
        names = expert_tensor_names(self.config, layer, expert_id)
        return Expert(*(self.tensor(n, s) for n, s in zip(names, expert_shapes(self.config))))

    @property
    def mxfp4_experts(self) -> bool:
        """Whether the routed experts are stored as MXFP4 blocks and scales (gpt-oss as published)."""
        block = _MOE_NAMES[self.config.model_type].block
        return f"{layer_prefix(self.config.moe_layers[0])}.{block}.experts.gate_up_proj_blocks" in self.file_of

    def _fused_expert(self, layer: int, expert_id: int) -> Expert:
        """One expert of gpt-oss's per-layer tensors, in full precision (MXFP4 dequantized exactly)."""
        from .quant import mxfp4

        c = self.config
        prefix = f"{layer_prefix(layer)}.{_MOE_NAMES[c.model_type].block}.experts"
        experts, hidden, ffn = c.num_experts, c.hidden_size, c.expert_ffn
        if self.mxfp4_experts:
            def matrix(name, rows, cols):
                blocks = self.tensor_slice(f"{prefix}.{name}_blocks", expert_id, (experts, rows, cols // 32, 16))
                scales = self.tensor_slice(f"{prefix}.{name}_scales", expert_id, (experts, rows, cols // 32))
                return mxfp4.dequantize(blocks.reshape(rows, cols // 2), scales)
            gate_up, down = matrix("gate_up_proj", 2 * ffn, hidden), matrix("down_proj", hidden, ffn)
        else:
            gate_up = self.tensor_slice(f"{prefix}.gate_up_proj", expert_id, (experts, hidden, 2 * ffn)).t()
            down = self.tensor_slice(f"{prefix}.down_proj", expert_id, (experts, ffn, hidden)).t()
        gate_up_bias = self.tensor_slice(f"{prefix}.gate_up_proj_bias", expert_id, (experts, 2 * ffn))
        down_bias = self.tensor_slice(f"{prefix}.down_proj_bias", expert_id, (experts, hidden))
        return Expert(Biased(gate_up[0::2], gate_up_bias[0::2]), Biased(down, down_bias),
                      Biased(gate_up[1::2], gate_up_bias[1::2]))

    def tensor_slice(self, name: str, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """tensor[index] of a stored tensor whose whole shape is checked to be `shape`, reading only that slice."""
        def read_slice(stored):
            tensor = stored.get_slice(name)
            stored_shape = tuple(tensor.get_shape())
            return stored_shape, tensor[index] if stored_shape == tuple(shape) else None

        path, (stored_shape, t) = self._read(name, read_slice)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(stored_shape)}, but config.json implies "
                                  f"{list(shape)}")
        return t

    def _read(self, name: str, read):
        """-> (the file holding tensor `name`, read(that file's safetensors handle)), with one line for a missing
        tensor or a damaged file."""
        path = self.file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        try:
            if path not in self.open_files:
                self.open_files[path] = safe_open(path, framework="pt")
            return path, read(self.open_files[path])
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); the file is damaged, download it again") from None

    def dense_weights(self, device, dtype, progress=None) -> ModelWeights:
        """All non-expert weights on `device` in `dtype`. `progress(n)` is told of each tensor read."""
        shapes = dense_tensor_shapes(self.config)

        def get(name, as_dtype=dtype):
            t = self.dense_tensor(name, shapes[name], device, as_dtype)
            if progress:
                progress(1)
            return t

        def opt(name):
            return get(name) if name in shapes else None

        def mlp(prefix):
            return Expert(*(get(f"{prefix}.{n}.weight") for n in _MLP_NAMES))

        cfg = self.config
        names = _MOE_NAMES[cfg.model_type]
        block, shared = names.block, names.shared
        layers = []
        for i in range(cfg.num_layers):
            p = layer_prefix(i)
            attn = self._latent_attention_weights(f"{p}.self_attn", get, opt) if cfg.kv_lora_rank else AttentionWeights(
                wq=get(f"{p}.self_attn.q_proj.weight"),
                wk=get(f"{p}.self_attn.k_proj.weight"),
                wv=get(f"{p}.self_attn.v_proj.weight"),
                wo=get(f"{p}.self_attn.o_proj.weight"),
                bq=opt(f"{p}.self_attn.q_proj.bias"),
                bk=opt(f"{p}.self_attn.k_proj.bias"),
                bv=opt(f"{p}.self_attn.v_proj.bias"),
                bo=opt(f"{p}.self_attn.o_proj.bias"),
                q_norm=opt(f"{p}.self_attn.q_norm.weight"),
                k_norm=opt(f"{p}.self_attn.k_norm.weight"),
                sinks=opt(f"{p}.self_attn.sinks"),
            )
            dense = i in cfg.dense_layers
            correction = f"{p}.{block}.gate.e_score_correction_bias"
            layers.append(LayerWeights(
                attn_norm=get(f"{p}.input_layernorm.weight"),
                attn=attn,
                mlp_norm=get(f"{p}.post_attention_layernorm.weight"),
                router=None if dense else get(f"{p}.{block}.{names.router}.weight"),
                router_bias=opt(f"{p}.{block}.{names.router}.bias"),
                dense_mlp=mlp(f"{p}.mlp") if dense else None,
                shared_expert=mlp(f"{p}.{block}.{shared}") if cfg.shared_expert_ffn and not dense else None,
                shared_expert_gate=opt(f"{p}.{block}.shared_expert_gate.weight"),
                attn_norm_bias=opt(f"{p}.input_layernorm.bias"),
                mlp_norm_bias=opt(f"{p}.post_attention_layernorm.bias"),
                # the correction decides between near-equal sigmoid scores: kept in fp32, as transformers keeps it
                score_correction=get(correction, torch.float32) if correction in shapes else None,
            ))
        embed = get("model.embed_tokens.weight")
        return ModelWeights(
            embed=embed,
            layers=layers,
            norm=get("model.norm.weight"),
            lm_head=embed if cfg.tie_word_embeddings else get("lm_head.weight"),
            norm_bias=opt("model.norm.bias"),
            lm_head_bias=opt("lm_head.bias"),
        )

    @staticmethod
    def _latent_attention_weights(prefix: str, get, opt) -> AttentionWeights:
        low_rank = opt(f"{prefix}.q_a_proj.weight")
        return AttentionWeights(
            wq=get(f"{prefix}.q_b_proj.weight" if low_rank is not None else f"{prefix}.q_proj.weight"),
            wk=None, wv=None,
            wo=get(f"{prefix}.o_proj.weight"),
            wq_a=low_rank,
            q_a_norm=opt(f"{prefix}.q_a_layernorm.weight"),
            wkv_a=get(f"{prefix}.kv_a_proj_with_mqa.weight"),
            kv_a_norm=get(f"{prefix}.kv_a_layernorm.weight"),
            wkv_b=get(f"{prefix}.kv_b_proj.weight"),
        )

    def dense_tensor(self, name: str, shape: tuple[int, ...], device, dtype):
        """One non-expert weight as the model uses it; quant/checkpoint.py returns quantized weights here."""
        return self.tensor(name, shape).to(device=device, dtype=dtype)

    def num_dense_tensors(self) -> int:
        return len(dense_tensor_shapes(self.config))


def _index_tensors(folder: Path) -> dict[str, Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        files = {name: folder / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {index_path.name} but missing")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{folder}: no *.safetensors files; a model folder needs its weights in safetensors format")
    files = {}
    for path in shards:
        try:
            with safe_open(path, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated, download it again") from None
    return files
