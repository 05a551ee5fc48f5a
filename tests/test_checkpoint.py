"""Checkpoint folders: sharded loading, and one clear line for every kind of broken input."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from moe_offload.cli import main
from moe_offload.config import RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.model import KVCache

from conftest import SHIPPED_MODEL, write_tiny_mixtral


def logits_of(folder) -> torch.Tensor:
    engine = Engine.load(RuntimeConfig(model=folder, device="cpu", dtype="float32"), progress=False)
    cache = KVCache.allocate(engine.config, 1, 64, "cpu", torch.float32)
    return engine.model(torch.arange(3, 40)[None], cache, start_pos=0)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_to_identical_logits(tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED_MODEL / name, sharded / name)
    tensors = load_file(SHIPPED_MODEL / "model.safetensors")
    names = sorted(tensors)
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in shard}, sharded / file)
        weight_map.update(dict.fromkeys(shard, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(logits_of(sharded), logits_of(SHIPPED_MODEL))


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["generate", "--device", "cpu", "--max-tokens", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_one_clear_line(capsys, args, *expected_words):
    code, line = run_cli(capsys, *args)
    assert code == 1
    assert line.startswith("error: ")
    for word in expected_words:
        assert word in line
    assert "Traceback" not in line


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert_one_clear_line(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "x"], "no such model folder")


def test_missing_tensor_is_named(tmp_path, capsys):
    folder = write_tiny_mixtral(tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert_one_clear_line(capsys, ["--model", str(folder), "--prompt", "x"],
                          "model.layers.1.block_sparse_moe.experts.2.w3.weight", "missing")


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path, capsys):
    folder = write_tiny_mixtral(tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(10, 64)
    save_file(tensors, folder / "model.safetensors")
    assert_one_clear_line(capsys, ["--model", str(folder), "--prompt", "x"],
                          "model.layers.0.self_attn.q_proj.weight", "[10, 64]", "[64, 64]")


def test_truncated_safetensors_file_is_named(tmp_path, capsys):
    folder = write_tiny_mixtral(tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_clear_line(capsys, ["--model", str(folder), "--prompt", "x"], "model.safetensors")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path, capsys):
    folder = copy_model(SHIPPED_MODEL, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_clear_line(capsys, ["--model", str(folder), "--prompt", "x"], "'llama'", "mixtral", "qwen3_moe")


def test_prompt_longer_than_the_context_names_the_limit(capsys):
    assert_one_clear_line(capsys, ["--max-context", "8", "--prompt", "def f(x): return x + 1 " * 4],
                          "tokens", "--max-context")


def test_invalid_sampling_flag_is_one_line(capsys):
    assert_one_clear_line(capsys, ["--prompt", "x", "--top-p", "1.5"], "--top-p")
