"""Expert offloading on the CPU tier: bit-identity with the resident model, LRU bookkeeping on
hand-written routing, prefetch, the host store's disk tier, and the CLI flags."""

from __future__ import annotations

import functools
import os
import traceback

import pytest
import torch

from moe_offload.cli import main
from moe_offload.config import QuantConfig, RuntimeConfig
from moe_offload.engine import Engine, expert_storage
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import UserError
from moe_offload.generate import PREFILL_CHUNK, prefill
from moe_offload.model import KVCache, Transformer
from moe_offload.offload.cache import LayerCache, LayerStats, OffloadStats
from moe_offload.offload.prefetch import GatePredictor
from moe_offload.offload import provider as provider_module
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.offload.store import ExpertStore
from moe_offload.step import DecodeStep

from conftest import EVAL_TEXT, FIXTURE_32L, SHIPPED_MODEL, requires_fixture, write_tiny_mixtral

PROMPT, DECODE = 24, 6


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- LRU bookkeeping on hand-written routing -------------------------------------------------

def run_step(cache: LayerCache, needed) -> list[tuple[str, int, int]]:
    return list(cache.schedule(needed))


def test_lru_evicts_least_recently_used_and_counts():
    cache = LayerCache(num_slots=2, expert_nbytes=10)
    assert run_step(cache, [0, 1]) == [("load", 0, 0), ("load", 1, 1), ("issued", -1, -1), ("use", 0, 0), ("use", 1, 1)]
    assert cache.resident == [0, 1]
    run_step(cache, [2])                      # evicts 0, the least recently used
    assert cache.resident == [1, 2] and cache.slot_of == {1: 1, 2: 0}
    assert run_step(cache, [1]) == [("issued", -1, -1), ("use", 1, 1)]
    assert cache.resident == [2, 1]
    run_step(cache, [0, 3])                   # evicts 2, then 1
    assert set(cache.resident) == {0, 3}
    s = cache.stats
    assert (s.requests, s.hits, s.misses, s.evictions, s.loads, s.bytes_loaded) == (6, 1, 5, 3, 5, 50)
    assert s.hit_rate == pytest.approx(1 / 6)


def test_experts_of_the_current_step_are_never_evicted_before_use():
    cache = LayerCache(num_slots=2, expert_nbytes=1)
    run_step(cache, [0, 1])
    run_step(cache, [1])
    run_step(cache, [0])                      # order now: 1 (least recent), 0
    # 1 is the least recently used, but this step needs it: 0 goes instead.
    actions = run_step(cache, [1, 2])
    assert ("load", 2, cache.slot_of[2]) in actions and cache.slot_of[2] == 0
    assert cache.stats.hits == 3


def test_one_slot_streams_every_needed_expert_once_hits_first():
    cache = LayerCache(num_slots=1, expert_nbytes=1)
    run_step(cache, [5])
    actions = run_step(cache, list(range(8)))
    uses = [e for a, e, _ in actions if a == "use"]
    loads = [e for a, e, _ in actions if a == "load"]
    assert uses[0] == 5 and sorted(uses) == list(range(8))
    assert sorted(loads) == [0, 1, 2, 3, 4, 6, 7]            # each missing expert loaded exactly once
    # a load never comes between another load and its use: one slot, one expert at a time
    kinds = [a for a, _, _ in actions if a != "issued"]
    assert kinds == ["use"] + ["load", "use"] * 7


def test_hits_are_used_in_the_order_their_copies_started():
    cache = LayerCache(num_slots=4, expert_nbytes=1)
    run_step(cache, [3])
    run_step(cache, [1])
    cache.prefetch(6, protected={6})
    uses = [e for a, e, _ in run_step(cache, [6, 1, 3, 0]) if a == "use"]
    assert uses == [3, 1, 6, 0]


def test_prefetch_fills_free_then_lru_slots_and_respects_protection():
    cache = LayerCache(num_slots=2, expert_nbytes=1)
    run_step(cache, [0])
    assert cache.prefetch(0, {0}) is None                   # already there
    slot = cache.prefetch(4, {4})
    assert slot == 1 and cache.resident == [0, 4]
    assert cache.prefetch(5, {4, 5}) == cache.slot_of[5] and 0 not in cache.slot_of   # 4 protected: 0 goes
    assert cache.prefetch(6, {4, 5, 6}) is None             # every slot protected
    run_step(cache, [5, 7])
    s = cache.stats
    assert (s.prefetch_loads, s.prefetch_used, s.hits, s.misses) == (2, 1, 1, 2)


