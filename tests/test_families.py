"""Every supported MoE family through the one engine, checked against transformers' own classes.

Tiny random checkpoints are written by transformers (`Qwen3MoeForCausalLM`, `Qwen2MoeForCausalLM`,
`OlmoeForCausalLM`, `MixtralForCausalLM`) in the hub's tensor naming (conftest.write_tiny_family),
with the options each family's config.json can switch: dense layers mixed in, top-k
renormalisation on and off, a shared expert, qkv bias, q/k norms, qkv clipping. For each family:
logits and greedy generation against transformers, offloaded == resident bit for bit, quantized
folders against transformers on the dequantized weights, perplexity, the CLI; and once: published
config.json files against the modules transformers builds, Qwen chat templates against
`apply_chat_template`, `serve` with a Qwen3 template, the planner's Qwen3-30B-A3B numbers in docs/offloading.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from moe_offload.cli import main
from moe_offload.checkpoint import dense_tensor_shapes, expert_tensor_names
from moe_offload.config import (SUPPORTED_MODEL_TYPES, ModelConfig, OffloadConfig, QuantConfig, QuantSpec,
                                RuntimeConfig, SamplingParams)
from moe_offload.engine import Engine, expert_storage
from moe_offload.experts import DenseExpertFormat
from moe_offload.generate import PREFILL_CHUNK, prefill
from moe_offload.model import KVCache, Transformer
from moe_offload.quant.checkpoint import open_checkpoint, write_quantized
from moe_offload.quant.weight import HQQExpertFormat, QuantizedWeight
from moe_offload.tokenizer import Tokenizer

from conftest import EVAL_TEXT, SHIPPED_MODEL, TINY_FAMILIES, slow_except, write_tiny_family
from test_model_matches_transformers import DECODE, PREFILL, assert_close_to_reference, our_logits, reference_logits

FAMILIES = tuple(TINY_FAMILIES)

# name -> (model_type, config overrides on top of conftest.TINY_FAMILIES)
VARIANTS = {
    "qwen3_moe-top8of16-dense-layer-renorm": ("qwen3_moe", {}),
    "qwen3_moe-no-renorm-sparse-step-2": ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[])),
    "qwen3_moe-128-experts-top8": ("qwen3_moe", dict(num_experts=128, mlp_only_layers=[])),
    "qwen3_moe-attention-bias-tied-embeddings": ("qwen3_moe", dict(attention_bias=True, tie_word_embeddings=True)),
    "qwen2_moe-shared-expert-qkv-bias-dense-layer": ("qwen2_moe", {}),
    "qwen2_moe-renorm-no-qkv-bias-sparse-step-2": (
        "qwen2_moe", dict(norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=2, mlp_only_layers=[])),
    "olmoe-clip-qkv-no-renorm": ("olmoe", {}),
    "olmoe-no-clip-renorm-attention-bias": ("olmoe", dict(clip_qkv=None, norm_topk_prob=True, attention_bias=True)),
    "mixtral-8x22b-head-ratio-top2of8": (
        "mixtral", dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2, num_local_experts=8)),
    "phimoe-biases-longrope-jitter-0.3-window-100": ("phimoe", {}),
    "phimoe-no-biases-default-rope-jitter-0.01": (
        "phimoe", dict(attention_bias=False, lm_head_bias=False, router_jitter_noise=0.01, rope_scaling=None)),
    "glm4_moe-qk-norm-qkv-bias-4-groups-scaled": ("glm4_moe", {}),
    "glm4_moe-air-like-one-group-no-qk-norm-no-renorm": (
        "glm4_moe", dict(n_group=1, topk_group=1, use_qk_norm=False, attention_bias=False, routed_scaling_factor=1.0,
                         norm_topk_prob=False, n_shared_experts=1)),
    "deepseek_v3-q-bottleneck-yarn-4-groups": ("deepseek_v3", {}),
    "deepseek_v3-no-q-bottleneck-halves-rotary-one-group-default-rope": (
        "deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1, rope_scaling=None,
                            first_k_dense_replace=0)),
    "deepseek_v2-group-limited-greedy-yarn": ("deepseek_v2", {}),
    "gpt_oss-sinks-alternating-window-24-clamped-swiglu-yarn": ("gpt_oss", {}),
    "gpt_oss-all-full-attention-published-limit": (
        "gpt_oss", dict(layer_types=["full_attention"] * 3, swiglu_limit=7.0, attention_bias=False)),
    "deepseek_v2-lite-like-greedy-q-bottleneck": (
        "deepseek_v2", dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=64, routed_scaling_factor=1.0)),
}
FIRST_VARIANTS = {model_type: name for name, (model_type, _) in reversed(VARIANTS.items())}.values()


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """model_type -> a tiny checkpoint with the family's default test settings, written once per module."""
    folders = {}

    def get(model_type):
        if model_type not in folders:
            folders[model_type] = write_tiny_family(tmp_path_factory.mktemp(model_type), model_type)
        return folders[model_type]

    return get


def load_engine(folder, **runtime) -> Engine:
    return Engine.load(RuntimeConfig(model=folder, device="cpu", dtype="float32", **runtime), progress=False)


