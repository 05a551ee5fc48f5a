"""Quantized checkpoints: HQQ on load, or written once and memory-mapped after.

    ckpt = open_checkpoint("Mixtral-8x7B", QuantConfig.parse("4/2"), device)   # quantize on load
    write_quantized("Mixtral-8x7B", "mixtral-4-2", QuantConfig.parse("4/2"))  # or write it once ...
    ckpt = open_checkpoint("mixtral-4-2")                                      # ... and map it
    expert_format, expert_buffer = ckpt.expert_storage(dtype)                  # engine.expert_storage's seam
    weights = ckpt.dense_weights(device, dtype)                                # quantized roles as QuantizedWeight

A quantized folder is the source folder's config.json with a `quantization_config` naming our format
and its version (so other tools refuse the folder by name), its tokenizer files, `quantization.json`
(the QuantConfig, the format version and each expert's byte size) and one `model.safetensors`:
- a quantized non-expert weight is stored under its hub name as one uint8 buffer (weight.py's
  PackedFormat of that one matrix);
- a quantized expert is ONE uint8 tensor `...experts.{e}.hqq`: exactly the buffer that
  HQQExpertFormat.view reads, so the offload store maps it straight from the file;
- everything else (norms, embeddings, unquantized roles) keeps its hub name and dtype.
Which weight has which role is decided by one table, `role_of`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint import Checkpoint, CheckpointError, dense_tensor_shapes, expert_shapes, expert_tensor_names, experts_fused
from ..config import ConfigError, ModelConfig, QuantConfig, QuantSpec
from ..experts import DenseExpertFormat, ExpertFormat
from .weight import HQQExpertFormat, PackedFormat

FORMAT, VERSION = "moe-offload-hqq", 4   # 3: each row's codes a bit stream along K, rows innermost; 4: meta (runs, 4)
SETTINGS_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")   # config.json is rewritten
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}


def role_of(name: str) -> str | None:
    """The QuantConfig role of a non-expert hub tensor, or None for tensors never quantized (norms,
    biases, embeddings, the 1-row shared-expert gate, latent attention's kv_b_proj)."""
    if name == "lm_head.weight":
        return "head"
    if name.endswith("kv_b_proj.weight"):
        return None          # latent attention's up-projection: the model splits it per head and absorbs it
    if ".self_attn." in name and name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
        return "attention"
    if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
        return "shared"      # dense MLP layers and shared experts; routed experts are not dense tensors
    if name.endswith(".gate.weight"):
        return "router"
    return None


def spec_for(quant: QuantConfig, name: str) -> QuantSpec | None:
    role = role_of(name)
    return getattr(quant, role) if role else None


def dense_nbytes(config: ModelConfig, dtype: torch.dtype, quant: QuantConfig | None = None) -> int:
    """Bytes of the non-expert weights as the model holds them: each quantized role's matrix as its packed
    buffer (QuantizedCheckpoint.dense_tensor), every other tensor in `dtype`."""
    total = 0
    for name, shape in dense_tensor_shapes(config).items():
        spec = None if quant is None else spec_for(quant, name)
        total += math.prod(shape) * dtype.itemsize if spec is None else PackedFormat([(shape, spec)]).nbytes
    return total


def expert_buffer_name(config, layer: int, expert_id: int) -> str:
    w1_name = expert_tensor_names(config, layer, expert_id)[0]      # ...experts.{e}.w1.weight
    return w1_name.rsplit(".", 2)[0] + ".hqq"


@dataclass
class QuantizedCheckpoint(Checkpoint):
    """A Checkpoint whose weights come back quantized as `quant` says: from a quantized folder's
    buffers (`stored`), or quantized here from a Hugging Face folder, on `quantize_device`."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    stored: bool = False
    quantize_device: torch.device | None = None
    mapped: dict[str, tuple[Path, int, int]] = field(default_factory=dict)   # uint8 tensor -> (file, offset, nbytes)
    maps: dict[Path, np.memmap] = field(default_factory=dict)

    def dense_tensor(self, name, shape, device, dtype):
        spec = spec_for(self.quant, name)
        if spec is None:
            return super().dense_tensor(name, shape, device, dtype)
        fmt = PackedFormat([(shape, spec)])
        if self.stored:
            buffer = self.buffer(name, fmt.nbytes)
        else:
            buffer = fmt.pack([self.tensor(name, shape)], self.quantize_device)
        (weight,) = fmt.view(buffer.to(device))
        return weight

    def expert_format(self, dtype: torch.dtype) -> ExpertFormat:
        cfg = self.config
        if self.quant.experts is None:
            return DenseExpertFormat(cfg.hidden_size, cfg.expert_ffn, dtype, cfg.expert_bias)
        return HQQExpertFormat(cfg.hidden_size, cfg.expert_ffn, self.quant.experts, self.quantize_device, cfg.expert_bias)

    def expert_storage(self, dtype: torch.dtype) -> tuple[ExpertFormat, Callable[[int, int], torch.Tensor]]:
        """The expert format and (layer, expert) -> packed uint8 CPU buffer: a view of the mapped
        file for a quantized folder, quantize-and-pack otherwise."""
        fmt = self.expert_format(dtype)
        if self.stored and self.quant.experts is not None:
            return fmt, lambda layer, expert_id: self.buffer(expert_buffer_name(self.config, layer, expert_id), fmt.nbytes)
        return fmt, lambda layer, expert_id: fmt.pack(self.expert(layer, expert_id))

    def buffer(self, name: str, nbytes: int) -> torch.Tensor:
        """A stored uint8 tensor as a read-only-in-spirit view of the memory-mapped file (copy on write)."""
        if name not in self.mapped:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing; the folder was not written by this "
                                  f"version of `moe-offload quantize`, quantize it again")
        path, offset, size = self.mapped[name]
        if size != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} has {size} bytes but {SETTINGS_FILE} implies {nbytes}; "
                                  f"the folder is damaged or mismatched, quantize it again")
        if path not in self.maps:
            self.maps[path] = np.memmap(path, dtype=np.uint8, mode="c")
        return torch.from_numpy(self.maps[path][offset:offset + size])


def is_quantized(folder) -> bool:
    """Whether `folder` was written by `write_quantized` (`moe-offload quantize`)."""
    return (Path(folder) / SETTINGS_FILE).is_file()


def quantization_config() -> dict:
    """config.json's `quantization_config` of a folder we write: transformers, vLLM and others read `quant_method`."""
    return {"quant_method": FORMAT, "version": VERSION}


PUBLISHED_FORMATS = ("mxfp4", "fp8")   # as checkpoints are published: gpt-oss's MXFP4 experts, DeepSeek-V3's
                                        # block-scaled float8 weights (checkpoint.py reads both as they are)


def _check_quantization_config(ckpt: Checkpoint, ours: bool) -> None:
    """A quantized folder of ours may name our format and version in config.json (older ones name nothing); any
    other folder must name no quantization, or one of PUBLISHED_FORMATS: we read neither GPTQ, AWQ nor the rest."""
    declared = ckpt.hf_config.get("quantization_config")
    if declared is None:
        return
    method = declared.get("quant_method") if isinstance(declared, dict) else declared
    if (ours and declared == quantization_config()) or (not ours and method in PUBLISHED_FORMATS):
        return
    path = ckpt.folder / "config.json"
    if method == FORMAT:
        raise CheckpointError(f"{path}: quantization_config names {FORMAT} version {declared.get('version')!r} but "
                              f"{SETTINGS_FILE} is {'version ' + str(VERSION) if ours else 'missing'}; "
                              f"quantize the model again with `moe-offload quantize`")
    raise CheckpointError(f"{path}: quantization_config names {method!r}, a format moe-offload does not read; pass "
                          f"the unquantized Hugging Face folder (and --quant, or `moe-offload quantize`)")


def open_checkpoint(folder, quant: QuantConfig | None = None, device=None) -> Checkpoint:
    """A Hugging Face folder (quantized on load when `quant` is given) or a quantized folder."""
    folder = Path(folder)
    if not is_quantized(folder):
        ckpt = Checkpoint.open(folder)
        _check_quantization_config(ckpt, ours=False)
        if quant is None:
            return ckpt
        return QuantizedCheckpoint(ckpt.folder, ckpt.config, ckpt.hf_config, ckpt.file_of, quant=quant,
                                   quantize_device=device)
    stored = read_settings(folder)
    if quant is not None and quant != stored:
        raise CheckpointError(f"{folder} is already quantized ({describe(stored)}); drop --quant, or quantize the "
                              f"original model folder instead")
    ckpt = Checkpoint.open(folder)
    _check_quantization_config(ckpt, ours=True)
    ckpt = QuantizedCheckpoint(ckpt.folder, ckpt.config, ckpt.hf_config, ckpt.file_of, quant=stored, stored=True,
                               mapped=_uint8_tensors(folder / WEIGHTS_FILE))
    _check_expert_sizes(ckpt)
    return ckpt


def describe(quant: QuantConfig) -> str:
    def one(spec):
        return "16-bit" if spec is None else f"{spec.bits}-bit g{spec.group_size}" + (" 8-bit meta" if spec.quant_meta else "")
    return ", ".join(f"{role} {one(spec)}" for role, spec in vars(quant).items() if spec is not None) or "nothing quantized"


def read_settings(folder: Path) -> QuantConfig:
    path = folder / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text())
        if settings.get("format") != FORMAT or settings.get("version") != VERSION:
            raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} file; quantize the model again with "
                                  f"`moe-offload quantize`")
        return QuantConfig.from_json(settings["quant"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{path}: damaged quantization settings ({e}); quantize the model again") from None


def _uint8_tensors(path: Path) -> dict[str, tuple[Path, int, int]]:
    """Every uint8 tensor of a safetensors file: name -> (file, byte offset, nbytes); checks the file is whole."""
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); quantize the model again") from None
    data_start = 8 + header_size
    file_size = path.stat().st_size
    mapped = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if data_start + end > file_size:
            raise CheckpointError(f"{path}: truncated ({file_size} bytes, tensor {name!r} ends at {data_start + end}); "
                                  f"quantize the model again")
        if entry["dtype"] == "U8":
            mapped[name] = (path, data_start + begin, end - begin)
    return mapped


def _check_expert_sizes(ckpt: QuantizedCheckpoint) -> None:
    """Fail at open, with one line, when any expert buffer is missing or of the wrong size."""
    if ckpt.quant.experts is None:
        return
    nbytes = ckpt.expert_format(torch.float32).nbytes
    for layer in ckpt.config.moe_layers:
        for expert_id in range(ckpt.config.num_experts):
            name = expert_buffer_name(ckpt.config, layer, expert_id)
            if name not in ckpt.mapped or ckpt.mapped[name][2] != nbytes:
                raise CheckpointError(f"{ckpt.folder / WEIGHTS_FILE}: expert tensor {name!r} is missing or not "
                                      f"{nbytes} bytes as {SETTINGS_FILE} implies; quantize the model again")


def write_quantized(source, out, quant: QuantConfig, device=None, progress_bar=None) -> int:
    """Quantize the Hugging Face folder `source` into the new folder `out`; returns the weights' bytes.

    Every setting is checked before any work starts; then `progress_bar(total)` (e.g. a tqdm
    factory) is told of each tensor written. Writes into a temporary folder beside `out` and
    renames it at the end: `out` is complete or absent.
    """
    source, out = Path(source), Path(out)
    if is_quantized(source):
        raise CheckpointError(f"{source} is already quantized; pass the original Hugging Face model folder")
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new --out folder or remove it")
    ckpt = QuantizedCheckpoint(**vars(open_checkpoint(source)), quant=quant, quantize_device=device)
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such folder to write {out.name} into")
    entries = _entries(ckpt)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        with progress_bar(len(entries)) if progress_bar else contextlib.nullcontext() as bar:
            size = _write_safetensors(partial / WEIGHTS_FILE, entries, bar.update if bar else None)
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, partial / name)
        hf_config = {**ckpt.hf_config, "quantization_config": quantization_config()}
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        settings = {"format": FORMAT, "version": VERSION, "quant": quant.to_json(),
                    "expert_nbytes": ckpt.expert_format(torch.float32).nbytes if quant.experts else None,
                    "source": source.name}
        (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return size


def quantized_size(ckpt: QuantizedCheckpoint) -> int:
    """Bytes of the weights `write_quantized` would write for `ckpt`, without quantizing anything."""
    return sum(math.prod(shape) * DTYPE_BYTES[dtype] for _, dtype, shape, _ in _entries(ckpt))


# An entry: (name, safetensors dtype, shape, function producing the CPU tensor)
Entry = tuple[str, str, tuple[int, ...], Callable[[], torch.Tensor]]


def _entries(ckpt: QuantizedCheckpoint) -> list[Entry]:
    entries = []
    for name, shape in dense_tensor_shapes(ckpt.config).items():
        spec = spec_for(ckpt.quant, name)
        if spec is None:
            dtype = _file_dtype(ckpt, name)
            entries.append((name, SAFETENSORS_DTYPES[dtype], shape, lambda n=name, s=shape: ckpt.tensor(n, s)))
        else:
            fmt = PackedFormat([(shape, spec)])
            entries.append((name, "U8", (fmt.nbytes,),
                            lambda n=name, s=shape, f=fmt: f.pack([ckpt.tensor(n, s)], ckpt.quantize_device)))
    cfg = ckpt.config
    if ckpt.quant.experts is None:
        if experts_fused(cfg):
            raise CheckpointError(f"{ckpt.folder}: {cfg.model_type} keeps a layer's experts in one tensor, which a "
                                  f"quantized folder does not copy; quantize the experts too (--expert-bits 2, 3 or 4)")
        for layer in cfg.moe_layers:
            for expert_id in range(cfg.num_experts):
                for name, shape in zip(expert_tensor_names(cfg, layer, expert_id), expert_shapes(cfg)):
                    dtype = _file_dtype(ckpt, name)
                    entries.append((name, SAFETENSORS_DTYPES[dtype], shape, lambda n=name, s=shape: ckpt.tensor(n, s)))
        return entries
    fmt, expert_buffer = ckpt.expert_storage(torch.float32)
    for layer in cfg.moe_layers:
        for expert_id in range(cfg.num_experts):
            entries.append((expert_buffer_name(cfg, layer, expert_id), "U8", (fmt.nbytes,),
                            lambda l=layer, e=expert_id: expert_buffer(l, e)))
    return entries


def _file_dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    with safe_open(ckpt.file_of[name], framework="pt") as f:
        dtype = f.get_slice(name).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype, torch.float32)


def _write_safetensors(path: Path, entries: list[Entry], progress) -> int:
    """A safetensors file written tensor by tensor, so the whole model is never in memory at once."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape, produce in entries:
            tensor = produce().contiguous()
            if tuple(tensor.shape) != tuple(shape) or SAFETENSORS_DTYPES[tensor.dtype] != dtype:
                raise RuntimeError(f"{name}: produced {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
            f.write(tensor.view(torch.uint8).numpy().tobytes())
            if progress:
                progress(1)
    return offset
