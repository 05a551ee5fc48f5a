"""Quantized checkpoints: written once, memory-mapped after, identical to quantizing on load;
bad folders fail with one line; quantized experts offload bit-identically."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moe_offload.cli import main
from moe_offload.config import OffloadConfig, QuantConfig, RuntimeConfig
from moe_offload.engine import Engine, expert_storage
from moe_offload.quant.checkpoint import open_checkpoint, quantized_size, write_quantized
from moe_offload.quant.weight import QuantizedWeight

from conftest import write_tiny_mixtral

TOKENS = torch.randint(3, 8192, (1, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # hidden 64, expert ffn 128: every paper group size (16, 64) divides both
    return write_tiny_mixtral(tmp_path_factory.mktemp("tiny"), intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_4_2(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("written") / "tiny-4-2"
    write_quantized(tiny, out, QuantConfig.parse("4/2"), device="cpu")
    return out


def logits(runtime: RuntimeConfig, offload: OffloadConfig = OffloadConfig()) -> torch.Tensor:
    engine = Engine.load(runtime, progress=False, offload=offload)
    return engine.model(TOKENS, engine.cache, start_pos=0)[0]


def test_written_checkpoint_gives_identical_logits_to_quantize_on_load(tiny, tiny_4_2):
    on_load = logits(RuntimeConfig(model=tiny, device="cpu", dtype="float32", quant=QuantConfig.parse("4/2")))
    reloaded = logits(RuntimeConfig(model=tiny_4_2, device="cpu", dtype="float32"))
    assert torch.equal(on_load, reloaded)
    unquantized = logits(RuntimeConfig(model=tiny, device="cpu", dtype="float32"))
    assert not torch.equal(unquantized, reloaded)      # it really is quantized


def test_written_folder_holds_roles_as_configured_and_maps_experts(tiny, tiny_4_2):
    ckpt = open_checkpoint(tiny_4_2)
    settings = json.loads((tiny_4_2 / "quantization.json").read_text())
    assert QuantConfig.from_json(settings["quant"]) == QuantConfig.parse("4/2") == ckpt.quant
    weights = ckpt.dense_weights("cpu", torch.float32)
    layer = weights.layers[0]
    assert isinstance(layer.attn.wq, QuantizedWeight) and layer.attn.wq.spec.bits == 4
    assert isinstance(layer.router, torch.Tensor) and isinstance(weights.lm_head, torch.Tensor)
    fmt, buffer = expert_storage(ckpt, torch.float32)
    mapped = buffer(1, 3)
    assert mapped.shape == (fmt.nbytes,) == (settings["expert_nbytes"],)
    _, quantize_now = expert_storage(open_checkpoint(tiny, QuantConfig.parse("4/2"), "cpu"), torch.float32)
    assert torch.equal(mapped, quantize_now(1, 3))
    assert (tiny_4_2 / "model.safetensors").stat().st_size - quantized_size(ckpt) < 64 * 1024   # header only


def test_written_config_names_the_format_so_other_tools_refuse_it_by_name(tiny, tiny_4_2):
    """transformers warns with the format's name (it skips a quantization it does not know) and then fails on
    the packed tensors' shapes; vLLM refuses an unknown quant_method outright."""
    written = json.loads((tiny_4_2 / "config.json").read_text())
    source = json.loads((tiny / "config.json").read_text())
    assert written == {**source, "quantization_config": {"quant_method": "moe-offload-hqq", "version": 4}}
    from transformers import AutoModelForCausalLM

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)    # transformers' loggers do not propagate
    try:
        with pytest.raises(RuntimeError):
            AutoModelForCausalLM.from_pretrained(tiny_4_2)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert any("Unknown quantization type, got moe-offload-hqq" in w for w in warnings)


def test_quantized_experts_offload_bit_identically(tiny_4_2):
    runtime = RuntimeConfig(model=tiny_4_2, device="cpu", dtype="float32")
    assert torch.equal(logits(runtime), logits(runtime, OffloadConfig(enabled=True, slots_per_layer=1)))