@pytest.mark.parametrize("variant", slow_except(VARIANTS, *FIRST_VARIANTS))     # each family's first variant
def test_family_logits_match_transformers_through_prefill_and_decode(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    folder = write_tiny_family(tmp_path, model_type, **overrides)
    assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
    assert_close_to_reference(folder, vocab_size=8192)


def test_olmoe_test_checkpoint_really_clips(family_folder):
    """The clipping variant above only tests clipping if clip_qkv=1.0 changes the logits."""
    engine = load_engine(family_folder("olmoe"))
    assert engine.config.clip_qkv == 1.0
    tokens = torch.randint(3, 8192, (1, 64), generator=torch.Generator().manual_seed(1))
    unclipped = Transformer(dataclasses.replace(engine.config, clip_qkv=None), engine.model.weights, engine.model.provider)
    cache = KVCache.allocate(engine.config, 1, 64, "cpu", torch.float32)
    clipped_logits, unclipped_logits = engine.model(tokens, cache, 0), unclipped(tokens, cache, 0)
    assert (clipped_logits - unclipped_logits).abs().max() > 0.1 * clipped_logits.abs().max()


@pytest.mark.parametrize("model_type", slow_except(FAMILIES, "mixtral"))
def test_family_greedy_generation_matches_transformers_generate(family_folder, model_type):
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = family_folder(model_type)
    engine = load_engine(folder)
    ids = engine.tokenizer.encode("def fibonacci(n):\n    ")
    run = engine.stream(ids, SamplingParams(max_new_tokens=48))
    run.text()

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    eos = list(engine.tokenizer.eos_ids)
    settings = GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), generation_config=settings)[0, len(ids):].tolist()
    assert expected[-1] not in eos and len(expected) == 48, "pick a prompt whose greedy run does not end early"
    assert run.token_ids == expected
    assert run.finish_reason == "length"


def logits_through_prefill_and_decode(engine: Engine, tokens: list[int], prompt: int) -> list[torch.Tensor]:
    """Logits of every position: the first `prompt` tokens in one prefill, then one token at a time."""
    device, dtype = engine.cache.keys[0].device, engine.cache.keys[0].dtype
    cache = KVCache.allocate(engine.config, 1, len(tokens), device, dtype)
    pieces = [prefill(engine.model, cache, tokens[:prompt], device, last_only=False)]
    for pos in range(prompt, len(tokens)):
        pieces.append(engine.model(torch.tensor([[tokens[pos]]], device=device), cache, start_pos=pos)[0])
    return pieces


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("slots, prefetch", [(1, None), (3, 0)])
def test_family_offloaded_logits_equal_resident_bit_for_bit(family_folder, model_type, slots, prefetch):
    """Few slots (1 or 3 per layer; top-k is up to 8), half the experts on the disk tier, prefetch on and off."""
    assert_offloaded_equals_resident(family_folder(model_type), slots, prefetch)


def test_offloaded_equals_resident_with_128_experts_top8_and_fewer_slots_than_top_k(tmp_path):
    """Qwen3-30B-A3B's routing shape (128 experts, top-8) through 6 slots per layer."""
    folder = write_tiny_family(tmp_path, "qwen3_moe", num_experts=128, mlp_only_layers=[])
    assert_offloaded_equals_resident(folder, slots=6, prefetch=None)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_offloaded_equals_resident_bit_for_bit_on_cuda(family_folder, model_type):
    """The same on the GPU in bf16: copies on the copy stream, pinned host tier, events."""
    assert_offloaded_equals_resident(family_folder(model_type), slots=2, prefetch=None, device="cuda", dtype="bfloat16")