def test_stats_summary_recall_precision_and_reset():
    stats = OffloadStats({0: LayerStats(), 1: LayerStats()})
    stats.layers[1].record_prediction(1, predicted=[2, 3, 4], used=[3, 4])
    stats.layers[1].record_prediction(1, predicted=[2, 3, 4], used=[5, 6])
    stats.layers[1].record_prediction(2, predicted=[1], used=[1, 2])
    stats.layers[0].requests, stats.layers[0].hits = 4, 1
    stats.layers[1].requests, stats.layers[1].hits = 4, 3
    s = stats.summary()
    assert s["prefetch_recall"] == pytest.approx(2 / 4) and s["prefetch_precision"] == pytest.approx(2 / 6)
    assert s["prefetch_recall_d2"] == pytest.approx(1 / 2) and s["prefetch_precision_d2"] == 1.0
    assert s["hit_rate"] == pytest.approx(0.5) and s["mean_layer_hit_rate"] == pytest.approx(0.5)
    layer = stats.layers[0]
    stats.reset()
    assert stats.layers[0] is layer and stats.summary()["requests"] == 0


# ---- the host store ---------------------------------------------------------------------------

def test_store_puts_the_overflow_in_an_unlinked_memory_mapped_file(tmp_path):
    store = ExpertStore(layers=[0, 2], num_experts=3, nbytes=64, ram_experts=4, disk_dir=tmp_path)
    assert (store.ram_experts, store.disk_experts, store.disk_bytes) == (4, 2, 128)
    data = {(layer, e): torch.randint(0, 256, (64,), dtype=torch.uint8) for layer in (0, 2) for e in range(3)}
    for (layer, e), buffer in data.items():
        store.write(layer, e, buffer)
    assert all(torch.equal(store.buffer(layer, e), buffer) for (layer, e), buffer in data.items())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="uint8 buffer of 64 bytes"):
        store.write(0, 0, torch.zeros(63, dtype=torch.uint8))


def test_store_names_the_folder_it_cannot_write(tmp_path):
    with pytest.raises(UserError, match="--offload-dir"):
        ExpertStore(layers=[0], num_experts=2, nbytes=64, ram_experts=0, disk_dir=tmp_path / "missing")


# ---- offloaded vs resident: bit-identical logits and greedy tokens ----------------------------