def test_cli_quantize_then_generate_matches_quantize_on_load(tiny, tmp_path, capsys):
    out = tmp_path / "q43"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--attn-bits", "4", "--expert-bits", "3",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    generate = ["generate", "--prompt", "def f(x):", "--max-tokens", "8", "--device", "cpu"]
    assert main(generate + ["--model", str(out)]) == 0
    from_folder = capsys.readouterr().out
    assert main(generate + ["--model", str(tiny), "--quant", "4/3"]) == 0
    assert capsys.readouterr().out == from_folder


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def copy_folder(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


GENERATE = ["generate", "--prompt", "x", "--max-tokens", "2", "--device", "cpu", "--model"]


def test_truncated_weights_fail_with_one_line(tiny_4_2, tmp_path, capsys):
    bad = copy_folder(tiny_4_2, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert "model.safetensors" in one_error_line(capsys, GENERATE + [str(bad)])


def test_damaged_settings_fail_with_one_line(tiny_4_2, tmp_path, capsys):
    bad = copy_folder(tiny_4_2, tmp_path / "bad")
    (bad / "quantization.json").write_text("{not json")
    assert "quantization.json" in one_error_line(capsys, GENERATE + [str(bad)])


def test_settings_that_do_not_match_the_weights_fail_with_one_line(tiny_4_2, tmp_path, capsys):
    bad = copy_folder(tiny_4_2, tmp_path / "bad")
    settings = json.loads((bad / "quantization.json").read_text())
    settings["quant"]["experts"]["bits"] = 3
    (bad / "quantization.json").write_text(json.dumps(settings))
    assert "quantize the model again" in one_error_line(capsys, GENERATE + [str(bad)])


def test_folder_of_an_older_format_version_fails_with_one_line(tiny_4_2, tmp_path, capsys):
    old = copy_folder(tiny_4_2, tmp_path / "old")
    settings = json.loads((old / "quantization.json").read_text())
    settings["version"] = 3                     # format 3 stored the meta (2, 2, runs); its buffers would misread
    (old / "quantization.json").write_text(json.dumps(settings))
    line = one_error_line(capsys, GENERATE + [str(old)])
    assert "version 4" in line and "quantize the model again" in line


@pytest.mark.parametrize("quant", ["4/3", "4/2"])
def test_quant_flag_on_a_quantized_folder_fails_with_one_line_even_with_its_own_settings(tiny_4_2, capsys, quant):
    assert one_error_line(capsys, GENERATE + [str(tiny_4_2), "--quant", quant]) == (
        f"error: --quant {quant}: {tiny_4_2} is already quantized (by `moe-offload quantize`); drop --quant")


def test_a_config_naming_another_version_of_the_format_fails_with_one_line(tiny_4_2, tmp_path, capsys):
    bad = copy_folder(tiny_4_2, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["version"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    line = one_error_line(capsys, GENERATE + [str(bad)])
    assert "config.json" in line and "version 5" in line and "quantize the model again" in line


def test_a_folder_quantized_by_another_tool_is_refused_by_name(tiny, tmp_path, capsys):
    gptq = copy_folder(tiny, tmp_path / "gptq")
    config = json.loads((gptq / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    line = one_error_line(capsys, GENERATE + [str(gptq)])
    assert "'gptq'" in line and "unquantized" in line


def test_a_quantized_folder_without_its_settings_file_is_refused(tiny_4_2, tmp_path, capsys):
    bare = copy_folder(tiny_4_2, tmp_path / "bare")
    (bare / "quantization.json").unlink()
    assert "quantization.json is missing" in one_error_line(capsys, GENERATE + [str(bare)])


def test_a_quantized_folder_written_before_the_config_named_its_format_still_loads(tiny_4_2, tmp_path):
    older = copy_folder(tiny_4_2, tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    del config["quantization_config"]
    (older / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(RuntimeConfig(model=older, device="cpu", dtype="float32")),
                       logits(RuntimeConfig(model=tiny_4_2, device="cpu", dtype="float32")))


def test_quantize_refuses_an_existing_out_folder_and_bad_settings(tiny, tiny_4_2, tmp_path, capsys):
    assert "already exists" in one_error_line(capsys, ["quantize", "--model", str(tiny), "--out", str(tiny_4_2)])
    assert "group size" in one_error_line(
        capsys, ["quantize", "--model", str(tiny), "--out", str(tmp_path / "x"), "--expert-group", "48"])
    assert "groups of 128" in one_error_line(
        capsys, ["quantize", "--model", str(tiny), "--out", str(tmp_path / "y"), "--attn-group", "128"])
    assert "5 bits" in one_error_line(capsys, GENERATE + [str(tiny), "--quant", "4/5"])
    assert list(tmp_path.iterdir()) == []     # nothing half-written