def assert_offloaded_equals_resident(folder, slots: int, prefetch: int | None, device="cpu", dtype="float32"):
    runtime = RuntimeConfig(model=folder, device=device, dtype=dtype)
    resident = Engine.load(runtime, progress=False)
    config = resident.config
    expert_nbytes = resident.model.provider.expert_format.nbytes
    half_in_ram = expert_nbytes * len(config.moe_layers) * config.num_experts // 2
    offload = OffloadConfig(enabled=True, gpu_memory=2**30, cpu_memory=half_in_ram, slots_per_layer=slots,
                            prefetch_experts=prefetch)
    offloaded = Engine.load(runtime, progress=False, offload=offload)
    assert offloaded.plan.disk_experts > 0 and set(offloaded.plan.slots.values()) == {slots}
    tokens = torch.randint(3, 8192, (36,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = logits_through_prefill_and_decode(resident, tokens, prompt=24)
    actual = logits_through_prefill_and_decode(offloaded, tokens, prompt=24)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    stats = offloaded.expert_stats()
    assert stats["evictions"] > 0 and stats["hits"] > 0
    assert (stats["prefetch_loads"] > 0) == (prefetch is None)


def test_generation_stops_at_every_end_listed_in_generation_config(family_folder, tmp_path):
    """Qwen's generation_config.json lists <|im_end|> and <|endoftext|>; config.json only one of them."""
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(family_folder("qwen3_moe"), tmp_path / "model")
    ids = load_engine(folder).tokenizer.encode("class Graph:\n")
    free_run = load_engine(folder).stream(ids, SamplingParams(max_new_tokens=48))
    free_run.text()
    end = next(i for i, token in enumerate(free_run.token_ids) if i >= 5 and token not in free_run.token_ids[:i])
    settings = json.loads((folder / "generation_config.json").read_text())
    settings["eos_token_id"] = [2, free_run.token_ids[end]]
    (folder / "generation_config.json").write_text(json.dumps(settings))

    run = load_engine(folder).stream(ids, SamplingParams(max_new_tokens=48))
    run.text()
    assert run.token_ids == free_run.token_ids[:end] and run.finish_reason == "stop"
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
    assert expected == free_run.token_ids[:end + 1]


# Widths that the paper's group sizes (64 for 4 bits, 16 for 2 bits) divide, as real checkpoints' do.
QUANTIZABLE = {
    "mixtral": dict(intermediate_size=128),
    "qwen3_moe": dict(head_dim=32, moe_intermediate_size=64, intermediate_size=128),
    "qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=128, intermediate_size=128),
    "olmoe": dict(intermediate_size=64),
    "phimoe": dict(intermediate_size=64),
    "glm4_moe": dict(moe_intermediate_size=32, n_shared_experts=2, intermediate_size=128),
    "deepseek_v3": dict(moe_intermediate_size=32, n_shared_experts=2, intermediate_size=128),
    "deepseek_v2": dict(moe_intermediate_size=32, n_shared_experts=2, intermediate_size=128),
    "gpt_oss": {},
}


def dequantized_checkpoint(quantized_folder, out):
    """A quantized folder with every quantized weight replaced by its dequantized values, by hub name:
    what transformers should compute to agree with our quantized model."""
    from safetensors.torch import save_file

    ckpt = open_checkpoint(quantized_folder)
    cfg = ckpt.config
    tensors = {}
    for name, shape in dense_tensor_shapes(cfg).items():
        weight = ckpt.dense_tensor(name, shape, "cpu", torch.float32)
        tensors[name] = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
    expert_format, expert_buffer = expert_storage(ckpt, torch.float32)
    for layer in cfg.moe_layers:
        experts = [expert_format.view(expert_buffer(layer, expert_id)) for expert_id in range(cfg.num_experts)]
        if cfg.model_type == "gpt_oss":
            tensors.update(fused_expert_tensors(f"model.layers.{layer}.mlp.experts", experts))
            continue
        for expert_id, expert in enumerate(experts):
            for name, weight in zip(expert_tensor_names(cfg, layer, expert_id), expert):
                tensors[name] = weight.dequantize()
    out.mkdir()
    save_file({name: t.contiguous() for name, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((quantized_folder / "config.json").read_text())
    config.pop("quantization_config", None)      # the source's (gpt-oss: MXFP4); these weights are plain
    (out / "config.json").write_text(json.dumps(config))
    return out


def fused_expert_tensors(prefix: str, experts) -> dict[str, torch.Tensor]:
    """gpt-oss's per-layer expert tensors in the hub's unquantized naming: gate and up interleaved, (in, out)."""
    def interleave(a, b):
        return torch.stack([a, b], dim=1).flatten(0, 1)

    return {   # each weight Biased(a quantized weight, its bias)
        f"{prefix}.gate_up_proj": torch.stack([interleave(e.w1.weight.dequantize(), e.w3.weight.dequantize()).t()
                                               for e in experts]),
        f"{prefix}.gate_up_proj_bias": torch.stack([interleave(e.w1.bias, e.w3.bias) for e in experts]),
        f"{prefix}.down_proj": torch.stack([e.w2.weight.dequantize().t() for e in experts]),
        f"{prefix}.down_proj_bias": torch.stack([e.w2.bias for e in experts]),
    }


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    """model_type -> (tiny checkpoint, its folder written by `write_quantized` at 4/2), once per module."""
    folders = {}

    def get(model_type):
        if model_type not in folders:
            root = tmp_path_factory.mktemp(f"{model_type}-quant")
            folder = write_tiny_family(root / "model", model_type, **QUANTIZABLE[model_type])
            write_quantized(folder, root / "model-4-2", QuantConfig.parse("4/2"), device="cpu")
            folders[model_type] = folder, root / "model-4-2"
        return folders[model_type]

    return get


QUANT_TOKENS = torch.randint(3, 8192, (40,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("model_type", slow_except(FAMILIES, "mixtral"))
def test_family_quantized_folder_matches_transformers_on_the_dequantized_weights(tmp_path, quantized_folder, model_type):
    """4-bit attention and dense/shared MLPs, 2-bit experts, written once and memory-mapped: each
    weight in its place (transformers on the dequantized weights agrees), offloaded bit for bit."""
    folder, written_folder = quantized_folder(model_type)
    written = load_engine(written_folder)
    cfg = written.config
    for index, layer in enumerate(written.model.weights.layers):
        a = layer.attn
        assert all(isinstance(w, QuantizedWeight) for w in (a.wq, a.wk, a.wv, a.wo, a.wq_a, a.wkv_a) if w is not None)
        assert all(b is None or isinstance(b, torch.Tensor) for b in (layer.attn.bq, layer.attn.bo, layer.attn.q_norm))
        mlp = layer.dense_mlp if index in cfg.dense_layers else layer.shared_expert
        assert mlp is None or all(isinstance(w, QuantizedWeight) and w.spec.bits == 4 for w in mlp)
        assert layer.router is None or isinstance(layer.router, torch.Tensor)
    ours = logits_through_prefill_and_decode(written, QUANT_TOKENS, prompt=32)

    offloaded = Engine.load(RuntimeConfig(model=written_folder, device="cpu", dtype="float32"), progress=False,
                            offload=OffloadConfig(enabled=True, gpu_memory=2**30, slots_per_layer=2))
    assert all(torch.equal(a, b) for a, b in zip(logits_through_prefill_and_decode(offloaded, QUANT_TOKENS, prompt=32), ours))

    expected = reference_logits(dequantized_checkpoint(written_folder, tmp_path / "dequantized"), torch.tensor([QUANT_TOKENS]))
    assert (torch.cat(ours) - expected).abs().max() <= 1e-4 * expected.abs().max()
    unquantized = torch.cat(logits_through_prefill_and_decode(load_engine(folder), QUANT_TOKENS, prompt=32))
    assert (unquantized - expected).abs().max() > 1e-2 * expected.abs().max()   # it really is quantized


def test_qwen2_moe_quantize_on_load_equals_the_written_folder(quantized_folder):
    """The shared expert, dense layer and qkv biases take the same path quantized on load (--quant)."""
    folder, written_folder = quantized_folder("qwen2_moe")
    on_load = logits_through_prefill_and_decode(load_engine(folder, quant=QuantConfig.parse("4/2")), QUANT_TOKENS, prompt=32)
    from_folder = logits_through_prefill_and_decode(load_engine(written_folder), QUANT_TOKENS, prompt=32)
    # On the CPU the written folder's unquantized tensors (router, lm_head) are used in place from the
    # memory map, 8-byte aligned, and a one-row matmul's summation order depends on alignment: decode
    # steps may differ in the last bits.
    assert torch.equal(from_folder[0], on_load[0])
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(from_folder, on_load, strict=True))


def write_mxfp4_gpt_oss(folder):
    """The tiny gpt-oss checkpoint with its experts as the hub publishes them: MXFP4 `_blocks` (E, out, in/32, 16) and
    `_scales` (E, out, in/32) of the (out, in) matrices, biases unquantized, and the quantization_config."""
    from safetensors.torch import load_file, save_file

    from moe_offload.quant.mxfp4 import quantize

    folder = write_tiny_family(folder, "gpt_oss")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        matrices = tensors.pop(name).transpose(1, 2)                  # (E, out, in)
        experts, rows, cols = matrices.shape
        packed = [quantize(matrix) for matrix in matrices]
        tensors[f"{name}_blocks"] = torch.stack([codes for codes, _ in packed]).view(experts, rows, cols // 32, 16)
        tensors[f"{name}_scales"] = torch.stack([scales for _, scales in packed])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_gpt_oss_mxfp4_experts_load_as_published_and_match_transformers(tmp_path):
    """The experts stay MXFP4 (about 4.25 bits a weight in every buffer), and the logits match transformers'
    dequantized model through prefill and decode; offloaded bit for bit with 2 slots."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from moe_offload.quant.mxfp4 import MXFP4ExpertFormat

    folder = write_mxfp4_gpt_oss(tmp_path / "gpt-oss")
    engine = load_engine(folder)
    expert_format = engine.model.provider.expert_format
    assert isinstance(expert_format, MXFP4ExpertFormat)
    assert expert_format.nbytes < DenseExpertFormat(64, 32, torch.bfloat16, biases=True).nbytes / 2
    tokens = torch.randint(3, 8192, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager",
                                                     quantization_config=Mxfp4Config(dequantize=True)).eval()
    with torch.no_grad():
        expected = reference(tokens).logits[0]
    assert (our_logits(folder, tokens) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_offloaded_equals_resident(folder, slots=2, prefetch=None)


def test_gpt_oss_mxfp4_experts_convert_to_hqq_widths(tmp_path):
    """--quant 4/2 on the published MXFP4 experts: 2-bit HQQ from the exact MXFP4 values, biases kept; against
    transformers on the dequantized weights."""
    folder = write_mxfp4_gpt_oss(tmp_path / "gpt-oss")
    write_quantized(folder, tmp_path / "gpt-oss-4-2", QuantConfig.parse("4/2"), device="cpu")
    written = load_engine(tmp_path / "gpt-oss-4-2")
    assert isinstance(written.model.provider.expert_format, HQQExpertFormat)
    ours = torch.cat(logits_through_prefill_and_decode(written, QUANT_TOKENS, prompt=32))
    expected = reference_logits(dequantized_checkpoint(tmp_path / "gpt-oss-4-2", tmp_path / "dequantized"),
                                torch.tensor([QUANT_TOKENS]))
    assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_quantizing_gpt_oss_but_not_its_experts_is_refused_before_writing(tmp_path):
    from moe_offload.checkpoint import CheckpointError

    folder = write_tiny_family(tmp_path / "gpt-oss", "gpt_oss")
    with pytest.raises(CheckpointError, match="--expert-bits"):
        write_quantized(folder, tmp_path / "out", QuantConfig(attention=QuantSpec(4)), device="cpu")
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_float8_checkpoint_reads_as_transformers_dequantizes_it(tmp_path):
    """DeepSeek-V3 is published with its projections in float8 e4m3, one fp32 `weight_scale_inv` per 128 x 128 block
    (here 8 x 8): logits against transformers' own dequantization of the same folder."""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_family(tmp_path, "deepseek_v3")
    block = 8
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("_proj.weight", "_proj_with_mqa.weight"))]:
        weight = tensors[name]
        rows, cols = weight.shape
        blocks = weight.view(rows // block, block, cols // block, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448
        tensors[name] = (blocks / scale[:, None, :, None]).view(rows, cols).to(torch.float8_e4m3fn)
        tensors[f"{name}_scale_inv"] = scale.float()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(config))
    assert_close_to_reference(folder, vocab_size=8192)


# config.json of published checkpoints, as the hub writes them (key names differ between families).
HUB_CONFIGS = {
    "Qwen/Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
        "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
        "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    },
    "allenai/OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
    },
    "mistralai/Mixtral-8x22B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 16384,
        "max_position_embeddings": 65536, "model_type": "mixtral", "num_attention_heads": 48,
        "num_experts_per_tok": 2, "num_hidden_layers": 56, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    },
    # The 64-value longrope factor lists stand in for the published ones (same length and kind); every other field is
    # as published.
    "microsoft/Phi-3.5-MoE-instruct": {
        "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 32000, "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096,
        "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True,
        "max_position_embeddings": 131072, "model_type": "phimoe", "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 16,
        "original_max_position_embeddings": 4096, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [1.0 + i / 32 for i in range(64)], "long_mscale": 1.243163121016122,
                         "original_max_position_embeddings": 4096, "short_factor": [1.0 + i / 64 for i in range(64)],
                         "short_mscale": 1.243163121016122, "type": "longrope"},
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.3", "use_cache": True,
        "vocab_size": 32064,
    },
    "zai-org/GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
        "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408,
        "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
        "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "num_hidden_layers": 46, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552,
    },
    "zai-org/GLM-4.5": {
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 5120, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 12288,
        "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1536,
        "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
        "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "num_hidden_layers": 92, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": True, "vocab_size": 151552,
    },
    "openai/gpt-oss-120b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
        "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    },
    "openai/gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
        "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    },
    "deepseek-ai/DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    },
    "deepseek-ai/DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    },
    "deepseek-ai/DeepSeek-V2": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.003, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 128, "num_experts_per_tok": 6,
        "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128,
        "vocab_size": 102400,
    },
}


