"""LoRA fine-tuning against transformers + peft (fp32, CPU): gradients, saved adapters, offloaded == resident."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from moe_offload.cli import main
from moe_offload.config import FinetuneConfig, LoraConfig, OffloadConfig, RuntimeConfig
from moe_offload import engine as engine_module
from moe_offload import train as train_module
from moe_offload.engine import Engine
from moe_offload.errors import UserError
from moe_offload.lora import Adapters
from moe_offload.model import KVCache
from moe_offload.train import Rows, Trainer, _chat_example, pack, read_examples, training_bytes

from conftest import SHIPPED_MODEL, write_tiny_mixtral

ROWS, LENGTH = 2, 24
SEED_OF_FEW_EXPERTS = 0   # batch(rows=1)'s first 2 tokens route to at most 3 of the 4 experts in a layer
TARGET_SETS = {"attention": ("attention",), "router": ("router",), "experts": ("experts",),
               "all": ("attention", "router", "experts")}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_mixtral(tmp_path_factory.mktemp("tiny"), num_local_experts=4, intermediate_size=96)


def load(folder, lora=None, slots=None, device="cpu") -> Engine:
    offload = (OffloadConfig(enabled=True, slots_per_layer=slots, prefetch_experts=0, gpu_memory=2**30, cpu_experts="off")
               if slots else OffloadConfig())    # training computes experts on the device only
    return Engine.load(RuntimeConfig(model=folder, device=device, dtype="float32", max_context=64, lora=lora),
                       progress=False, offload=offload)


def random_adapters(engine: Engine, targets, seed: int = 1, device="cpu") -> Adapters:
    """Adapters with B not zero (as after some training), so that every A has a gradient."""
    adapters = Adapters.create(engine.config, LoraConfig(rank=4, alpha=8, targets=targets), device, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in adapters.pairs.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    return adapters


def batch(vocab: int = 8192, seed: int = 0, rows: int = ROWS) -> Rows:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (rows, LENGTH + 1), generator=generator)
    mask = torch.rand(rows, LENGTH, generator=generator) < 0.7
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


def our_gradients(engine: Engine, adapters: Adapters, rows: Rows, micro_rows: int | None = None) -> dict[str, torch.Tensor]:
    return gradients_and_loss(engine, adapters, rows, micro_rows)[0]


def gradients_and_loss(engine: Engine, adapters: Adapters, rows: Rows, micro_rows: int | None = None):
    loss = Trainer(engine.model, adapters, micro_rows=micro_rows).gradients(rows)
    grads = Adapters(adapters.lora, {key: tuple(t.grad for t in pair) for key, pair in adapters.pairs.items()})
    return grads.state_dict(engine.config), loss


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
    # backward's prefetch is exact: every expert it copies is used, and no expert crosses twice in a layer's pass
    stats = offloaded.expert_stats()
    assert stats["prefetch_used"] == stats["prefetch_loads"] > 0
    assert stats["loads"] <= stats["requests"]


def test_backward_takes_a_layer_whose_experts_all_fit_one_expert_at_a_time(tiny, monkeypatch):
    """3 slots of 4 experts and 2 tokens: a layer's step needs at most 3 experts here, which then come as one batch;
    backward splits it by slot (one expert's activations held at a time) and still gives resident's bits."""
    original, parts_per_batch = train_module.one_slot_each, []

    def counted(batches):
        for batch in batches:
            parts = list(original([batch]))
            parts_per_batch.append(len(parts))
            yield from parts

    monkeypatch.setattr(train_module, "one_slot_each", counted)
    rows = Rows(*(t[:, :2] for t in batch(rows=1, seed=SEED_OF_FEW_EXPERTS)))
    resident = load(tiny)
    expected = our_gradients(resident, random_adapters(resident, TARGET_SETS["all"]), rows)
    offloaded = load(tiny, slots=3)
    actual = our_gradients(offloaded, random_adapters(offloaded, TARGET_SETS["all"]), rows)
    for name, grad in expected.items():
        assert torch.equal(actual[name], grad), name
    assert max(parts_per_batch) > 1      # some layer's experts came as one batch over several slots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("slots", [None, 1])
def test_training_on_cuda_gives_the_cpus_gradients(tiny, slots):
    """fp32 on the GPU: the fused decode kernels stay out of autograd, and backward's recomputation runs the forward's
    attention backends (the first H100 run failed on both), so the gradients are the CPU's up to rounding."""
    rows = batch()
    cpu = load(tiny)
    expected = our_gradients(cpu, random_adapters(cpu, TARGET_SETS["all"]), rows)
    cuda = load(tiny, slots=slots, device="cuda")
    actual = our_gradients(cuda, random_adapters(cuda, TARGET_SETS["all"], device="cuda"), Rows(*(t.cuda() for t in rows)))
    for name, grad in expected.items():
        assert (actual[name].cpu() - grad).abs().max() <= 1e-3 * grad.abs().max(), name


@pytest.mark.parametrize("slots", [None, 1])
def test_gradients_accumulated_over_micro_batches_equal_the_one_pass_gradients(tiny, slots):
    """5 rows, 2 a pass (2, 2, 1), one row without targets: each pass weighs its loss by the whole step's count."""
    rows = batch(rows=5)
    rows.mask[2] = False
    resident = load(tiny)
    expected, expected_loss = gradients_and_loss(resident, random_adapters(resident, TARGET_SETS["all"]), rows)
    engine = load(tiny, slots=slots)
    actual, loss = gradients_and_loss(engine, random_adapters(engine, TARGET_SETS["all"]), rows, micro_rows=2)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, grad in expected.items():
        assert (actual[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    if slots:    # backward's prefetch follows each pass's own routing: every expert it copies is used
        stats = engine.expert_stats()
        assert stats["prefetch_used"] == stats["prefetch_loads"] > 0


def test_training_bytes_shrink_with_the_micro_batch(tiny):
    config, lora = load(tiny).config, LoraConfig(targets=TARGET_SETS["all"])
    sizes = [training_bytes(config, lora, FinetuneConfig(seq_len=32, batch_tokens=256, micro_batch_tokens=micro),
                            torch.bfloat16) for micro in (32, 64, 128, 256, None)]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3] == sizes[4]


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


# ---- the finetune command ---------------------------------------------------------------------

def write_doubling_task(path, count: int, seed: int):
    """A small task the shipped model (trained on Python) does not know: `# double a` -> `x = 2a`."""
    generator = random.Random(seed)
    lines = []
    for _ in range(count):
        a = generator.randint(1, 60)
        lines.append(json.dumps({"prompt": f"# double {a}\n", "completion": f"x = {2 * a}\n"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def held_out_loss(engine: Engine, data) -> float:
    rows = pack(read_examples(data, engine.tokenizer, chat=False), 32, 0)
    cache = KVCache.allocate(engine.config, len(rows.inputs), 32, "cpu", torch.float32)
    logits = engine.model(rows.inputs, cache, start_pos=0)
    return torch.nn.functional.cross_entropy(logits[rows.mask], rows.targets[rows.mask]).item()


FINETUNE = ["finetune", "--device", "cpu", "--seq-len", "32", "--batch-tokens", "128", "--lr", "3e-3", "--lora-rank", "4"]


def test_finetune_on_the_shipped_model_lowers_held_out_loss_and_generate_applies_it(tmp_path, capsys):
    train, held_out = write_doubling_task(tmp_path / "train.jsonl", 300, 0), write_doubling_task(tmp_path / "test.jsonl", 40, 1)
    out = tmp_path / "adapter"
    assert main(FINETUNE + ["--data", str(train), "--out", str(out), "--steps", "12", "--targets", "attention,experts"]) == 0
    assert "wrote" in capsys.readouterr().err
    runtime = dict(model=SHIPPED_MODEL, device="cpu", dtype="float32", max_context=64)
    before = held_out_loss(Engine.load(RuntimeConfig(**runtime), progress=False), held_out)
    after = held_out_loss(Engine.load(RuntimeConfig(**runtime, lora=out), progress=False), held_out)
    assert after < 0.8 * before
    assert main(["generate", "--device", "cpu", "--lora", str(out), "--prompt", "# double 7\n", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("x =")


@pytest.mark.parametrize("resumed_micro_batch", [None, 32])
def test_an_interrupted_finetune_resumes_where_its_last_checkpoint_left_off(tiny, tmp_path, monkeypatch, capsys,
                                                                           resumed_micro_batch):
    """Resumed with another --micro-batch-tokens too: it changes memory, not the gradients (but for rounding)."""
    data = write_doubling_task(tmp_path / "train.jsonl", 60, 0)
    args = FINETUNE + ["--model", str(tiny), "--data", str(data), "--steps", "4", "--save-every", "2",
                       "--targets", "attention,router,experts"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    steps = []
    step = Trainer.step

    def interrupted(self, rows):
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(1)
        return step(self, rows)

    monkeypatch.setattr(Trainer, "step", interrupted)
    assert main(args + ["--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(Trainer, "step", step)
    micro = [] if resumed_micro_batch is None else ["--micro-batch-tokens", str(resumed_micro_batch)]
    assert main(args + ["--out", str(tmp_path / "resumed")] + micro) == 0
    assert "resuming" in capsys.readouterr().err
    whole, resumed = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    if resumed_micro_batch is None:
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    else:      # adapters of size ~0.01-0.1, differing by ~1e-8 (fp32 rounding)
        assert all(torch.allclose(whole[k], resumed[k], rtol=0, atol=1e-6) for k in whole)


@pytest.mark.parametrize("extra, line, message", [
    ([], None, "cannot read it"),
    ([], '{"text": "a"}\n{"text": oops}\n', "line 2 is not JSON"),
    ([], '{"text": "a"}\n{"words": "b"}\n', 'line 2: expected {"text": ...}'),
    (["--chat"], '{"text": "a"}\n', 'line 1: with --chat, expected {"messages"'),
    (["--lora-rank", "0"], '{"text": "a"}\n', "--lora-rank 0: the rank must be at least 1"),
    (["--targets", "attention,mlp"], '{"text": "a"}\n', "--targets 'attention,mlp'"),
    (["--seq-len", "64", "--batch-tokens", "32"], '{"text": "a"}\n', "--batch-tokens 32 is less than --seq-len 64"),
    (["--seq-len", "64", "--micro-batch-tokens", "32"], '{"text": "a"}\n', "--micro-batch-tokens 32: must be between"),
    (["--batch-tokens", "256", "--micro-batch-tokens", "512", "--seq-len", "64"], '{"text": "a"}\n',
     "--micro-batch-tokens 512: must be between --seq-len 64 (one row a pass) and --batch-tokens 256"),
])
def test_bad_finetune_input_is_one_error_line(tmp_path, capsys, extra, line, message):
    data = tmp_path / "data.jsonl"
    if line is not None:
        data.write_text(line)
    assert main(["finetune", "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "out")] + extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_adapters_on_the_fly_give_the_merged_logits(tiny, tmp_path):
    engine = load(tiny)
    adapters = random_adapters(engine, TARGET_SETS["all"])
    adapters.save(tmp_path, engine.config)
    tokens = batch().inputs[:1]
    with torch.no_grad():
        on_the_fly = Trainer(engine.model, adapters).logits(tokens)[0]
    merged = load(tiny, lora=tmp_path).model(tokens, KVCache.allocate(engine.config, 1, LENGTH, "cpu", torch.float32), 0)[0]
    assert (on_the_fly - merged).abs().max() <= 1e-5 * merged.abs().max()


def test_finetune_runs_on_quantized_offloaded_experts_and_generate_applies_them_on_the_fly(tiny, tmp_path, capsys):
    data = write_doubling_task(tmp_path / "train.jsonl", 40, 0)
    quantized = ["--model", str(tiny), "--quant", "4/2", "--offload", "--slots", "1", "--gpu-memory", "4GiB"]
    assert main(FINETUNE + quantized + ["--data", str(data), "--out", str(tmp_path / "a"), "--steps", "2",
                                        "--targets", "attention,router,experts"]) == 0
    assert main(["generate", "--device", "cpu", "--lora", str(tmp_path / "a"), "--prompt", "# double 3\n",
                 "--max-tokens", "3"] + quantized) == 0


# ---- with the CPU expert tier (offload/cpu_tier.py), whose kernels know nothing of adapters ------------

def test_merged_expert_adapters_apply_on_cpu_computed_layers_too(tiny, tmp_path):
    """Unquantized experts carry --lora's adapters merged in the store, so the CPU tier computes them adapted."""
    random_adapters(load(tiny), TARGET_SETS["all"]).save(tmp_path, load(tiny).config)
    tokens = batch().inputs[:1]
    resident = load(tiny, lora=tmp_path)
    expected = resident.model(tokens, KVCache.allocate(resident.config, 1, LENGTH, "cpu", torch.float32), 0)[0]
    offload = OffloadConfig(enabled=True, slots_per_layer=2, prefetch_experts=0, gpu_memory=2**30, cpu_moe_layers=1)
    hybrid = Engine.load(RuntimeConfig(model=tiny, device="cpu", dtype="float32", max_context=64, lora=tmp_path),
                         progress=False, offload=offload)
    assert hybrid.model.provider.cpu is not None and hybrid.model.provider.cpu_layers == {0}
    actual = hybrid.model(tokens, KVCache.allocate(hybrid.config, 1, LENGTH, "cpu", torch.float32), 0)[0]
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("targets, auto_becomes", [(("experts",), "off"), (("attention",), "auto")])
def test_expert_adapters_on_quantized_experts_keep_experts_off_the_cpu(tiny, tmp_path, capsys, monkeypatch, targets,
                                                                      auto_becomes):
    engine = load(tiny)
    random_adapters(engine, targets).save(tmp_path / "a", engine.config)
    args = ["generate", "--device", "cpu", "--model", str(tiny), "--quant", "4/2", "--lora", str(tmp_path / "a"),
            "--prompt", "x", "--max-tokens", "1", "--offload", "--slots", "1", "--gpu-memory", "4GiB"]
    if "experts" in targets:
        assert main(args + ["--cpu-moe-layers", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: --cpu-moe-layers 1: --lora's adapters on quantized experts") and err.count("\n") == 1
    seen = []    # on a CPU device "auto" turns itself off later: what the engine asks the CPU tier for is the point
    monkeypatch.setattr(engine_module, "cpu_experts", lambda config, fmt, store, offload, *rest: seen.append(offload.cpu_experts))
    assert main(args + ["--cpu-experts", "auto"]) == 0
    assert seen == [auto_becomes]


def test_finetune_never_runs_experts_on_the_cpu(tiny, tmp_path, capsys):
    data = write_doubling_task(tmp_path / "train.jsonl", 20, 0)
    assert main(FINETUNE + ["--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "a"), "--steps", "1",
                            "--cpu-moe-layers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --cpu-moe-layers 1: fine-tuning") and err.count("\n") == 1
    assert not (tmp_path / "a").exists()
    offload = OffloadConfig(enabled=True, slots_per_layer=2, prefetch_experts=0, gpu_memory=2**30, cpu_moe_layers=1)
    hybrid = Engine.load(RuntimeConfig(model=tiny, device="cpu", dtype="float32", max_context=64), progress=False,
                         offload=offload)
    with pytest.raises(UserError, match="experts computed on the CPU have no gradients"):
        Trainer(hybrid.model, Adapters.create(hybrid.config, LoraConfig(rank=4, alpha=8, targets=("attention",))))


def test_chat_examples_learn_only_the_assistants_turns():
    from moe_offload.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(SHIPPED_MODEL)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    example = _chat_example(messages, tokenizer, "test")
    learned = tokenizer.decode([t for t, m in zip(example.tokens, example.trained) if m])
    assert "hello there" in learned and "see you" in learned
    assert "hi" not in learned.replace("hello there", "") and "bye" not in learned


def test_bench_train_on_synthetic_shapes_prints_a_json_report_last(capsys):
    assert main(["bench", "--train", "--synthetic", "tiny", "--device", "cpu", "--quant", "bf16", "--budget", "2GiB,1MiB",
                 "--seq-len", "8", "--train-steps", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fits, too_small = report["results"]
    assert fits["status"] == "ok" and fits["tokens_per_second"] > 0 and fits["resident_need_gib"] > 0
    assert too_small["status"] == "does not fit"
