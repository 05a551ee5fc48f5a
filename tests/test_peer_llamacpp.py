"""benchmarks/peers/llamacpp: the GGUF writer's layout and weights, and run.py's placement rule (needs gguf-py,
`pip install gguf`, which moe-offload does not depend on: skipped without it)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "llamacpp"


def load(name):
    spec = importlib.util.spec_from_file_location(f"peer_llamacpp_{name}", PEER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


write_gguf, run = load("write_gguf"), load("run")


@pytest.mark.parametrize("experts", ["q2_k", "q3_k", "q4_k"])
def test_tiny_gguf_has_mixtral_layout_and_finite_weights(tmp_path, experts):
    path = tmp_path / "tiny.gguf"
    s = write_gguf.TINY
    size = write_gguf.write(str(path), s, write_gguf.EXPERT_TYPES[experts])
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 10 * s.layers and size == sum(int(t.n_bytes) for t in reader.tensors)
    # gguf stores dimensions innermost first: (cols, rows, experts)
    assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [s.hidden, s.ffn, s.experts]
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape) == [s.ffn, s.hidden, s.experts]
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == experts.upper()
    assert tensors["blk.0.attn_k.weight"].tensor_type.name == "Q4_K"
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "blk.1.attn_q.weight"):
        t = tensors[name]
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        target = weights.shape[-1] ** -0.5
        assert np.isfinite(weights).all()
        assert abs(weights.mean()) < 0.05 * target and abs(weights.std() / target - 1) < 0.05

    model = run.describe_model(str(path))
    assert model["layers"] == s.layers and model["experts"] == s.experts
    assert model["expert_bytes_per_layer"] == 3 * int(tensors["blk.0.ffn_up_exps.weight"].n_bytes)


def test_placement_is_the_fewest_cpu_layers_that_fit():
    model = {"layers": 32, "expert_bytes_per_layer": 100}
    assert run.choose_n_cpu_moe(budget=5000, base=1000, model=model) == 0
    assert run.choose_n_cpu_moe(budget=1000 + 22 * 100, base=1000, model=model) == 10
    assert run.choose_n_cpu_moe(budget=1000 + 22 * 100 - 1, base=1000, model=model) == 11
    assert run.choose_n_cpu_moe(budget=999, base=1000, model=model) is None
    assert run.parse_size("12") == run.parse_size("12GiB") == 12 * 2 ** 30
    assert run.parse_size("900MiB") == 900 * 2 ** 20