@pytest.mark.parametrize("checkpoint", HUB_CONFIGS)
def test_hub_config_maps_to_the_structure_transformers_builds(checkpoint):
    """Our reading of a published config.json against the modules transformers builds from it (on meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = HUB_CONFIGS[checkpoint]
    ours = ModelConfig.from_hf(hf)
    reference_config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(reference_config)
    layers = reference.model.layers
    assert ours.num_layers == len(layers)
    assert ours.top_k == hf["num_experts_per_tok"]
    assert ours.rope_theta == reference_config.rope_parameters["rope_theta"]
    assert ours.norm_topk_prob == getattr(reference_config, "norm_topk_prob", True)
    assert_rope_matches(ours, reference)
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        if ours.kv_lora_rank:
            assert_latent_attention_matches(ours, attn)
        else:
            assert_attention_matches(ours, attn)
        mlp = layer.mlp
        if index in ours.dense_layers:
            assert not hasattr(mlp, "experts") and mlp.gate_proj.out_features == ours.dense_ffn
            continue
        gate_up = (ours.num_experts, 2 * ours.expert_ffn, ours.hidden_size)
        if hf["model_type"] == "gpt_oss":    # stored (in, out), with biases
            gate_up = (ours.num_experts, ours.hidden_size, 2 * ours.expert_ffn)
        assert tuple(mlp.experts.gate_up_proj.shape) == gate_up
        assert ours.expert_bias == hasattr(mlp.experts, "gate_up_proj_bias")
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        assert (0 if shared is None else shared.gate_proj.out_features) == ours.shared_expert_ffn
        assert ours.shared_expert_gated == hasattr(mlp, "shared_expert_gate")
        router = getattr(mlp, "gate", None) or mlp.router
        assert ours.router_bias == (getattr(router, "bias", None) is not None)
        assert ours.score_correction_bias == hasattr(router, "e_score_correction_bias")
        assert (ours.n_group, ours.topk_group) == (getattr(router, "num_group", 1), getattr(router, "topk_group", 1))
        assert ours.routed_scaling_factor == getattr(router, "routed_scaling_factor", 1.0)
    norm = reference.model.norm
    assert ours.norm == ("layer" if isinstance(norm, torch.nn.LayerNorm) else "rms")
    assert ours.lm_head_bias == (reference.lm_head.bias is not None)


def assert_attention_matches(ours: ModelConfig, attn) -> None:
    assert ours.window(attn.layer_idx) == getattr(attn, "sliding_window", ours.sliding_window)
    assert ours.attention_sinks == hasattr(attn, "sinks")
    assert tuple(attn.q_proj.weight.shape) == (ours.num_heads * ours.head_dim, ours.hidden_size)
    assert tuple(attn.k_proj.weight.shape) == (ours.num_kv_heads * ours.head_dim, ours.hidden_size)
    assert (attn.q_proj.bias is not None) == ours.qkv_bias
    assert (attn.o_proj.bias is not None) == ours.o_bias
    q_norm = getattr(attn, "q_norm", None)
    expected_norm = {"none": None, "head": (ours.head_dim,), "full": (ours.num_heads * ours.head_dim,)}[ours.qk_norm]
    assert (None if q_norm is None else tuple(q_norm.weight.shape)) == expected_norm


def assert_latent_attention_matches(ours: ModelConfig, attn) -> None:
    """Every projection's shape as dense_tensor_shapes has it, the softmax scale (YaRN's mscale folded in), and
    whether rotary pairs are interleaved."""
    shapes = {name.rsplit(".", 2)[-2]: shape for name, shape in dense_tensor_shapes(ours).items()
              if name.startswith("model.layers.0.self_attn.")}
    modules = {name: getattr(attn, name) for name in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj",
                                                       "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")}
    assert shapes == {name: tuple(m.weight.shape) for name, m in modules.items() if m is not None}
    assert ours.attention_scale == pytest.approx(attn.scaling, rel=1e-12)
    assert ours.rope_interleave == getattr(attn.config, "rope_interleave", True)
    assert ours.v_head_dim == attn.v_head_dim and ours.rotary_dim == attn.qk_rope_head_dim


def assert_rope_matches(ours: ModelConfig, reference) -> None:
    """Our cos and sin tables against the model's own rotary embedding (built off the meta device), at positions
    on both sides of a scaled embedding's pretraining length."""
    from moe_offload.model import rotary

    rotary_emb = type(reference.model.rotary_emb)(reference.config)
    end = ours.rope_scaling.original_max_position if ours.rope_scaling else 4096
    positions = torch.tensor([0, 1, 17, end - 1])
    table = rotary_emb(torch.zeros(1, dtype=torch.float32), positions[None])
    if torch.is_tensor(table):      # DeepSeek-V2: e^(i angle), one per rotary pair
        table = torch.cat([table.real] * 2, dim=-1), torch.cat([table.imag] * 2, dim=-1)
    cos, sin = table
    if cos.shape[-1] * 2 == ours.rotary_dim:      # gpt-oss: one angle per rotary pair
        cos, sin = torch.cat([cos] * 2, dim=-1), torch.cat([sin] * 2, dim=-1)
    expected_cos, expected_sin = rotary(positions, ours.rotary_dim, ours.rope_theta, ours.rope_scaling)
    assert torch.allclose(cos[0], expected_cos, atol=1e-5) and torch.allclose(sin[0], expected_sin, atol=1e-5)


