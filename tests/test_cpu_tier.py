"""Experts computed on the CPU (offload/cpu_tier.py): the cost model's split, the planner's CPU layers, decode with
CPU-computed experts against the resident model on both fixtures (greedy tokens, perplexity), the stats and flags.
The CPU stands in for the device, as in test_offload.py: the seam is the same, the copies are plain copies."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_offload.cli import format_expert_stats, main
from moe_offload.config import OffloadConfig
from moe_offload.engine import cpu_experts
from moe_offload.errors import UserError
from moe_offload.model import KVCache, Transformer
from moe_offload.offload.cache import ForgetfulCache, LayerCache
from moe_offload.offload.cpu_tier import Calibration, CostModel, CpuExperts
from moe_offload.offload.planner import make_plan
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.server.metrics import Metrics
from moe_offload.step import DecodeStep

from conftest import EVAL_TEXT, FIXTURE_32L, requires_fixture
from test_offload import DECODE, greedy_logits, load_fixture

pytestmark = pytest.mark.usefixtures("one_thread")    # the cached fixtures' logits are made on one thread

MB = 10**6


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def costs(link_gbps: float, cpu_gbps: float, clock=None) -> CostModel:
    """A fake calibration: the CPU as fast at every row count; experts of 1 MB."""
    calibration = Calibration(link_gbps, tuple((rows, cpu_gbps) for rows in (1, 2, 4, 8)))
    return CostModel(calibration, MB, clock or Clock())


# ---- the cost model -----------------------------------------------------------------------------

def test_a_faster_cpu_takes_every_miss():
    assert costs(link_gbps=25, cpu_gbps=80).split({3: 1, 5: 1, 6: 1}, room=2) == {3, 5, 6}


def test_a_faster_link_takes_the_misses_its_slots_hold_and_the_cpu_the_rest():
    model = costs(link_gbps=55, cpu_gbps=1)
    assert model.split({3: 1}, room=2) == set()
    assert model.split({3: 1, 5: 1, 6: 1}, room=1) == {5, 6}


def test_equal_speeds_split_the_misses_so_both_finish_together():
    assert len(costs(link_gbps=50, cpu_gbps=50).split({1: 1, 2: 1}, room=8)) == 1
    assert len(costs(link_gbps=50, cpu_gbps=50).split({1: 1, 2: 1, 3: 1, 4: 1}, room=8)) == 2


def test_work_queued_on_the_link_sends_the_next_miss_to_the_cpu():
    clock = Clock()
    model = costs(link_gbps=50, cpu_gbps=40, clock=clock)
    assert model.split({1: 1}, room=2) == set()       # the link is faster and idle
    model.queue_copy()                                 # a prefetch: 20 us of the link
    assert model.split({1: 1}, room=2) == {1}         # 40 us on the link now, 25 us on the CPU
    clock.now += 1.0                                   # everything queued has finished
    assert model.split({1: 1}, room=2) == set()


def test_an_expert_used_by_more_rows_costs_the_cpu_more_passes():
    calibration = Calibration(50, ((1, 40.0), (2, 40.0), (4, 60.0), (8, 80.0)))
    assert calibration.cpu_seconds(MB, 1) == pytest.approx(MB / 40e9)
    assert calibration.cpu_seconds(MB, 3) == pytest.approx(MB / 60e9)        # the 4-row speed covers 3 rows
    assert calibration.cpu_seconds(MB, 11) == pytest.approx(MB / 80e9 + MB / 60e9)   # a pass of 8, one of 3


def test_without_a_cache_only_prefetched_experts_are_hits_so_the_rest_may_run_on_the_cpu():
    cache = ForgetfulCache(num_slots=2, expert_nbytes=1)
    list(cache.schedule([0, 1]))
    cache.prefetch(2, protected={2})
    assert cache.hits([0, 1, 2]) == [2] and LayerCache(2, 1).hits([0]) == []


# ---- the planner --------------------------------------------------------------------------------

def test_cpu_layers_get_no_slots_and_leave_the_budget_to_the_others():
    config = dataclasses.replace(load_fixture("shipped").engine.config, num_layers=4)
    kwargs = dict(expert_nbytes=2**20, dense_bytes=0, kv_bytes=0, max_context=16, workspace=0)
    plan = make_plan(config, device_budget=8 * 2**20, cpu_layers=2, **kwargs)
    assert plan.slots == {0: 0, 1: 0, 2: 4, 3: 4} and plan.cpu_layers == [0, 1]
    assert plan.ram_experts == 32                        # the CPU layers' experts are on the host too
    assert "(0: experts run on the CPU)" in plan.describe()
    assert make_plan(config, device_budget=2**20, cpu_layers=4, **kwargs).slots == dict.fromkeys(range(4), 0)
    with pytest.raises(UserError, match="raise --cpu-moe-layers"):
        make_plan(config, device_budget=2**20, cpu_layers=2, **kwargs)    # 2 layers on the device need 2 slots
    with pytest.raises(UserError, match="--cpu-moe-layers 5: use 0 to 4"):
        make_plan(config, device_budget=2**30, cpu_layers=5, **kwargs)


# ---- decode with CPU-computed experts against the resident model --------------------------------

def hybrid(fixture, slots: int, cpu_layers: int = 0, dynamic: bool = True) -> OffloadedExperts:
    """An offloaded provider whose decode misses all run on the CPU (a CPU far faster than the link), and whose
    first `cpu_layers` layers have no slots."""
    config = fixture.engine.config
    layers = config.moe_layers
    cost_model = costs(link_gbps=1, cpu_gbps=1e6) if dynamic else None
    cpu = CpuExperts(fixture.store, fixture.format, "cpu", cost_model, threads=1)
    plan = {layer: 0 if i < cpu_layers else slots for i, layer in enumerate(layers)}
    return OffloadedExperts(fixture.store, fixture.format, plan, "cpu", cpu=cpu)


FIXTURES = ["shipped", pytest.param("32l", marks=requires_fixture(FIXTURE_32L))]


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("slots, cpu_layers", [(2, 0), (1, 0), (2, 3)], ids=["dynamic", "one-slot", "static+dynamic"])
def test_greedy_tokens_equal_the_resident_models(name, slots, cpu_layers):
    fixture = load_fixture(name)
    provider = hybrid(fixture, slots, cpu_layers)
    actual = greedy_logits(Transformer(fixture.engine.config, fixture.engine.model.weights, provider), fixture.prompt)
    assert [int(l[-1].argmax()) for l in actual] == [int(l[-1].argmax()) for l in fixture.expected]
    for got, want in zip(actual, fixture.expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    stats = provider.summary()
    layers = len(fixture.engine.config.moe_layers)
    assert stats["cpu_uses"] >= DECODE * (layers - cpu_layers) // 2     # the decode misses ran there
    assert stats["hits"] + stats["misses"] == stats["requests"] and stats["cpu_gbps"] > 0
    for layer in fixture.engine.config.moe_layers[:cpu_layers]:
        s = provider.stats.layers[layer]
        assert s.cpu_uses == s.requests > 0 and s.loads == 0


@pytest.mark.parametrize("name", FIXTURES)
def test_perplexity_of_a_decode_with_cpu_experts_is_within_half_a_percent(name):
    """Teacher-forced, one token a step (decode: the CPU computes misses), 96 tokens of held-out text."""
    fixture = load_fixture(name)
    engine = fixture.engine
    text = engine.tokenizer.encode(open(EVAL_TEXT).read()[5000:9000])
    tokens = text[:97]

    def perplexity(provider) -> float:
        model = Transformer(engine.config, engine.model.weights, provider)
        cache = KVCache.allocate(engine.config, 1, len(tokens), "cpu", torch.float32)
        nll = 0.0
        for position, token in enumerate(tokens[:-1]):
            logits = model(torch.tensor([[token]]), cache, start_pos=position)[0, -1]
            nll -= float(torch.log_softmax(logits.double(), -1)[tokens[position + 1]])
        return math.exp(nll / (len(tokens) - 1))

    provider = hybrid(fixture, slots=2, cpu_layers=1)
    reference, actual = perplexity(engine.model.provider), perplexity(provider)
    assert abs(actual / reference - 1) < 0.005 and provider.summary()["cpu_uses"] > 0


def test_a_decode_step_with_cpu_experts_still_reads_the_host_once_per_layer(monkeypatch):
    """The step's input rides in the routing read; the CPU's products go back in a rows buffer and a mask."""
    from moe_offload.offload import provider as provider_module
    from moe_offload.generate import prefill

    fixture = load_fixture("shipped")
    engine = fixture.engine
    provider = hybrid(fixture, slots=2, cpu_layers=2)
    model = Transformer(engine.config, engine.model.weights, provider)
    cache = KVCache.allocate(engine.config, 1, 64, "cpu", torch.float32)
    step = DecodeStep(model, cache)
    step.set(0, int(prefill(model, cache, fixture.prompt[:20], "cpu")[-1].argmax()), 20, row=0)
    step(1)
    reads = []
    split = provider_module.split
    monkeypatch.setattr(provider_module, "split", lambda read: reads.append(read) or split(read))
    before = provider.summary()["cpu_uses"]
    step(1)
    assert len(reads) == len(engine.config.moe_layers) and provider.summary()["cpu_uses"] > before


# ---- the engine, the command line, the stats ----------------------------------------------------

def test_auto_is_off_on_a_cpu_device_and_static_layers_need_plain_experts():
    fixture = load_fixture("shipped")
    config = fixture.engine.config
    args = (fixture.format, fixture.store)
    assert cpu_experts(config, *args, OffloadConfig(enabled=True), torch.device("cpu"), torch.float32) is None
    static = cpu_experts(config, *args, OffloadConfig(enabled=True, cpu_moe_layers=2), torch.device("cpu"), torch.float32)
    assert static is not None and static.costs is None
    gpt_oss = dataclasses.replace(config, swiglu_limit=7.0, expert_bias=True)
    with pytest.raises(UserError, match="--cpu-moe-layers 1: the CPU runs plain SwiGLU"):
        cpu_experts(gpt_oss, *args, OffloadConfig(enabled=True, cpu_moe_layers=1), torch.device("cpu"), torch.float32)


def test_cli_cpu_moe_layers_generates_the_resident_text_and_reports_the_cpu(capsys):
    args = ["generate", "--prompt", "def fib(n):", "--max-tokens", "6", "--device", "cpu"]
    assert main(args) == 0
    resident = capsys.readouterr().out
    assert main(args + ["--cpu-moe-layers", "3", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == resident
    assert "0 in layers 0-2" in err and "(0: experts run on the CPU)" in err and "CPU ran" in err


@pytest.mark.parametrize("flags, message", [
    (["--cpu-experts", "off"], "error: --cpu-experts only applies to offloaded experts; add --offload"),
    (["--cpu-moe-layers", "9"], "error: --cpu-moe-layers 9: use 0 to 8"),
    (["--cpu-moe-layers", "-1"], "error: --cpu-moe-layers -1: use 0 or more"),
])
def test_cli_cpu_flag_errors_are_one_line(capsys, flags, message):
    assert main(["generate", "--prompt", "x", "--device", "cpu"] + flags) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_stats_line_and_metrics_show_the_cpu_next_to_the_link():
    stats = {"hit_rate": 0.5, "hits": 2, "requests": 4, "loads": 1, "prefetch_loads": 0, "prefetch_used": 0,
             "bytes_loaded": 66 * MB, "h2d_gbps": 50.0, "wait_seconds": 0.1, "copy_seconds": 0.25, "cpu_uses": 1,
             "cpu_bytes": 66 * MB, "cpu_seconds": 0.5, "cpu_gbps": 0.132}
    line = format_expert_stats(stats, seconds=1.0)
    assert "CPU ran 1 expert uses at 0.1 GB/s, busy 0.50 s (50%), link busy 0.25 s (25%)" in line
    assert "CPU ran" not in format_expert_stats({**stats, "cpu_uses": 0}, seconds=1.0)
    text = Metrics().render(0, 1, 0, stats)
    assert "moe_offload_expert_cpu_uses 1" in text and "moe_offload_expert_cpu_seconds 0.5" in text
