"""Experts computed on the CPU (offload/cpu_tier.py): the cost model's split, the planner's CPU layers, decode with
CPU-computed experts (fp32, HQQ 4/2 and 4/3) against the resident model on both fixtures (greedy tokens,
perplexity), the stats and flags.
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
from moe_offload.offload.planner import cpu_tier_bytes, make_plan, plan_for
from moe_offload.offload.provider import OffloadedExperts
from moe_offload.quant import cpu_kernels
from moe_offload.server.metrics import Metrics
from moe_offload.step import DecodeStep

from conftest import EVAL_TEXT, FIXTURE_32L, requires_fixture
from test_offload import DECODE, greedy_logits, load_fixture

pytestmark = pytest.mark.usefixtures("one_thread")    # the cached fixtures' logits are made on one thread

MB = 10**6
EXPERT = 64 * MB         # Mixtral-8x7B's experts at 4/2 are 64 MiB: 1.2 ms over a 55 GB/s link


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def costs(link_gbps: float, cpu_gbps: float, clock=None) -> CostModel:
    """A fake calibration: the CPU as fast at every row count; experts of 64 MB."""
    calibration = Calibration(link_gbps, tuple((rows, cpu_gbps) for rows in (1, 2, 4, 8)))
    return CostModel(calibration, EXPERT, clock or Clock())


class AllOnCpu(CostModel):
    """Every decode miss on the CPU, whatever the speeds observed (the decode tests exercise the CPU's path)."""

    def __init__(self, nbytes: int):
        super().__init__(Calibration(1.0, tuple((rows, 1.0) for rows in (1, 2, 4, 8))), nbytes)

    def split(self, misses, room):
        return set(misses)


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
    assert model.split({1: 1}, room=2) == set()       # the link is faster and idle: 1.28 ms against 1.6 + 0.1
    model.queue_copy()                                 # a prefetch: 1.28 ms of the link
    assert model.split({1: 1}, room=2) == {1}         # 2.56 ms on the link now, 1.7 ms on the CPU
    clock.now += 1.0                                   # everything queued has finished
    assert model.split({1: 1}, room=2) == set()


def test_the_gpu_waits_for_the_cpu_so_a_cpu_barely_faster_per_expert_loses():
    """The CPU's rows reach the device CPU_LATENCY after it finishes: 1.25 ms + 0.1 against an idle link's 1.28."""
    assert costs(link_gbps=50, cpu_gbps=EXPERT / 1.25e-3 / 1e9).split({1: 1}, room=2) == set()


def test_the_cpu_takes_a_miss_only_where_the_layer_finishes_clearly_sooner():
    """Behind a queued copy the link is done at 2.56 ms, the CPU at 2.5 (2.4 + 0.1): a gain under MARGIN (5 %) is
    noise in the estimates, and a wrong guess costs the CPU's side more (the GPU idles), so the link keeps it."""
    model = costs(link_gbps=50, cpu_gbps=EXPERT / 2.4e-3 / 1e9)
    model.queue_copy()
    assert model.split({1: 1}, room=2) == set()
    model = costs(link_gbps=50, cpu_gbps=EXPERT / 2.0e-3 / 1e9)     # 2.1 ms: 18 % sooner
    model.queue_copy()
    assert model.split({1: 1}, room=2) == {1}


def test_observed_speeds_correct_a_bad_calibration_within_a_few_experts():
    """The first H100 run: the link calibrated at 20.2 GB/s (it copies at 55) and the CPU kernel at 42 (it ran at 27
    in decode), so every miss went to the CPU and the decode was slower than copy-only."""
    model = costs(link_gbps=20.2, cpu_gbps=42)
    assert model.split({1: 1, 2: 1}, room=2) == {1, 2}
    for _ in range(8):                                 # four tokens' worth of a layer's misses at 12 GiB
        model.observe_copy(EXPERT, EXPERT / 55e9)
        model.observe_cpu(1, EXPERT / 27e9)
    assert model.link_gbps == pytest.approx(55, rel=0.1) and 42 / model.cpu_factor == pytest.approx(27, rel=0.1)
    assert model.split({1: 1, 2: 1}, room=2) == set()
    assert "link 5" in model.describe() and "calibrated 20.2" in model.describe()


def test_a_link_estimate_that_runs_late_is_cut_back_when_the_copies_are_done():
    model = costs(link_gbps=50, cpu_gbps=40)
    for _ in range(3):
        model.queue_copy()
    assert model.split({1: 1}, room=2) == {1}         # 3 copies queued, by the estimate
    model.link_idle = lambda: True                     # the copier says every copy has finished
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


def test_calibration_times_distinct_experts_into_a_slot_on_the_worker_thread(monkeypatch):
    """One expert timed again and again sits in L3 (the first H100 run's CPU calibration said 42 GB/s, decode saw
    27): each timed run reads another expert. The link is measured into a slot of the provider, so nothing is
    allocated beyond the plan; the CPU on the worker thread that runs the kernels in decode."""
    from moe_offload.offload import cpu_tier

    fixture = load_fixture("shipped")
    seen, threads = [], set()
    kernel = cpu_tier.cpu_kernels.cpu_swiglu

    def spy(fmt, buffer, x, threads_=None):
        seen.append(buffer.data_ptr())
        threads.add(__import__("threading").current_thread().name)
        return kernel(fmt, buffer, x, threads_)

    monkeypatch.setattr(cpu_tier.cpu_kernels, "cpu_swiglu", spy)
    cpu = CpuExperts(fixture.store, fixture.format, "cpu", threads=1, auto=True,
                     hidden_size=fixture.engine.config.hidden_size, dtype=torch.float32)
    layers = fixture.engine.config.moe_layers
    provider = OffloadedExperts(fixture.store, fixture.format, dict.fromkeys(layers, 2), "cpu", cpu=cpu)
    calibration = cpu.costs.calibration
    assert calibration.link_gbps > 0 and [rows for rows, _ in calibration.cpu_gbps] == [1, 2, 4, 8]
    runs = len(calibration.cpu_gbps) * (cpu_tier.TIMED_RUNS + 1)
    assert len(seen) == runs and len(set(seen)) == min(runs, cpu_tier.CALIBRATION_EXPERTS)
    assert threads == {"cpu-experts_0"}
    assert cpu.costs.link_idle() and provider.copier.observe == cpu.costs.observe_copy
    assert CpuExperts(fixture.store, fixture.format, "cpu").costs is None      # static layers only: no calibration


def test_decode_corrects_the_cpu_estimate_from_the_experts_it_computes():
    fixture = load_fixture("shipped")
    provider = hybrid(fixture, slots=2)
    greedy_logits(Transformer(fixture.engine.config, fixture.engine.model.weights, provider), fixture.prompt[:8])
    assert provider.cpu.costs.cpu_factor != 1.0        # AllOnCpu calibrated the CPU at 1 GB/s; it runs otherwise


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


def test_the_plan_budgets_what_the_cpu_tier_keeps_on_the_device():
    """With CPU layers, one prefill chunk's rows and mask of the CPU's products (the layers share them: before,
    each CPU layer kept its own, 10 layers x 8 MiB in the 6 GiB bench, which then ran out of memory)."""
    config = load_fixture("shipped").engine.config
    assert cpu_tier_bytes(config, 512, 2, cpu_layers=0) == 0
    assert cpu_tier_bytes(config, 512, 2, cpu_layers=3) == 512 * config.top_k * (config.hidden_size * 2 + 1)

    def workspace(**offload) -> int:
        plan = plan_for(config, 2**20, torch.bfloat16, 64, OffloadConfig(enabled=True, gpu_memory=2**30, **offload), "cuda")
        return plan.workspace_bytes

    assert workspace(cpu_moe_layers=2) - workspace() == cpu_tier_bytes(config, 64, 2, cpu_layers=2)


def test_cpu_layers_share_one_set_of_prefill_buffers():
    fixture = load_fixture("shipped")
    provider = hybrid(fixture, slots=2, cpu_layers=3)
    greedy_logits(Transformer(fixture.engine.config, fixture.engine.model.weights, provider), fixture.prompt[:20])
    assert len(provider.large_inputs) == 1
    assert all(key[0][0] <= 8 for buffers in provider.buffers.values() for key in buffers.inputs)


# ---- decode with CPU-computed experts against the resident model --------------------------------

def hybrid(fixture, slots: int, cpu_layers: int = 0, dynamic: bool = True) -> OffloadedExperts:
    """An offloaded provider whose decode misses all run on the CPU, and whose
    first `cpu_layers` layers have no slots."""
    config = fixture.engine.config
    layers = config.moe_layers
    cost_model = AllOnCpu(fixture.format.nbytes) if dynamic else None
    cpu = CpuExperts(fixture.store, fixture.format, "cpu", cost_model, threads=1)
    plan = {layer: 0 if i < cpu_layers else slots for i, layer in enumerate(layers)}
    return OffloadedExperts(fixture.store, fixture.format, plan, "cpu", cpu=cpu)


FIXTURES = ["shipped", pytest.param("32l", marks=requires_fixture(FIXTURE_32L))]
# dense fp32 experts, and HQQ experts as quantized on load (the resident model the same quantized one): 2 bits in
# groups of 16, 3 bits in groups of 64 (codes straddle words); attention at 4 bits
QUANTS = pytest.mark.parametrize("quant", [None, "4/2", "4/3"], ids=["fp32", "4-2", "4-3"])


@QUANTS
@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("slots, cpu_layers", [(2, 0), (1, 0), (2, 3)], ids=["dynamic", "one-slot", "static+dynamic"])
def test_greedy_tokens_equal_the_resident_models(name, slots, cpu_layers, quant):
    """Equal tokens, and logits within 1e-4: both sides are fp32, summed in another order. The C kernel's HQQ sums
    are scale * (sum code * x - zero * sum x) over the exact codes, the resident path's F.linear over the dequantized
    weight ((code - zero) * scale, each rounded to fp32): per expert each is within ~1e-6 of fp64 (of max |y|), and
    the shipped fixture's logits differ by at most ~1e-5."""
    fixture = load_fixture(name, quant)
    assert cpu_kernels.supports(fixture.format)         # the C kernel's own path, not its torch fallback
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


@QUANTS
@pytest.mark.parametrize("name", FIXTURES)
def test_perplexity_of_a_decode_with_cpu_experts_is_within_half_a_percent(name, quant):
    """Teacher-forced over held-out text, one token a step (decode: the CPU computes misses), against the resident
    model's perplexity from one forward over the text (the usual way; decoding it instead changed it by 1.4e-7 on
    the 32-layer fixture at 4/2, and took 25 s: on the CPU the resident HQQ model dequantizes every weight it uses
    at every step). 96 tokens; 48 with HQQ experts, whose slot hits are dequantized each step too (the 32-layer
    fixture's 96-token decode took 19 s on a busy 2-core machine; the logits differ from the resident's by ~1e-5,
    so the perplexities agree to ~1e-7 at either length, far inside the bound)."""
    fixture = load_fixture(name, quant)
    engine = fixture.engine
    text = engine.tokenizer.encode(open(EVAL_TEXT).read()[5000:9000])
    tokens = text[:97 if quant is None else 49]
    targets = torch.tensor(tokens[1:])[:, None]

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(-float(torch.log_softmax(logits.double(), -1).gather(-1, targets).mean()))

    def model_cache(provider):
        model = Transformer(engine.config, engine.model.weights, provider)
        return model, KVCache.allocate(engine.config, 1, len(tokens), "cpu", torch.float32)

    model, cache = model_cache(engine.model.provider)
    reference = perplexity(model(torch.tensor([tokens[:-1]]), cache, start_pos=0)[0])
    provider = hybrid(fixture, slots=2, cpu_layers=1)
    model, cache = model_cache(provider)
    actual = perplexity(torch.stack([model(torch.tensor([[token]]), cache, start_pos=position)[0, -1]
                                     for position, token in enumerate(tokens[:-1])]))
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


@pytest.mark.parametrize("quant", [[], ["--quant", "4/2"]], ids=["fp32", "4-2"])
def test_cli_cpu_moe_layers_generates_the_resident_text_and_reports_the_cpu(capsys, quant):
    args = ["generate", "--prompt", "def fib(n):", "--max-tokens", "6", "--device", "cpu"] + quant
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