def test_longrope_positions_past_the_pretraining_length_use_the_long_factors():
    """Phi-3.5-MoE beyond original_max_position_embeddings (4096), as Microsoft's modeling code and transformers'
    dense Phi-3 compute it: the long factors and long_mscale. (transformers' PhimoeRotaryEmbedding keeps the short
    factors at every length; below the boundary, where the tiny checkpoints' prompts stay, both agree.)"""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moe_offload.model import rotary

    hf = HUB_CONFIGS["microsoft/Phi-3.5-MoE-instruct"]
    ours = ModelConfig.from_hf(hf)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](AutoConfig.for_model(**hf), "cpu", seq_len=4097)
    positions = torch.tensor([4095, 4096, 5000, 100000])
    angles = positions[:, None].float() * inv_freq
    expected = torch.cat([angles, angles], dim=-1).cos() * hf["rope_scaling"]["long_mscale"]
    cos, _ = rotary(positions, ours.rotary_dim, ours.rope_theta, ours.rope_scaling)
    assert not torch.allclose(cos[0], expected[0], atol=1e-3) and torch.equal(cos[1:], expected[1:])


def test_qwen3_30b_a3b_config_reads_as_the_issue_describes_it():
    cfg = ModelConfig.from_hf(HUB_CONFIGS["Qwen/Qwen3-30B-A3B"])
    assert (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.expert_ffn) == (48, 128, 8, 768)
    assert cfg.moe_layers == tuple(range(48)) and cfg.norm_topk_prob and cfg.qk_norm == "head"