class Fixture:
    """A resident engine, a host store of its experts, and the resident model's greedy logits. `quant` ("4/2"):
    the model HQQ-quantized on load, and the store holds the resident model's own packed experts."""

    def __init__(self, folder, device: str = "cpu", dtype: torch.dtype = torch.float32, quant: str | None = None):
        self.device = device
        self.engine = Engine.load(RuntimeConfig(model=folder, device=device, dtype=str(dtype).removeprefix("torch."),
                                                quant=QuantConfig.parse(quant) if quant else None), progress=False)
        config = self.engine.config
        if quant is None:
            self.format, buffer = expert_storage(Checkpoint.open(folder), dtype)
        else:                 # the resident slots' bytes: quantizing the checkpoint again would take seconds
            resident = self.engine.model.provider
            self.format = resident.expert_format
            buffer = lambda layer, e: resident.slots_by_layer[layer].memory[e, :self.format.nbytes]
        # half the experts in (pinned, on CUDA) RAM, half on the disk tier
        self.store = ExpertStore(config.moe_layers, config.num_experts, self.format.nbytes,
                                 ram_experts=len(config.moe_layers) * config.num_experts // 2, pin=device == "cuda")
        for layer in config.moe_layers:
            for e in range(config.num_experts):
                self.store.write(layer, e, buffer(layer, e))
        self.prompt = self.engine.tokenizer.encode(open(EVAL_TEXT).read()[:2000])[:PROMPT]
        self.expected = greedy_logits(self.engine.model, self.prompt)

    def offloaded(self, slots: int, prefetch: bool, measure_time: bool = False) -> OffloadedExperts:
        config, layers = self.engine.config, self.engine.model.weights.layers
        predictor = GatePredictor(config, layers, depth=2, top_n=3) if prefetch else None
        return OffloadedExperts(self.store, self.format, dict.fromkeys(config.moe_layers, slots), self.device,
                                predictor, measure_time)


def greedy_logits(model: Transformer, prompt: list[int], after_prefill=lambda: None) -> list[torch.Tensor]:
    """Prefill logits of every prompt position, then DECODE greedy steps' logits."""
    embed = model.weights.embed
    cache = KVCache.allocate(model.config, 1, len(prompt) + DECODE, embed.device, embed.dtype)
    logits = [prefill(model, cache, prompt, embed.device, last_only=False)]
    after_prefill()
    for step in range(DECODE):
        token = int(logits[-1][-1].argmax())
        logits.append(model(torch.tensor([[token]], device=embed.device), cache, start_pos=len(prompt) + step)[0])
    return logits


FIXTURES = {"shipped": SHIPPED_MODEL, "32l": FIXTURE_32L}


@functools.cache
def load_fixture(name: str, quant: str | None = None) -> Fixture:
    return Fixture(FIXTURES[name], quant=quant)


@pytest.fixture(scope="module", params=["shipped", pytest.param("32l", marks=requires_fixture(FIXTURE_32L))])
def fixture(request):
    return load_fixture(request.param)


@pytest.mark.parametrize("prefetch", [False, True], ids=["no_prefetch", "prefetch"])
@pytest.mark.parametrize("slots", [1, 2, 4, 7])
def test_offloaded_logits_and_greedy_tokens_are_bit_identical_to_resident(fixture, slots, prefetch):
    check_bit_identical(fixture, slots, prefetch)


def check_bit_identical(fixture: Fixture, slots: int, prefetch: bool, measure_time: bool = False) -> dict:
    provider = fixture.offloaded(slots, prefetch, measure_time)
    model = Transformer(fixture.engine.config, fixture.engine.model.weights, provider)
    actual = greedy_logits(model, fixture.prompt)
    for got, want in zip(actual, fixture.expected, strict=True):
        assert torch.equal(got, want)
    stats = provider.summary()
    assert stats["misses"] > 0 and stats["bytes_loaded"] == stats["loads"] * fixture.format.nbytes
    assert stats["hits"] + stats["misses"] == stats["requests"]
    assert all(len(provider.caches[layer].slot_of) <= slots for layer in provider.caches)
    if prefetch:
        assert stats["prefetch_loads"] > 0 and 0 < stats["prefetch_recall"] <= 1 and "prefetch_recall_d2" in stats
    else:
        assert stats["prefetch_loads"] == 0 and "prefetch_recall" not in stats
    return stats


class Oracle:
    """Predicts exactly the experts each layer will use, from a recorded resident run."""

    def __init__(self, routing):
        self.routing, self.calls = routing, 0

    def predict(self, layer, residual):
        step, index = divmod(self.calls, len(self.routing[0]))
        self.calls += 1
        layers = sorted(self.routing[0])
        if index + 1 == len(layers):
            return {}
        target = layers[index + 1]
        return {target: torch.tensor(self.routing[step][target])}


class Recorder:
    def __init__(self, inner):
        self.inner, self.routing = inner, []
        self.expert_format = inner.expert_format

    def experts(self, layer, ids, residual, x):
        if not self.routing or layer in self.routing[-1]:
            self.routing.append({})
        self.routing[-1][layer] = sorted(set(ids.flatten().tolist()))
        return self.inner.experts(layer, ids, residual, x)


def test_perfect_predictions_make_every_later_layer_hit_in_decode():
    fixture = load_fixture("shipped")
    engine = fixture.engine
    recorder = Recorder(engine.model.provider)
    greedy_logits(Transformer(engine.config, engine.model.weights, recorder), fixture.prompt)
    provider = fixture.offloaded(slots=2, prefetch=False)    # top-2: a decode step fits in 2 slots
    provider.predictor = Oracle(recorder.routing)
    greedy_logits(Transformer(engine.config, engine.model.weights, provider), fixture.prompt, provider.stats.reset)
    decode_layers = [provider.stats.layers[layer] for layer in engine.config.moe_layers[1:]]
    first = provider.stats.layers[engine.config.moe_layers[0]]
    assert all(s.misses == 0 for s in decode_layers) and first.misses > 0
    summary = provider.summary()
    assert summary["prefetch_recall"] == 1.0 and summary["prefetch_precision"] == 1.0


def test_long_prompt_streams_through_one_slot_per_layer(tmp_path):
    folder = write_tiny_mixtral(tmp_path, num_local_experts=8, max_position_embeddings=4096)
    fixture = Fixture(folder)
    engine = fixture.engine
    prompt = engine.tokenizer.encode(open(EVAL_TEXT).read()[:40000])[:3000]
    cache = KVCache.allocate(engine.config, 1, len(prompt), "cpu", torch.float32)
    expected = prefill(engine.model, cache, prompt, "cpu")
    provider = fixture.offloaded(slots=1, prefetch=True)
    actual = prefill(Transformer(engine.config, engine.model.weights, provider), cache, prompt, "cpu")
    assert torch.equal(actual, expected)
    forwards = -(-len(prompt) // PREFILL_CHUNK)   # each expert crosses once per forward
    for stats in provider.stats.layers.values():
        assert stats.requests == forwards * engine.config.num_experts    # a long chunk needs every expert
        assert stats.misses <= stats.requests                            # each loaded at most once per forward


# ---- the command line ---------------------------------------------------------------------------

def test_cli_offload_generates_the_resident_text_and_prints_plan_and_stats(capsys):
    args = ["generate", "--prompt", "def fib(n):", "--max-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert main(args + ["--offload", "--slots", "1", "--cpu-memory", "20MiB", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == resident
    assert "offload plan" in err and "1 in layers 0-7" in err and "memory-mapped from disk (43 experts)" in err
    assert "experts: hit rate" in err and "prefetch recall" in err


@pytest.mark.parametrize("flags, message", [
    (["--offload", "--gpu-memory", "10MiB"], "error: --gpu-memory 0.01 GiB is too small"),
    (["--offload", "--gpu-memory", "lots"], "error: --gpu-memory 'lots' is not a size"),
    (["--gpu-memory", "1GiB"], "error: --gpu-memory only applies to offloaded experts; add --offload"),
    (["--offload", "--slots", "9"], "error: --slots 9: use 1 to 8"),
    (["--offload", "--prefetch-depth", "0"], "error: --prefetch-depth 0"),
    (["--offload", "--prefetch-depth", "99"], "error: --prefetch-depth 99: use 1 to 7 (the model has 8 MoE layers)"),
    (["--offload", "--prefetch", "100"], "error: --prefetch 100: use 0 (off) to 8 (the experts per layer)"),
    (["--prefetch", "2"], "error: --prefetch only applies to offloaded experts; add --offload"),
    (["--prefetch-depth", "1"], "error: --prefetch-depth only applies to offloaded experts; add --offload"),
])
def test_cli_offload_flag_errors_are_one_line(capsys, flags, message):
    assert main(["generate", "--prompt", "x", "--device", "cpu"] + flags) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_an_offloaded_decode_step_reads_the_host_once_per_moe_layer(monkeypatch):
    """The routing read (the layer's chosen experts and the predictor's guesses together) is the only host read
    of a layer's step; the slots go back to the device in a table. The one other read is the CPU's own: the
    torch twin of decode attention takes its rows' positions (ops.py; CUDA runs the kernel, which reads none)."""
    fixture = load_fixture("shipped")
    engine = fixture.engine
    model = Transformer(engine.config, engine.model.weights, fixture.offloaded(slots=2, prefetch=True))
    cache = KVCache.allocate(engine.config, 1, 64, "cpu", torch.float32)
    step = DecodeStep(model, cache)
    step.set(0, int(prefill(model, cache, fixture.prompt[:20], "cpu")[-1].argmax()), 20, row=0)
    step(1)
    routing_reads, other_reads = [], []
    split = provider_module.split
    monkeypatch.setattr(provider_module, "split", lambda read: routing_reads.append(read) or split(read))

    def reader(original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if not (caller.filename.endswith("ops.py") and caller.name == "decode_attention"):
                other_reads.append(f"{caller.filename}:{caller.lineno}")
            return original(self, *args, **kwargs)
        return read

    for name in ("tolist", "item", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, reader(getattr(torch.Tensor, name)))
    step(1)
    assert len(routing_reads) == len(engine.config.moe_layers) and other_reads == []



def test_streamed_misses_load_those_more_rows_need_first(fixture):
    """A batch step with more experts than slots: the misses stream through the one slot in order of the rows that
    chose them (most first, ties by id), whatever their ids."""
    provider = fixture.offloaded(1, prefetch=False)
    config = fixture.engine.config
    assert (config.top_k, config.num_experts) == (2, 8)
    ids = torch.tensor([[6, 1], [6, 3], [6, 1], [1, 0], [2, 0]], device=fixture.device)   # 1 and 6: 3 rows, 0: 2
    loaded = []
    load = provider._load
    provider._load = lambda layer, expert, slot: (loaded.append(expert), load(layer, expert, slot))
    x = torch.zeros(len(ids), config.hidden_size, device=fixture.device, dtype=fixture.engine.model.weights.embed.dtype)
    for _ in provider.experts(config.moe_layers[0], ids, x, x):
        pass
    assert loaded == [1, 6, 0, 2, 3]
