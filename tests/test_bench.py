"""The benchmark machinery on the CPU: routing traces (record, store, replay), the synthetic model,
the ablation modes, the accelerate placement, and `moe-offload bench` end to end at toy size."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_offload.bench.routing import ReplayPredictor, ReplayRouter, RoutingTrace, record_routing
from moe_offload.engine import resident_experts
from moe_offload.offload.cache import ForgetfulCache
from moe_offload.bench.synthetic import SyntheticCheckpoint
from moe_offload.cli import main
from moe_offload.config import QuantConfig
from moe_offload.errors import UserError
from moe_offload.model import KVCache
from moe_offload.offload.cache import LayerCache

from conftest import EVAL_TEXT, REPO, SHIPPED_MODEL, write_tiny_mixtral

COMMITTED_TRACE = REPO / "benchmarks" / "traces" / "reference-moe-32l.safetensors"
HELD_OUT_TEXT = EVAL_TEXT


def hand_made_trace(tokens=10, layers=3, top_k=2, experts=4) -> RoutingTrace:
    ids = torch.stack([torch.tensor([[(t + l) % experts, (t + l + 1) % experts] for l in range(layers)]) for t in range(tokens)])
    weights = torch.full((tokens, layers, top_k), 0.5, dtype=torch.float16)
    weights[:, :, 0] = torch.arange(tokens, dtype=torch.float16)[:, None] / 100
    predicted = torch.full((tokens, layers, 2, 3), -1, dtype=torch.int8)
    for t in range(tokens):
        for l in range(layers):
            for d in (1, 2):
                if l + d < layers:
                    predicted[t, l, d - 1] = torch.tensor([(t + l + d) % experts, (t + 2) % experts, (t + 3) % experts])
    metadata = {"format": "moe-offload routing trace", "version": "1", "model": "hand-made", "num_experts": str(experts)}
    return RoutingTrace(torch.arange(tokens, dtype=torch.int32), ids.to(torch.int8), weights, predicted, metadata)


def test_replay_router_returns_each_forwards_own_tokens_and_wraps_at_the_end():
    trace = hand_made_trace(tokens=10)
    router = ReplayRouter(trace, "cpu", moe_layers=(0, 1, 2))
    logits = torch.zeros(4, 4)
    seen = []
    for _ in range(3):          # forwards of 4 tokens: tokens 0-3, 4-7, then 0-3 again (8-11 would run past 10)
        for layer in (0, 1, 2):
            weights, ids = router(layer, logits, 2, True)
            assert torch.equal(ids, trace.expert_ids[router.start:router.start + 4, layer].long())
            assert torch.allclose(weights, trace.expert_weights[router.start:router.start + 4, layer].float())
        seen.append(int(router.start))
    assert seen == [0, 4, 0]
    router.seek(7)
    router(0, torch.zeros(1, 4), 2, True)
    assert router.start == 7


def test_replay_predictor_gives_recorded_ranking_for_one_token_and_votes_for_many():
    trace = hand_made_trace(tokens=10)
    router = ReplayRouter(trace, "cpu", moe_layers=(0, 1, 2))
    predictor = ReplayPredictor(trace, router, moe_layers=(0, 1, 2), depth=2, top_n=2)
    router.seek(5)
    router(0, torch.zeros(1, 4), 2, True)
    lists = lambda guesses: {target: ids.tolist() for target, ids in guesses.items()}
    assert lists(predictor.predict(0, torch.zeros(1, 8))) == {1: trace.predicted_ids[5, 0, 0, :2].tolist(),
                                                              2: trace.predicted_ids[5, 0, 1, :2].tolist()}
    assert predictor.predict(2, torch.zeros(1, 8)) == {}            # nothing after the last layer
    router.seek(0)
    router(0, torch.zeros(3, 4), 2, True)
    votes = {}
    for t in range(3):
        for e in trace.predicted_ids[t, 1, 0, :2].tolist():
            votes[e] = votes.get(e, 0) + 1
    expected = sorted(votes, key=lambda e: (-votes[e], e))[:2]
    assert lists(predictor.predict(1, torch.zeros(3, 8))) == {2: expected}


def test_replay_router_gives_each_sequence_of_a_batch_its_own_stretch():
    trace = hand_made_trace(tokens=10)
    router = ReplayRouter(trace, "cpu", moe_layers=(0, 1, 2), sequences=3)
    predictor = ReplayPredictor(trace, router, moe_layers=(0, 1, 2), depth=2, top_n=2)
    router.place(0, 2)
    router.place(2, 7)
    router.prefilling(2)               # row 2's prompt, positions 0-3: trace tokens 7, 8, 9, then 0 (wrapped)
    router.begin_forward(0, None, 1, 4)
    assert torch.equal(router(1, torch.zeros(4, 4), 2, True)[1], trace.expert_ids[[7, 8, 9, 0], 1].long())
    # decode: cache rows 2, 0 and 0 (a spare row repeating the first), at positions 4, 5, 5
    router.begin_forward(torch.tensor([4, 5, 5]), torch.tensor([2, 0, 0]), 3, 1)
    weights, ids = router(2, torch.zeros(3, 4), 2, True)
    assert torch.equal(ids, trace.expert_ids[[1, 7, 7], 2].long())
    assert torch.equal(weights, trace.expert_weights[[1, 7, 7], 2].float())
    router.begin_forward(torch.tensor([3]), torch.tensor([0]), 1, 1)
    assert predictor.predict(0, torch.zeros(1, 8))[1].tolist() == trace.predicted_ids[5, 0, 0, :2].tolist()


def test_sequences_replayed_together_route_and_decode_as_each_replayed_alone():
    """Different prompts and lengths, one joining mid-way: each sequence's logits in the batch are those it gets
    decoded alone from the same trace offset, so every row read its own stretch of the trace."""
    from moe_offload.bench.runner import Bench
    from moe_offload.config import SamplingParams
    from moe_offload.generate import Batch
    from moe_offload.model import Transformer

    trace = RoutingTrace.load(COMMITTED_TRACE)
    ckpt = SyntheticCheckpoint.create("tiny", None, "cpu")
    config = ckpt.config
    weights = ckpt.dense_weights("cpu", torch.float32)
    expert_format, expert_buffer = ckpt.expert_storage(torch.float32)
    provider = resident_experts(config, expert_format, expert_buffer, "cpu", progress=lambda n: None)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [11, 12]]
    lengths = [6, 3, 5]
    starts = [100, 2000, 3000]

    def decode(rows, order):
        router = ReplayRouter(trace, "cpu", config.moe_layers, sequences=rows)
        batch = Batch(Transformer(config, weights, provider, router), KVCache.allocate(config, rows, 16, "cpu", torch.float32))
        seen = {i: [] for i in order}
        pending = list(order)
        while pending or batch.busy:
            if pending and (not batch.busy or pending[0] == 2 and len(seen[0]) >= 3 or pending[0] != 2):
                i = pending.pop(0)
                generation = batch.add(prompts[i], SamplingParams(max_new_tokens=lengths[i]),
                                       watch=lambda logits, i=i: seen[i].append(logits.reshape(-1, logits.shape[-1])[-1].clone()))
                router.place(generation.row, starts[i])
            Bench.batch_step(batch, router)
        return seen

    together = decode(3, [0, 1, 2])
    for i in range(3):
        alone = decode(1, [i])[i]
        assert len(alone) == len(together[i]) == lengths[i]
        for a, b in zip(alone, together[i]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_trace_file_round_trips_and_bad_files_are_one_line_errors(tmp_path):
    trace = hand_made_trace()
    trace.save(tmp_path / "t.safetensors")
    loaded = RoutingTrace.load(tmp_path / "t.safetensors")
    for name in ("token_ids", "expert_ids", "expert_weights", "predicted_ids"):
        assert torch.equal(getattr(loaded, name), getattr(trace, name))
    assert loaded.metadata == trace.metadata
    with pytest.raises(UserError, match="no such routing trace"):
        RoutingTrace.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(UserError, match="not a readable routing trace"):
        RoutingTrace.load(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="3 MoE layers, 4 experts, top-2, but the model has 32, 8, top-2"):
        loaded.check_fits(32, 8, 2)


def test_recorded_routing_is_what_transformers_routes(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = write_tiny_mixtral(tmp_path / "model", num_hidden_layers=3)
    trace = record_routing(folder, HELD_OUT_TEXT, tokens=40, window=20, depth=2, ranked=3, progress=False)
    assert trace.expert_ids.shape == (40, 3, 2) and trace.predicted_ids.shape == (40, 3, 2, 3)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    tokens = trace.token_ids.long()
    for start in (0, 20):         # each window from an empty cache, as recorded
        with torch.no_grad():
            out = reference(tokens[None, start:start + 20], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), dim=-1)
            top, ids = torch.topk(probs, 2, dim=-1)
            assert torch.equal(trace.expert_ids[start:start + 20, layer].long(), ids)
            assert torch.allclose(trace.expert_weights[start:start + 20, layer].float(), top / top.sum(-1, keepdim=True), atol=1e-3)
    # predictions exist exactly for the layers that have a layer d ahead
    assert (trace.predicted_ids[:, 2] == -1).all() and (trace.predicted_ids[:, 1, 1] == -1).all()
    assert (trace.predicted_ids[:, 0] >= 0).all() and (trace.predicted_ids[:, 1, 0] >= 0).all()
    # the command writes the same trace
    out = tmp_path / "trace.safetensors"
    assert main(["bench", "record-routing", "--model", str(folder), "--text", str(HELD_OUT_TEXT), "--tokens", "40",
                 "--window", "20", "--ranked", "3", "--out", str(out)]) == 0
    written = RoutingTrace.load(out)
    assert torch.equal(written.expert_ids, trace.expert_ids) and torch.equal(written.predicted_ids, trace.predicted_ids)


def test_committed_trace_replays_onto_the_synthetic_model_through_the_router_seam():
    trace = RoutingTrace.load(COMMITTED_TRACE)
    assert trace.num_tokens >= 2048 and (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    ckpt = SyntheticCheckpoint.create("tiny", None, "cpu")
    config = ckpt.config
    trace.check_fits(len(config.moe_layers), config.num_experts, config.top_k)
    weights = ckpt.dense_weights("cpu", torch.float32)
    expert_format, expert_buffer = ckpt.expert_storage(torch.float32)
    asked = {}

    resident = resident_experts(config, expert_format, expert_buffer, "cpu", progress=lambda n: None)

    class Recording:
        expert_format = resident.expert_format

        def experts(self, layer, ids, residual, x):
            asked.setdefault(layer, []).append(sorted(ids.flatten().tolist()))
            return resident.experts(layer, ids, residual, x)

    from moe_offload.model import Transformer
    router = ReplayRouter(trace, "cpu", config.moe_layers)
    model = Transformer(config, weights, Recording(), router)
    cache = KVCache.allocate(config, 1, 8, "cpu", torch.float32)
    router.seek(100)
    for pos in range(3):
        logits = model(torch.tensor([[5 + pos]]), cache, start_pos=pos)
        assert torch.isfinite(logits).all()
    for layer in (0, 17, 31):
        assert asked[layer] == [sorted(trace.expert_ids[100 + t, layer].tolist()) for t in range(3)]


def test_synthetic_quantized_weights_dequantize_to_a_trained_like_scale():
    ckpt = SyntheticCheckpoint.create("tiny", QuantConfig.parse("4/2"), "cpu")
    weights = ckpt.dense_weights("cpu", torch.float32)
    wq = weights.layers[3].attn.wq.dequantize()
    assert 0.7 / math.sqrt(64) < wq.std() < 1.4 / math.sqrt(64)
    fmt, buffer = ckpt.expert_storage(torch.float32)
    expert = fmt.view(buffer(5, 2))
    for w, fan_in in ((expert.w1, 64), (expert.w2, 128)):
        assert 0.7 / math.sqrt(fan_in) < w.dequantize().std() < 1.4 / math.sqrt(fan_in)
    assert torch.equal(buffer(5, 2), buffer(5, 2)) and not torch.equal(buffer(5, 2), buffer(5, 3))


def test_forgetful_cache_loads_every_use_while_lru_reuses():
    lru, forgetful = LayerCache(2, 1), ForgetfulCache(2, 1)
    for cache in (lru, forgetful):
        for step in ([1, 2], [1, 2], [2, 3]):
            list(cache.schedule(step))
    assert (lru.stats.hits, lru.stats.misses) == (3, 3)
    assert (forgetful.stats.hits, forgetful.stats.misses) == (0, 6)


def test_each_mode_is_an_offload_config_that_the_engine_builds():
    """Every bench model comes from engine.build_provider: no-cache is the "none" cache policy without a predictor,
    no-prefetch (and compute-only's fixed routing) LRU without one, full LRU with the gate's guesses (replayed,
    at the gate's cost, under replayed routing); copies timed; without a plan every expert resident."""
    from moe_offload.bench.runner import Bench, BenchSettings
    from moe_offload.engine import expert_store
    from moe_offload.experts import ResidentExperts
    from moe_offload.offload.planner import make_plan
    from moe_offload.offload.prefetch import GatePredictor

    bench = Bench(BenchSettings(synthetic="tiny", device="cpu", trace=COMMITTED_TRACE), log=lambda line: None)
    ckpt = SyntheticCheckpoint.create("tiny", None, "cpu")
    config = ckpt.config
    weights = ckpt.dense_weights("cpu", torch.float32)
    expert_format, expert_buffer = ckpt.expert_storage(torch.float32)
    store = expert_store(config, expert_format, expert_buffer, None, bench.device)
    plan = make_plan(config, expert_format.nbytes, 0, 0, 16, 0, 2**30, slots_per_layer=2)

    def built(routing, mode):
        _, provider, _ = bench.build(config, weights, store, expert_format, plan, routing, mode)
        assert provider.copier.measure_time and provider.cpu is None
        return {type(cache) for cache in provider.caches.values()}, provider.predictor

    assert built("own", "no-cache") == ({ForgetfulCache}, None)
    assert built("replay", "no-prefetch") == built("fixed", "no-prefetch") == ({LayerCache}, None)
    caches, predictor = built("own", "full")
    assert caches == {LayerCache} and type(predictor) is GatePredictor and predictor.top_n == config.top_k
    caches, predictor = built("replay", "full")
    assert caches == {LayerCache} and type(predictor) is ReplayPredictor and type(predictor.costs_as) is GatePredictor
    _, resident, _ = bench.build(config, weights, store, expert_format, None, "own", "resident")
    assert type(resident) is ResidentExperts
    own, _, _ = bench.build(config, weights, store, expert_format, plan, "own", "full")
    assert own.router == own.route      # the family's routing (grouped, sparsemixer, scaled), not plain softmax top-k


def test_accelerate_places_full_mixtral_at_12_gib_with_most_layers_offloaded():
    from moe_offload.bench.accelerate_baseline import placement
    from moe_offload.bench.synthetic import SYNTHETIC_SHAPES

    place = placement(SYNTHETIC_SHAPES["mixtral-8x7b"], 12 * 2**30)
    # a bf16 Mixtral layer is ~2.8 GB: at most four fit beside the embeddings and head
    assert 1 <= place["gpu_layers"] <= 4 and place["gpu_layers"] + place["offloaded_layers"] == 32


@pytest.fixture
def one_cpu_thread():
    # Toy tensors: splitting each copy over threads only costs time, a lot of it on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow      # every mode x routing x budget; the default run has bench's full mode in the concurrency test
def test_bench_command_runs_every_mode_and_routing_at_toy_size_from_any_folder(tmp_path, capsys, one_cpu_thread,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)     # the default trace is the repository's, wherever the command runs
    out = tmp_path / "report.json"
    argv = ["bench", "--synthetic", "tiny", "--quant", "bf16", "--budget", "1MiB,396MiB", "--device", "cpu",
            "--prompt-tokens", "6", "--new-tokens", "4", "--warmup-tokens", "2", "--repeats", "1",
            "--prefill-tokens", "40", "--prefill-repeats", "1", "--profile", "2", "--out", str(out), "--accelerate"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text())["results"] == report["results"]
    assert report["link_peak_gbps"] > 0 and report["card"].startswith("cpu")
    by_key = {(e.get("budget"), e.get("routing"), e.get("mode")): e for e in report["results"]}
    assert by_key[("1MiB", None, None)]["status"] == "does not fit"
    assert "--budget" in by_key[("1MiB", None, None)]["error"]
    for routing in ("own", "replay"):
        for mode in ("full", "no-prefetch", "no-cache"):
            e = by_key[("396MiB", routing, mode)]
            assert e["status"] == "ok", e
            assert e["decode_tokens_per_s"] > 0 and e["prefill_tokens_per_s"] > 0 and e["time_to_first_token_s"] > 0
            assert e["loads_per_token"] > 0 or mode != "no-cache"
        assert by_key[("396MiB", routing, "no-cache")]["hit_rate"] == 0.0
        assert by_key[("396MiB", routing, "no-cache")]["loads_per_token"] == 64      # 32 layers x top-2, every token
        assert by_key[("396MiB", routing, "full")]["prefetch_recall"] is not None
        assert by_key[("396MiB", routing, "no-prefetch")]["prefetch_recall"] is None
        profile = by_key[("396MiB", routing, "full")]["profile"]
        assert profile["tokens"] == 2 and profile["wall_ms_per_token"] > 0 and profile["top_host_ops"]
    accelerate = [e for e in report["results"] if e.get("mode") == "accelerate"]
    assert len(accelerate) == 2 and all(e["status"] == "ok" and e["decode_tokens_per_s"] > 0 for e in accelerate)
    assert any(e.get("mode") == "compute-only" and e["status"] == "ok" for e in report["results"])


def test_bench_compares_cpu_experts_side_by_side(capsys, one_cpu_thread):
    argv = ["bench", "--synthetic", "tiny", "--quant", "bf16", "--budget", "396MiB", "--device", "cpu", "--routing", "own",
            "--modes", "full", "--cpu-experts", "off,auto", "--cpu-moe-layers", "0,2", "--prompt-tokens", "6",
            "--new-tokens", "4", "--warmup-tokens", "2", "--repeats", "1", "--prefill-tokens", "20",
            "--prefill-repeats", "1", "--no-resident", "--no-compute-only"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entries = {(e["cpu_experts"], e["cpu_moe_layers"]): e for e in report["results"]}
    assert set(entries) == {("off", 0), ("auto", 0), ("off", 2), ("auto", 2)}
    assert all(e["status"] == "ok" for e in entries.values())
    assert entries["off", 0]["cpu_uses_per_token"] == 0 == entries["auto", 0]["cpu_uses_per_token"]   # auto: off on a CPU
    static = entries["off", 2]
    assert static["cpu_uses_per_token"] == 2 * 2 and static["cpu_gbps"] > 0 and 0 < static["cpu_busy_share"] < 1
    assert static["slots_per_layer"][0] == 0


def test_bench_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from moe_offload.bench.plot import plot_report

    entry = {"status": "ok", "quant": "4/2", "budget": "12GiB", "routing": "own", "mode": "full",
             "decode_tokens_per_s": 10.0, "transfer_ceiling_tokens_per_s": 14.0}
    report = {"card": "test", "link_peak_gbps": 50.0, "date": "2026-11-27",
              "results": [entry, {**entry, "mode": "accelerate", "transfer_ceiling_tokens_per_s": None}]}
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--synthetic", "huge"], "--synthetic 'huge' is not a preset"),
    (["bench", "--synthetic", "tiny", "--routing", "mine", "--device", "cpu"], "--routing 'mine'"),
    (["bench", "--synthetic", "tiny", "--budget", "lots", "--device", "cpu"], "--budget 'lots' is not a size"),
    (["bench", "--synthetic", "tiny", "--quant", "4/5", "--device", "cpu"], "5 bits is not supported"),
    (["bench", "--synthetic", "tiny", "--trace", "nowhere.safetensors", "--device", "cpu"], "no such routing trace"),
    (["bench", "--synthetic", "tiny", "--cpu-experts", "always", "--device", "cpu"], "--cpu-experts 'always'"),
    (["bench", "--synthetic", "tiny", "--cpu-moe-layers", "x", "--device", "cpu"], "--cpu-moe-layers 'x'"),
    (["bench", "record-routing", "--model", str(SHIPPED_MODEL), "--text", "missing.txt", "--out", "x.safetensors"],
     "--text missing.txt: no such file"),
])
def test_bench_bad_input_is_one_error_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_table2_markdown_puts_our_ratios_beside_the_papers():
    from moe_offload.bench.report import table2_markdown

    ok = {"status": "ok", "quant": "4/2", "budget": "12GiB", "hit_rate": 0.5, "link_busy": 0.9}
    report = {"card": "H100", "link_peak_gbps": 55.0, "commit": "abc", "results": [
        {**ok, "mode": "full", "routing": "own", "decode_tokens_per_s": 20.0},
        {**ok, "mode": "no-cache", "routing": "own", "decode_tokens_per_s": 8.0},
        {"status": "ok", "mode": "accelerate", "budget": "12GiB", "decode_tokens_per_s": 2.0, "decode_tokens_per_s_is": "extrapolated"},
    ]}
    lines = table2_markdown([report], "4/2", "12GiB").splitlines()
    full = next(line for line in lines if line.startswith("| full"))
    assert "| 3.06 | 2.20 | 20.00 | 10.00 | 0.500 | 0.90 | not measured |" in full
    assert "| 8.00 | 4.00 |" in next(line for line in lines if line.startswith("| no LRU"))
    assert "not measured" in next(line for line in lines if line.startswith("| LRU, no prefetch"))
    assert "2.00 (extrapolated) | 1.00" in next(line for line in lines if line.startswith("| transformers"))


def concurrency_bench(capsys, budget: str, routing: str, counts: str, new_tokens: int) -> dict:
    """`moe-offload bench --concurrency counts` on the tiny synthetic model, full mode only: the report."""
    argv = ["bench", "--synthetic", "tiny", "--quant", "bf16", "--budget", budget, "--device", "cpu", "--routing", routing,
            "--modes", "full", "--no-compute-only", "--no-resident", "--prompt-tokens", "6", "--new-tokens", str(new_tokens),
            "--warmup-tokens", "2", "--repeats", "1", "--prefill-tokens", "20", "--prefill-repeats", "1",
            "--concurrency", counts]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_concurrency_decodes_sequences_together_and_shares_their_expert_loads(tmp_path, capsys, one_cpu_thread):
    """With slots for (nearly) every expert, four sequences share each copy: fewer loads a token than one alone.
    (With few slots, four sequences' distinct experts evict one another's: more; the GPU runs report both.)"""
    report = concurrency_bench(capsys, "410MiB", "own", "1,4", new_tokens=6)
    by_count = {e["concurrency"]: e for e in report["results"] if "concurrency" in e}
    assert set(by_count) == {1, 4} and all(e["status"] == "ok" for e in by_count.values())
    assert all(e["decode_tokens_per_s"] > 0 and e["inter_token_p99_s"] >= e["inter_token_p50_s"] > 0 for e in by_count.values())
    assert by_count[4]["loads_per_token"] < by_count[1]["loads_per_token"]     # four sequences share each copy


def test_bench_concurrency_replays_routing_and_times_a_prompt_joining(tmp_path, capsys, one_cpu_thread):
    report = concurrency_bench(capsys, "396MiB", "replay", "2", new_tokens=4)
    entry = next(e for e in report["results"] if "concurrency" in e)
    assert entry["status"] == "ok" and entry["routing"] == "replay" and entry["join_status"] == "ok", entry
    assert 0 < entry["hit_rate"] < 1 and entry["loads_per_token"] > 0       # replayed routing moves experts
    assert entry["join_windows"] == 1 and entry["join_window_steps"] == 1     # 20 tokens: one chunk a join
    assert entry["join_inter_token_p99_s"] >= entry["join_inter_token_p50_s"] > 0
    assert entry["steady_inter_token_p99_s"] >= entry["steady_inter_token_p50_s"] > 0
    assert entry["join_p99_over_steady_p50"] > 0


def test_bench_runs_the_synthetic_gpt_oss_with_its_experts_in_mxfp4_as_published_or_in_hqq(capsys, one_cpu_thread):
    """gpt-oss-tiny: gpt-oss-120b's structure (sinks, biases, clamped SwiGLU, alternating layers) at toy widths;
    --quant mxfp4 keeps the experts MXFP4 (4.25 bits a weight, biases in bf16/fp32), 4/2 converts them to HQQ."""
    from moe_offload.bench.synthetic import SYNTHETIC_SHAPES, SyntheticCheckpoint
    from moe_offload.quant.mxfp4 import MXFP4ExpertFormat

    big = SYNTHETIC_SHAPES["gpt-oss-120b"]
    assert (big.hidden_size, big.expert_ffn, big.num_experts, big.top_k, big.num_layers) == (2880, 2880, 128, 4, 36)
    fmt, buffer = SyntheticCheckpoint.create("gpt-oss-120b", None, "cpu").expert_storage(torch.bfloat16)
    assert isinstance(fmt, MXFP4ExpertFormat) and fmt.nbytes == 13_236_480     # the planner tests' expert bytes
    argv = ["bench", "--synthetic", "gpt-oss-tiny", "--quant", "mxfp4,4/2", "--budget", "396MiB", "--device", "cpu",
            "--routing", "own", "--modes", "full", "--prompt-tokens", "6", "--new-tokens", "4", "--warmup-tokens", "2",
            "--repeats", "1", "--prefill-tokens", "20", "--prefill-repeats", "1", "--no-compute-only", "--no-resident"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entries = {e["quant"]: e for e in report["results"]}
    assert all(e["status"] == "ok" and e["decode_tokens_per_s"] > 0 for e in entries.values()), entries
    assert entries["mxfp4"]["expert_mib"] < entries["4/2"]["expert_mib"] * 2.5       # 4.25 bits vs ~2.5 + biases