QWEN3_30B_PLANS = {  # (expert bits or None for bf16, GiB) -> slots per layer, as docs/offloading.md states
    (None, 12): (19,) * 24 + (18,) * 24, (None, 8): (9,) * 48,
    (4, 12): (81,) * 19 + (80,) * 29, (4, 8): (45,) * 40 + (44,) * 8,
    (2, 12): (112,) * 47 + (111,) * 1, (2, 8): (63,) * 21 + (62,) * 27,
}


@pytest.mark.parametrize("expert_bits, budget_gib", QWEN3_30B_PLANS)
def test_planner_fills_qwen3_30b_a3b_budgets_as_docs_offloading_states(expert_bits, budget_gib):
    """docs/offloading.md's arithmetic for Qwen3-30B-A3B (bf16, or --quant 4/bits: 4-bit attention; 4096 tokens of context):
    no weights needed."""
    from moe_offload.offload.planner import plan_for, workspace_bytes

    cfg = ModelConfig.from_hf(HUB_CONFIGS["Qwen/Qwen3-30B-A3B"])
    quant = None if expert_bits is None else QuantConfig.parse(f"4/{expert_bits}")
    if expert_bits is None:
        expert_nbytes = DenseExpertFormat(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16).nbytes
        assert expert_nbytes == 3 * 768 * 2048 * 2
    else:
        expert_nbytes = HQQExpertFormat(cfg.hidden_size, cfg.expert_ffn, QuantSpec(expert_bits)).nbytes
    assert expert_nbytes == {None: 9_437_184, 4: 2_515_968, 2: 1_806_336}[expert_bits]
    plan = plan_for(cfg, expert_nbytes, torch.bfloat16, 4096, OffloadConfig(enabled=True, gpu_memory=budget_gib * 2**30), "cuda",
                    quant)
    embeddings, attention, routers, norms = 2 * 151936 * 2048, 48 * 2048 * (4096 + 512 + 512 + 4096), 48 * 128 * 2048, 2048 + 48 * (2 * 2048 + 2 * 128)
    if quant is None:
        assert plan.dense_bytes == 2 * (embeddings + attention + routers + norms) == 3_082_186_752
    else:
        packed_attention = 48 * (4_472_832 + 2 * 559_104 + 4_472_832)   # q and o, k and v: 4-bit g64 buffers
        assert plan.dense_bytes == 2 * (embeddings + routers + norms) + packed_attention == 1_753_313_280
    assert plan.kv_bytes == 2 * 48 * 4 * 128 * 4096 * 2
    assert plan.workspace_bytes == workspace_bytes(cfg, PREFILL_CHUNK, 4096, 2)
    left = budget_gib * 2**30 - plan.dense_bytes - plan.kv_bytes - plan.workspace_bytes
    slots_per_layer = QWEN3_30B_PLANS[expert_bits, budget_gib]
    assert sum(plan.slots.values()) == left // expert_nbytes == sum(slots_per_layer)
    assert tuple(plan.slots.values()) == slots_per_layer


# The issue's budgets (--max-context 4096, bf16 non-expert weights but for the roles --quant quantizes): checkpoint,
# --quant, --gpu-memory GiB, --cpu-memory GiB -> non-expert bytes, expert bytes, slots per MoE layer, experts on disk
ISSUE_PLANS = {
    "gpt-oss-120b-24GiB": ("openai/gpt-oss-120b", None, 24, None, 4_255_115_904, 13_236_480, (42,) * 34 + (41,) * 2, 0),
    "gpt-oss-120b-16GiB": ("openai/gpt-oss-120b", None, 16, None, 4_255_115_904, 13_236_480, (24,) * 33 + (23,) * 3, 0),
    "gpt-oss-20b-8GiB": ("openai/gpt-oss-20b", None, 8, None, 3_595_648_128, 13_236_480, (12,) * 6 + (11,) * 18, 0),
    "DeepSeek-V3-4/2-24GiB-192GiB": ("deepseek-ai/DeepSeek-V3", "4/2", 24, 192, 13_504_428_416, 16_859_136,
                                     (10,) * 31 + (9,) * 27, 2620),
    "GLM-4.5-Air-4/2-16GiB": ("zai-org/GLM-4.5-Air", "4/2", 16, None, 5_693_899_520, 6_623_232, (30,) * 28 + (29,) * 17, 0),
}


