"""LoRA fine-tuning against transformers + peft (fp32, CPU): gradients, saved adapters, offloaded == resident."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import LoraConfig, OffloadConfig, RuntimeConfig
from moe_offload.engine import Engine
from moe_offload.lora import Adapters
from moe_offload.model import KVCache
from moe_offload.train import Rows, Trainer

from conftest import write_tiny_mixtral

ROWS, LENGTH = 2, 24
TARGET_SETS = {"attention": ("attention",), "router": ("router",), "experts": ("experts",),
               "all": ("attention", "router", "experts")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mixtral(tmp_path_factory.mktemp("tiny"), num_local_experts=4, intermediate_size=96)


def load(folder, lora=None, slots=None) -> Engine:
    offload = OffloadConfig(enabled=True, slots_per_layer=slots, prefetch_experts=1, gpu_memory=2**30) if slots else OffloadConfig()
    return Engine.load(RuntimeConfig(model=folder, device="cpu", dtype="float32", max_context=64, lora=lora),
                       progress=False, offload=offload)


def random_adapters(engine: Engine, targets, seed: int = 1) -> Adapters:
    """Adapters with B not zero (as after some training), so that every A has a gradient."""
    adapters = Adapters.create(engine.config, LoraConfig(rank=4, alpha=8, targets=targets), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in adapters.pairs.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    return adapters


def batch(vocab: int = 8192, seed: int = 0) -> Rows:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (ROWS, LENGTH + 1), generator=generator)
    mask = torch.rand(ROWS, LENGTH, generator=generator) < 0.7
    return Rows(tokens[:, :-1], tokens[:, 1:], mask)


def peft_model(base_folder, adapter_folder, trainable: bool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32, experts_implementation="eager").eval()
    return PeftModel.from_pretrained(model, adapter_folder, is_trainable=trainable).eval()


def peft_gradients(base_folder, adapter_folder, rows: Rows) -> dict[str, torch.Tensor]:
    model = peft_model(base_folder, adapter_folder, trainable=True)
    logits = model(input_ids=rows.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[rows.mask], rows.targets[rows.mask], reduction="sum") / rows.mask.sum()
    loss.backward()
    return {name.replace(".default", ""): p.grad for name, p in model.named_parameters() if p.requires_grad}


def our_gradients(engine: Engine, adapters: Adapters, rows: Rows) -> dict[str, torch.Tensor]:
    Trainer(engine, adapters).gradients(rows)
    grads = Adapters(adapters.lora, {key: tuple(t.grad for t in pair) for key, pair in adapters.pairs.items()})
    return grads.state_dict(engine.config)


@pytest.mark.parametrize("targets", TARGET_SETS)
def test_gradients_of_every_adapter_match_peft_on_transformers(tiny, tmp_path, targets):
    engine = load(tiny)
    adapters = random_adapters(engine, TARGET_SETS[targets])
    adapters.save(tmp_path, engine.config)
    rows = batch()
    ours = our_gradients(engine, adapters, rows)
    theirs = peft_gradients(tiny, tmp_path, rows)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        assert (ours[name] - expected).abs().max() <= 1e-4 * expected.abs().max(), name


@pytest.mark.parametrize("slots", [1, 2])
def test_offloaded_training_equals_resident_bit_for_bit(tiny, slots):
    rows = batch()
    resident = load(tiny)
    expected = our_gradients(resident, random_adapters(resident, TARGET_SETS["all"]), rows)
    offloaded = load(tiny, slots=slots)
    actual = our_gradients(offloaded, random_adapters(offloaded, TARGET_SETS["all"]), rows)
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name
    stats = offloaded.expert_stats()
    assert stats["loads"] > 0


def test_saved_adapter_loaded_with_peft_gives_our_logits_with_lora(tiny, tmp_path):
    engine = load(tiny)
    random_adapters(engine, TARGET_SETS["all"]).save(tmp_path, engine.config)
    tokens = batch().inputs[:1]
    with torch.no_grad():
        expected = peft_model(tiny, tmp_path, trainable=False)(input_ids=tokens).logits[0]
    adapted = load(tiny, lora=tmp_path)
    cache = KVCache.allocate(adapted.config, 1, LENGTH, "cpu", torch.float32)
    actual = adapted.model(tokens, cache, start_pos=0)[0]
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    base = load(tiny).model(tokens, KVCache.allocate(adapted.config, 1, LENGTH, "cpu", torch.float32), start_pos=0)[0]
    assert (base - expected).abs().max() > 1e-2 * expected.abs().max()     # the adapter does change the logits