@pytest.mark.parametrize("case", ISSUE_PLANS)
def test_planner_fills_the_issue_budgets_as_docs_offloading_states(case):
    """docs/offloading.md's table: gpt-oss with its experts in MXFP4 as published, DeepSeek-V3 and GLM-4.5-Air with
    --quant 4/2."""
    from moe_offload.offload.planner import plan_for
    from moe_offload.quant.mxfp4 import MXFP4ExpertFormat

    checkpoint, quant_text, gpu_gib, cpu_gib, dense_bytes, expert_nbytes, slots, disk_experts = ISSUE_PLANS[case]
    cfg = ModelConfig.from_hf(HUB_CONFIGS[checkpoint])
    quant = QuantConfig.parse(quant_text) if quant_text else None
    if quant is None:
        expert_format = MXFP4ExpertFormat(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16, biases=True)
    else:
        expert_format = HQQExpertFormat(cfg.hidden_size, cfg.expert_ffn, quant.experts, biases=cfg.expert_bias)
    offload = OffloadConfig(enabled=True, gpu_memory=gpu_gib * 2**30, cpu_memory=cpu_gib and cpu_gib * 2**30)
    plan = plan_for(cfg, expert_format.nbytes, torch.bfloat16, 4096, offload, "cuda", quant)
    assert (plan.dense_bytes, expert_format.nbytes) == (dense_bytes, expert_nbytes)
    assert tuple(plan.slots.values()) == slots and tuple(plan.slots) == cfg.moe_layers
    assert plan.disk_experts == disk_experts


def test_glm_4_5_air_in_bf16_does_not_fit_16_gib_and_the_planner_says_what_does():
    from moe_offload.errors import UserError
    from moe_offload.offload.planner import plan_for

    cfg = ModelConfig.from_hf(HUB_CONFIGS["zai-org/GLM-4.5-Air"])
    expert_nbytes = DenseExpertFormat(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16).nbytes
    with pytest.raises(UserError, match="at least 17.33GiB"):
        plan_for(cfg, expert_nbytes, torch.bfloat16, 4096, OffloadConfig(enabled=True, gpu_memory=16 * 2**30), "cuda")


def test_unsupported_model_type_is_one_error_line_naming_the_supported_ones(tmp_path):
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    config["model_type"] = "dbrx"
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "--model", str(tmp_path), "--prompt", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'dbrx'" in lines[0]
    assert all(model_type in lines[0] for model_type in SUPPORTED_MODEL_TYPES)
    assert result.stdout == ""


# The chat templates the checkpoints ship in tokenizer_config.json, verbatim.
QWEN15_MOE_CHAT_TEMPLATE = (  # Qwen/Qwen1.5-MoE-A2.7B-Chat (ChatML)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}"
    "{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_MOE_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

CONVERSATIONS = {
    "one-user-turn": [{"role": "user", "content": "Write a haiku about caches."}],
    "system-and-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    "multi-turn-with-thinking": [
        {"role": "user", "content": "What's 2+2?"},
        {"role": "assistant", "content": "<think>\nSmall sums.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?  Ünïcode → ok"},
    ],
    "ends-with-assistant": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
}


def write_qwen_style_tokenizer(folder, chat_template: str) -> None:
    """The shipped tokenizer with Qwen's special tokens added (ids 8192-8194), as Qwen's tokenizer.json
    has them, and a tokenizer_config.json shaped like Qwen's with `chat_template`."""
    tokenizer = HFTokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "chat_template": chat_template,
    }))


@pytest.mark.parametrize("template_name", ["qwen1.5-moe-chatml", "qwen3-moe"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_chat_templates_render_as_transformers_renders_them(tmp_path, template_name, conversation, add_generation_prompt):
    from transformers import AutoTokenizer

    template = {"qwen1.5-moe-chatml": QWEN15_MOE_CHAT_TEMPLATE, "qwen3-moe": QWEN3_MOE_CHAT_TEMPLATE}[template_name]
    write_qwen_style_tokenizer(tmp_path, template)
    messages = CONVERSATIONS[conversation]
    ours = Tokenizer.from_folder(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert "<|im_start|>" in expected
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    expected_ids = list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)
    assert reference.convert_tokens_to_ids("<|im_start|>") in expected_ids  # one id each, as in Qwen's vocabulary
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


@pytest.mark.parametrize("model_type", slow_except(FAMILIES, "mixtral"))
def test_cli_generate_runs_every_family(family_folder, model_type, capsys):
    folder = family_folder(model_type)
    engine = load_engine(folder)
    prompt = "import os\n"
    expected = engine.stream(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=12)).text()
    assert main(["generate", "--model", str(folder), "--device", "cpu", "--max-tokens", "12", "--prompt", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert "new tokens: 12" in out.err.strip().splitlines()[-1]


def test_cli_chat_renders_turns_with_the_qwen3_template(tmp_path, monkeypatch, capsys):
    """`chat` on a Qwen3-MoE checkpoint that ships Qwen3's template: each reply is the greedy
    completion of the conversation as the template renders it (history included)."""
    folder = write_tiny_family(tmp_path, "qwen3_moe", vocab_size=8256)  # room for the special tokens
    write_qwen_style_tokenizer(folder, QWEN3_MOE_CHAT_TEMPLATE)
    engine = load_engine(folder)
    params = SamplingParams(max_new_tokens=10)
    history, replies = [], []
    for line in ("hello", "and again"):
        history.append({"role": "user", "content": line})
        reply = engine.stream(engine.tokenizer.encode_chat(history), params).text()
        replies.append(reply)
        history.append({"role": "assistant", "content": reply.strip()})
    assert engine.tokenizer.encode_chat(history[:1])[0] == engine.tokenizer.hf.token_to_id("<|im_start|>")

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand again\n"))
    assert main(["chat", "--model", str(folder), "--device", "cpu", "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out == "".join(f"> {reply}\n" for reply in replies) + "> "


# Chat formats of the newer families: (special tokens, end of turn, template). Phi-3.5-MoE-instruct's template as we
# recall it; GLM-4.5's, DeepSeek's and gpt-oss's (harmony) formats abridged (their templates also render tools,
# reasoning and channels). All are rendered by the same code as the Qwen templates above, which are checked verbatim
# against apply_chat_template.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GLM45_STYLE_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}{% if m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{% elif m.role == 'user' %}<|user|>\n{{ m.content }}{% elif m.role == 'assistant' %}<|assistant|>\n"
    "<think></think>\n{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEEPSEEK_V3_STYLE_CHAT_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% elif m.role == 'user' %}"
    "<｜User｜>{{ m.content }}{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
DEEPSEEK_V2_STYLE_CHAT_TEMPLATE = (
    "<｜begin▁of▁sentence｜>{% for m in messages %}{% if m.role == 'system' %}{{ m.content + '\n\n' }}"
    "{% elif m.role == 'user' %}{{ 'User: ' + m.content + '\n\n' }}{% elif m.role == 'assistant' %}"
    "{{ 'Assistant: ' + m.content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
HARMONY_STYLE_CHAT_TEMPLATE = (   # gpt-oss's harmony format: a system header, the instructions as a developer message
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
    "Current date: {{ strftime_now('%Y-%m-%d') }}\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, "
    "final. Channel must be included for every message.<|end|>{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}<|start|>developer<|message|># Instructions\n\n{{ m.content }}<|end|>"
    "{% elif m.role == 'user' %}<|start|>user<|message|>{{ m.content }}<|end|>{% elif m.role == 'assistant' %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
FAMILY_CHATS = {
    "phimoe": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>", PHI35_CHAT_TEMPLATE),
    "glm4_moe": (["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"], "<|user|>", GLM45_STYLE_CHAT_TEMPLATE),
    "deepseek_v3": (["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"],
                    "<｜end▁of▁sentence｜>", DEEPSEEK_V3_STYLE_CHAT_TEMPLATE),
    "deepseek_v2": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], "<｜end▁of▁sentence｜>",
                    DEEPSEEK_V2_STYLE_CHAT_TEMPLATE),
    "gpt_oss": (["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"], "<|return|>",
                HARMONY_STYLE_CHAT_TEMPLATE),
}


def write_chat_tokenizer(folder, special_tokens: list[str], end_of_turn: str, chat_template: str) -> None:
    """The shipped tokenizer with a family's special tokens added (ids from 8192) and its chat template."""
    tokenizer = HFTokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    tokenizer.add_special_tokens(special_tokens)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": None, "eos_token": end_of_turn, "unk_token": None,
        "chat_template": chat_template}))


@pytest.mark.parametrize("model_type", slow_except(FAMILY_CHATS, "phimoe"))
def test_family_chat_and_serve_run_with_its_chat_template(tmp_path, model_type, monkeypatch, capsys):
    """The template renders as transformers renders it; `chat` answers each turn with the greedy completion of the
    rendered conversation; `serve` answers a chat completion with the same text."""
    import httpx
    from transformers import AutoTokenizer

    from test_server import running_server

    specials, end_of_turn, template = FAMILY_CHATS[model_type]
    folder = write_tiny_family(tmp_path / model_type, model_type, vocab_size=8256)   # room for the special tokens
    write_chat_tokenizer(folder, specials, end_of_turn, template)
    engine = load_engine(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a sorting algorithm."}]
    expected_ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    expected_ids = list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)
    assert engine.tokenizer.encode_chat(messages) == expected_ids and expected_ids[0] >= 8192

    params = SamplingParams(max_new_tokens=10)
    reply = engine.stream(engine.tokenizer.encode_chat(messages[1:]), params).text()
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a sorting algorithm.\n"))
    assert main(["chat", "--model", str(folder), "--device", "cpu", "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out == f"> {reply}\n> "

    answer = engine.stream(engine.tokenizer.encode_chat(messages), params).text()
    with running_server("--model", str(folder)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                              json={"model": folder.name, "messages": messages, "max_tokens": 10, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer


@pytest.mark.parametrize("model_type", slow_except(FAMILIES, "mixtral"))
def test_family_perplexity_matches_transformers(family_folder, model_type, tmp_path, capsys):
    """`moe-offload perplexity` against transformers' cross-entropy over the same windows."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    folder = family_folder(model_type)
    text_file = tmp_path / "text.txt"
    text_file.write_text(EVAL_TEXT.read_text()[:2000])
    window, windows = 64, 3
    assert main(["perplexity", "--model", str(folder), "--device", "cpu", "--text", str(text_file),
                 "--window", str(window), "--max-windows", str(windows)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("perplexity ") and f"over {windows} windows of {window} tokens" in line
    ours = float(line.split()[1])

    ids = load_engine(folder).tokenizer.encode(text_file.read_text())
    batch = torch.tensor([ids[i * window:(i + 1) * window] for i in range(windows)])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        logits = reference(batch).logits
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item())
    assert ours == pytest.approx(expected, rel=1e-4)


def test_server_chat_on_a_qwen3_moe_checkpoint_with_its_template(tmp_path):
    """`moe-offload serve` on a Qwen3-MoE folder that ships Qwen3's chat template: a chat completion
    is the engine's greedy completion of the conversation as the template renders it."""
    import httpx

    from test_server import running_server

    folder = write_tiny_family(tmp_path / "qwen3", "qwen3_moe", vocab_size=8256)
    write_qwen_style_tokenizer(folder, QWEN3_MOE_CHAT_TEMPLATE)
    engine = load_engine(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a sorting algorithm."}]
    expected = engine.stream(engine.tokenizer.encode_chat(messages), SamplingParams(max_new_tokens=12)).text()
    with running_server("--model", str(folder)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                              json={"model": folder.name, "messages": messages, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode_chat(messages))
