"""The benchmark runner behind `moe-offload bench`: decode and prefill speed of an offloaded model
under a memory budget, for every configuration, routing scenario and ablation mode, in one process.

    settings = BenchSettings(synthetic="mixtral-8x7b", quants=("4/2",), budgets=("12GiB",))
    report = run_benchmarks(settings, log=print)       # {"card": ..., "results": [...]}, also written to settings.out

Per (quantization, budget, routing, mode) it reports:
- decode: batch 1, a `prompt_tokens` prompt then `new_tokens` greedy tokens, tokens/s of each
  repeat after a warm-up run (median reported), with the expert-cache counters of the median
  repeat: hit rate, prefetch recall/precision, bytes moved, copy-wait and copy-busy seconds;
- prefill: a `prefill_tokens` prompt, time to first token and prompt tokens/s (median of repeats);
- achieved host-to-device GB/s (bytes loaded over wall time), "link busy" (that over the pinned
  copy peak measured at the start of this run), the transfer-bound ceiling for the bytes actually
  moved per token, and the compute-only rate (every expert a hit: a router that always picks the
  first top-k experts), which bounds what hiding copies can reach;
- peak GPU memory (torch.cuda.max_memory_allocated) against the budget; the budget is also
  enforced with torch.cuda.set_per_process_memory_fraction, so an overrun fails that entry.

Modes (the paper's ablation, each an OffloadConfig for engine.build_provider, which builds every model here):
"full" (LRU + speculative prefetch), "no-prefetch" (LRU only), "no-cache" (every expert use is loaded on demand:
nothing stays in a slot between forwards).
Each mode runs with every --cpu-experts setting ("off": copy-only; "auto": the CPU computes the decode misses
the cost model sends it) and every --cpu-moe-layers count (experts of that many layers on the CPU), side by
side; entries that use the CPU report its expert uses per token, GB/s and busy share next to the link's.
Routings: "own" (the weights' own routers) and "replay" (a recorded trace, routing.py).
The accelerate baseline (accelerate_baseline.py) runs first when asked for.

The report is rewritten to `settings.out` after every measurement, so a run cut short still
leaves everything measured so far; entries not run for lack of time say "skipped".
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

import torch

from ..config import ModelConfig, OffloadConfig, QuantConfig, SamplingParams
from ..engine import build_provider, expert_storage, expert_store, resolve_device
from ..errors import UserError
from ..experts import ExpertFormat
from ..generate import INTERLEAVED_PREFILL_CHUNK, PREFILL_CHUNK, Batch, generate, prefill, sample
from ..model import KVCache, Transformer
from ..offload.planner import Plan, cpu_tier_bytes, make_plan, parse_size, workspace_bytes
from ..step import DecodeStep
from .routing import ReplayPredictor, ReplayRouter, RoutingTrace

# the paper's ablation: what each mode changes in the bench's OffloadConfig (Bench.offload)
MODE_OFFLOAD = {"full": {}, "no-prefetch": {"prefetch_experts": 0}, "no-cache": {"prefetch_experts": 0, "cache": "none"}}
MODES = tuple(MODE_OFFLOAD)
ROUTINGS = ("own", "replay")
DEFAULT_TRACE = Path("benchmarks/traces/reference-moe-32l.safetensors")
LINK_PROBE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class BenchSettings:
    synthetic: str | None = "mixtral-8x7b"      # a preset of synthetic.py; None: --model
    model: Path | None = None                    # a Hugging Face or quantized folder instead
    quants: tuple[str, ...] = ("4/2",)          # "A/E" (attention/expert bits) or "bf16"
    budgets: tuple[str, ...] = ("12GiB",)
    cpu_memory: str | None = None                # host RAM for experts ("11GiB"); None: all in RAM, else the rest on disk
    routings: tuple[str, ...] = ROUTINGS
    modes: tuple[str, ...] = MODES
    accelerate: bool = False                     # also run transformers + accelerate at each budget
    trace: Path = DEFAULT_TRACE
    prompt_tokens: int = 128
    new_tokens: int = 256
    warmup_tokens: int = 32
    repeats: int = 3
    prefill_tokens: int = 2048
    prefill_repeats: int = 2
    compute_only: bool = True                    # also time decode with every expert a hit
    resident: bool = True                        # also time decode with every expert on the device (no budget)
    concurrency: tuple[int, ...] = ()            # also decode this many sequences at once (continuous batching)
    profile_tokens: int = 0                      # profile this many decode tokens of "full" and compute-only entries
    prefetch_experts: int | None = None          # experts prefetched per layer ahead; None: top-k
    prefetch_depth: int = 1
    cpu_experts: tuple[str, ...] = ("off",)      # each mode with each: "off" (copy-only), "auto" (cpu_tier.py)
    cpu_moe_layers: tuple[int, ...] = (0,)       # each mode with the experts of this many MoE layers on the CPU
    device: str = "auto"
    time_limit: float | None = None              # seconds; later entries are skipped once it has passed
    out: Path | None = None                      # where the report JSON is (re)written
    seed: int = 0


def parse_quant(text: str) -> QuantConfig | None:
    """"A/E", or no quantization: "bf16", "none", or "mxfp4" (the same: experts published in MXFP4, gpt-oss's,
    stay MXFP4 without expert bits; the name says so in a report)."""
    return None if text in ("bf16", "none", "mxfp4") else QuantConfig.parse(text)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile of values (the nearest rank below), None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fixed_routing(layer, logits, top_k, renormalize):
    """Every token to experts 0..k-1 with equal weights: after the first token every use is a hit."""
    ids = torch.arange(top_k, device=logits.device).expand(logits.shape[0], top_k)
    return torch.full(ids.shape, 1.0 / top_k, device=logits.device), ids


def weights_nbytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from model weights (dataclasses, tuples, lists)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if is_dataclass(obj):
        return sum(weights_nbytes(getattr(obj, f.name), seen) for f in fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(weights_nbytes(item, seen) for item in obj)
    return 0


def measure_link_peak(device: torch.device) -> float:
    """Pinned host->device copy GB/s (best of a few 256 MiB copies); host memcpy on the CPU."""
    src = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(1)
    dst = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return LINK_PROBE_BYTES / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "card_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("MOE_OFFLOAD_COMMIT") or git("rev-parse", "HEAD"),
        "tree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": shlex.join(["moe-offload", *sys.argv[1:]]) if sys.argv[0].endswith(("moe-offload", "cli.py")) else shlex.join(sys.argv),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host_cpus": os.cpu_count(),
    }


class Bench:
    """One benchmark process: builds each configuration once and measures every entry of it."""

    def __init__(self, settings: BenchSettings, log):
        self.s = settings
        self.log = log
        self.device = resolve_device(settings.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.started = time.perf_counter()
        self.report = {"benchmark": "moe-offload bench", **environment(self.device),
                       "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
                       "results": []}
        self.trace = RoutingTrace.load(settings.trace) if "replay" in settings.routings else None
        for routing in settings.routings:
            if routing not in ROUTINGS:
                raise UserError(f"--routing {routing!r}: use own or replay")
        for mode in settings.modes:
            if mode not in MODES:
                raise UserError(f"--modes {mode!r}: use {', '.join(MODES)}")
        if settings.synthetic:
            from .synthetic import synthetic_config
            config = synthetic_config(settings.synthetic)     # an unknown preset fails here, before any work
        elif settings.model is None:
            raise UserError("pass --synthetic PRESET or --model DIR")
        else:
            from ..checkpoint import Checkpoint
            config = Checkpoint.open(settings.model).config
        if self.trace is not None:
            self.trace.check_fits(len(config.moe_layers), config.num_experts, config.top_k)
        self.budgets = [(text, parse_size(text, "--budget")) for text in settings.budgets]
        self.quants = [(text, parse_quant(text)) for text in settings.quants]

    # -- bookkeeping -------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        return self.s.time_limit is not None and time.perf_counter() - self.started > self.s.time_limit

    def add(self, entry: dict) -> None:
        self.report["results"].append(entry)
        self.save()

    def save(self) -> None:
        self.report["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
        if self.s.out is not None:
            import json
            out = Path(self.s.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".partial")
            partial.write_text(json.dumps(self.report, indent=1) + "\n")
            partial.replace(out)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict:
        s = self.s
        self.report["link_peak_gbps"] = measure_link_peak(self.device)
        self.log(f"bench: {self.report['card']}; pinned host->device peak {self.report['link_peak_gbps']:.1f} GB/s")
        self.save()
        if s.accelerate:
            self.run_accelerate()
        for quant_text, quant in self.quants:
            if self.out_of_time():
                for budget_text, _ in self.budgets:
                    self.add({"quant": quant_text, "budget": budget_text, "status": "skipped", "reason": "time limit"})
                continue
            try:
                self.run_quant(quant_text, quant)
            except UserError:
                raise
            except Exception as e:  # e.g. host memory for the store: report it, go on with the next configuration
                self.log(f"[{quant_text}] failed: {type(e).__name__}: {e}")
                self.add({"quant": quant_text, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "traceback": traceback.format_exc().splitlines()[-12:]})
                gc.collect()
                self.empty_cache()
        self.report["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
        return self.report

    def run_accelerate(self) -> None:
        from .accelerate_baseline import measure_accelerate
        from .synthetic import synthetic_config

        config = synthetic_config(self.s.synthetic) if self.s.synthetic else self.open_source(None).config
        for budget_text, budget in self.budgets:
            if self.out_of_time():
                self.add({"mode": "accelerate", "budget": budget_text, "status": "skipped", "reason": "time limit"})
                continue
            self.log(f"accelerate baseline at {budget_text} ...")
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                entry = measure_accelerate(config, budget / 2**30, self.device, log=self.log)
                entry.update(status="ok", budget=budget_text, routing="own (accelerate loads every layer whole)",
                             peak_gpu_gib_reduced_model=torch.cuda.max_memory_allocated(self.device) / 2**30
                             if self.device.type == "cuda" else None)
                self.log(f"accelerate at {budget_text}: {entry['decode_tokens_per_s']:.3f} tokens/s (extrapolated; the "
                         f"{entry['gpu_layers']}+{entry['offloaded_layers']}-layer placement), offloaded layer "
                         f"{entry['offloaded_layer_ms']:.0f} ms at {entry['offloaded_layer_h2d_gbps']:.1f} GB/s")
            except torch.OutOfMemoryError as e:
                entry = {"mode": "accelerate", "budget": budget_text, "status": "failed", "error": str(e).splitlines()[0]}
            self.add(entry)
            gc.collect()
            self.empty_cache()

    def open_source(self, quant: QuantConfig | None):
        if self.s.synthetic:
            from .synthetic import SyntheticCheckpoint
            return SyntheticCheckpoint.create(self.s.synthetic, quant, self.device, seed=self.s.seed)
        from ..quant.checkpoint import open_checkpoint
        return open_checkpoint(self.s.model, quant, self.device)

    def run_quant(self, quant_text: str, quant: QuantConfig | None) -> None:
        started = time.perf_counter()
        ckpt = self.open_source(quant)
        config = ckpt.config
        self.log(f"[{quant_text}] building {ckpt.folder.name} weights on {self.device} ...")
        weights = ckpt.dense_weights(self.device, self.dtype)
        expert_format, expert_buffer = expert_storage(ckpt, self.dtype)
        ram_experts = None if self.s.cpu_memory is None else parse_size(self.s.cpu_memory, "--cpu-memory") // expert_format.nbytes
        store = expert_store(config, expert_format, expert_buffer, ram_experts, self.device)
        sync(self.device)
        dense_bytes = weights_nbytes(weights)
        build_seconds = time.perf_counter() - started
        self.log(f"[{quant_text}] built in {build_seconds:.1f} s: non-expert weights {dense_bytes / 2**30:.2f} GiB on the device, "
                 f"{store.ram_bytes / 2**30:.1f} GiB of experts in {'pinned ' if store.pinned else ''}host RAM, "
                 f"{store.disk_bytes / 2**30:.1f} GiB memory-mapped from disk ({expert_format.nbytes / 2**20:.1f} MiB each)")
        self.empty_cache()
        context = max(self.s.prefill_tokens, self.s.prompt_tokens + max(self.s.new_tokens, self.s.warmup_tokens, self.s.profile_tokens + 2)) + 1
        common = {"model": ckpt.folder.name, "quant": quant_text, "expert_mib": expert_format.nbytes / 2**20,
                  "dense_gib": dense_bytes / 2**30, "build_seconds": round(build_seconds, 1),
                  "ram_gib": store.ram_bytes / 2**30, "disk_gib": store.disk_bytes / 2**30}
        for budget_text, budget in self.budgets:
            plans = {n: self.fit(common, config, expert_format, dense_bytes, context, budget_text, budget, n)
                     for n in self.s.cpu_moe_layers}
            for cpu_layers, plan in plans.items():
                if plan is None:
                    continue
                slots = sorted(set(plan.slots.values()))
                self.log(plan.describe())
                for mode in self.s.modes:           # mode-major: both routings of the full algorithm come first
                    for routing in self.s.routings:
                        for cpu in self.s.cpu_experts:
                            entry = {**common, "budget": budget_text, "budget_gib": budget / 2**30, "routing": routing,
                                     "mode": mode, "cpu_experts": cpu, "cpu_moe_layers": cpu_layers,
                                     "slots_per_layer": slots[0] if len(slots) == 1 else slots,
                                     "planned_gib": plan.device_bytes / 2**30}
                            if self.out_of_time():
                                self.add({**entry, "status": "skipped", "reason": "time limit"})
                                continue
                            self.add(self.measure(entry, config, weights, store, expert_format, plan, context, budget))
            plan = plans[0] if 0 in plans else None
            if self.s.compute_only and 0 not in plans and not self.out_of_time():
                plan = self.fit(common, config, expert_format, dense_bytes, context, budget_text, budget, 0)
            if self.s.compute_only and plan is not None and not self.out_of_time():
                entry = {**common, "budget": budget_text, "routing": "fixed (experts 0..k-1: every use a hit)", "mode": "compute-only"}
                self.add(self.measure(entry, config, weights, store, expert_format, plan, context, budget, compute_only=True))
            for sequences in self.s.concurrency:
                for routing in self.s.routings:
                    if not self.out_of_time():
                        self.add(self.measure_batch(common, config, weights, store, expert_format, dense_bytes,
                                                    budget_text, budget, sequences, routing))
        if self.s.resident and not self.out_of_time():
            for routing in self.s.routings:
                entry = {**common, "budget": "none (every expert on the device)", "routing": routing, "mode": "resident"}
                self.add(self.measure(entry, config, weights, store, expert_format, None, context, None))
        del weights, store
        gc.collect()
        self.empty_cache()

    def fit(self, common, config, expert_format, dense_bytes, context, budget_text, budget, cpu_layers):
        """The plan of a budget with `cpu_layers` MoE layers on the CPU, or None (reported) when it does not fit."""
        try:
            chunk, itemsize = min(PREFILL_CHUNK, context), self.dtype.itemsize
            workspace = workspace_bytes(config, chunk, context, itemsize) + cpu_tier_bytes(config, chunk, itemsize,
                                                                                            cpu_layers)
            return make_plan(config, expert_format.nbytes, dense_bytes, KVCache.nbytes(config, 1, context, self.dtype),
                             context, workspace, budget, cpu_layers=cpu_layers)
        except UserError as e:
            message = str(e).replace("--gpu-memory", "--budget").replace("--max-context", "--prefill-tokens")
            self.log(f"[{common['quant']} @ {budget_text}] does not fit: {message}")
            self.add({**common, "budget": budget_text, "cpu_moe_layers": cpu_layers, "status": "does not fit",
                      "error": message})
            return None

    def empty_cache(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one entry ---------------------------------------------------------------------------

    def build(self, config: ModelConfig, weights, store, expert_format: ExpertFormat, plan: Plan | None, routing: str,
              mode: str, cpu: str = "off", sequences: int = 0):
        """The model of an entry, from engine.build_provider: `plan` offloaded as `mode` says (one of MODES), or
        without a plan every expert resident. `sequences`: a batch of that many cache rows, each replaying its own
        stretch of the trace (ReplayRouter)."""
        router, predictor_for = None, None      # None: the model's own routing (Transformer.route, the family's)
        if routing == "replay":
            self.trace.check_fits(len(config.moe_layers), config.num_experts, config.top_k)
            router = ReplayRouter(self.trace, self.device, config.moe_layers, sequences=sequences)
            predictor_for = lambda gate: ReplayPredictor(self.trace, router, config.moe_layers, self.s.prefetch_depth,
                                                         gate.top_n, costs_as=gate)   # replayed guesses, at the gate's cost
        elif routing == "fixed":
            router = fixed_routing
        experts, offload = (store, self.offload(mode, plan, cpu)) if plan else (store.buffer, OffloadConfig())
        provider = build_provider(config, weights, experts, expert_format, plan, offload, self.device, self.dtype,
                                  predictor_for, log=self.log)
        return Transformer(config, weights, provider, router), provider, router

    def offload(self, mode: str, plan: Plan, cpu: str) -> OffloadConfig:
        """A mode's OffloadConfig: the bench's prefetch settings but for what the mode changes (MODE_OFFLOAD), the
        CPU tier (`cpu`, and the plan's CPU layers), every copy and wait timed."""
        s = self.s
        offload = OffloadConfig(enabled=True, prefetch_experts=s.prefetch_experts, prefetch_depth=s.prefetch_depth,
                                measure_time=True, cpu_moe_layers=len(plan.cpu_layers), cpu_experts=cpu)
        return replace(offload, **MODE_OFFLOAD[mode])

    def measure(self, entry, config, weights, store, expert_format, plan, context, budget, compute_only=False) -> dict:
        s, device = self.s, self.device
        label = f"[{entry['quant']} @ {entry['budget']}] {entry['mode']}, {entry['routing'].split(' ')[0]} routing"
        if entry.get("cpu_experts", "off") != "off" or entry.get("cpu_moe_layers"):
            label += f", CPU experts {entry['cpu_experts']}, {entry['cpu_moe_layers']} CPU layers"
        self.log(f"{label} ...")
        gc.collect()
        self.empty_cache()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            if budget is not None:
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(device).total_memory), device)
        try:
            mode = "no-prefetch" if compute_only else entry["mode"]      # compute-only: LRU, nothing to predict
            model, provider, router = self.build(config, weights, store, expert_format, plan,
                                                 "fixed" if compute_only else entry["routing"], mode,
                                                 entry.get("cpu_experts", "off"))
            cache = KVCache.allocate(config, 1, context, device, self.dtype)
            step = DecodeStep(model, cache)
            result = {"cuda_graphs": step.capturable[1], **self.decode(model, step, provider, router, cache, config)}
            costs = getattr(getattr(provider, "cpu", None), "costs", None)
            if costs is not None:       # the cost model's speeds after decode corrected the calibration's
                self.log(costs.describe())
                result["cpu_model_link_gbps"], result["cpu_model_cpu_factor"] = costs.link_gbps, costs.cpu_factor
            if not compute_only:
                result.update(self.prefill(model, provider, router, cache, config))
            if s.profile_tokens and entry["mode"] in ("full", "compute-only", "resident"):
                result["profile"] = self.profile(model, step, router, cache, config)
            result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            result["within_budget"] = result["peak_gpu_gib"] is None or budget is None or result["peak_gpu_gib"] * 2**30 <= budget
            result["status"] = "ok"
        except torch.OutOfMemoryError as e:
            result = {"status": "failed", "error": f"exceeded the {entry['budget']} budget: {str(e).splitlines()[0]}"}
        except UserError:
            raise
        except Exception as e:      # one broken entry must not cost the rest of a GPU run; it is reported as failed
            result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      "traceback": traceback.format_exc().splitlines()[-12:]}
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        entry = {**entry, **result}
        if entry["status"] == "ok":
            self.log(f"{label}: decode {entry['decode_tokens_per_s']:.2f} tokens/s"
                     + (f", hit rate {entry['hit_rate']:.3f}, link busy {entry['link_busy']:.2f}" if 'hit_rate' in entry else "")
                     + (f", CPU {entry['cpu_uses_per_token']:.1f} uses a token at {entry['cpu_gbps']:.1f} GB/s, busy "
                        f"{entry['cpu_busy_share']:.2f}" if entry.get('cpu_uses_per_token') else "")
                     + (f", prefill {entry['prefill_tokens_per_s']:.0f} tokens/s" if 'prefill_tokens_per_s' in entry else "")
                     + (f", peak {entry['peak_gpu_gib']:.2f} GiB" if entry['peak_gpu_gib'] is not None else ""))
        else:
            self.log(f"{label}: {entry['status']}: {entry['error']}")
        return entry

    def measure_batch(self, common, config, weights, store, expert_format, dense_bytes, budget_text, budget,
                      sequences: int, routing: str = "own") -> dict:
        """`sequences` generations at once (generate.Batch), the full algorithm: aggregate and per-sequence decode
        tokens/s once all run, inter-token latency (a step's time: every running sequence gets one token) and expert
        loads per generated token, which sharing should lower as the batch grows. Replayed routing: each sequence
        replays its own stretch of the trace (starts spread evenly over it). Then, with `prefill_tokens`, a prompt
        of that many tokens joins the running sequences (measure_join)."""
        s = self.s
        entry = {**common, "budget": budget_text, "routing": routing, "mode": "full", "concurrency": sequences}
        label = f"[{entry['quant']} @ {budget_text}] {sequences} sequences at once, {routing} routing"
        context = s.prompt_tokens + s.new_tokens + 2
        try:
            plan = self.batch_plan(config, expert_format, dense_bytes, sequences, context, budget)
        except UserError as e:
            self.log(f"{label}: does not fit: {e}")
            return {**entry, "status": "does not fit", "error": str(e)}
        self.log(f"{label} ...")
        try:
            entry.update(self.decode_batch(config, weights, store, expert_format, plan, context, sequences, routing))
            entry["status"] = "ok"
        except UserError:
            raise
        except Exception as e:      # one broken entry must not cost the rest of a GPU run; it is reported as failed
            entry.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         traceback=traceback.format_exc().splitlines()[-12:])
            self.log(f"{label}: failed: {entry['error']}")
            return entry
        self.log(f"{label}: {entry['decode_tokens_per_s']:.1f} tokens/s together, {entry['loads_per_token']:.2f} loads "
                 f"a token, inter-token p50 {1e3 * entry['inter_token_p50_s']:.1f} ms")
        if s.prefill_tokens and not self.out_of_time():
            entry.update(self.measure_join(label, config, weights, store, expert_format, dense_bytes, budget, sequences,
                                           routing))
        return entry

    def batch_plan(self, config, expert_format, dense_bytes, rows: int, context: int, budget):
        return make_plan(config, expert_format.nbytes, dense_bytes, KVCache.nbytes(config, rows, context, self.dtype),
                         context, workspace_bytes(config, min(PREFILL_CHUNK, context), context, self.dtype.itemsize),
                         budget, max_batch=rows)

    def batch_model(self, config, weights, store, expert_format, plan, rows: int, context: int, routing: str):
        gc.collect()
        self.empty_cache()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        model, provider, router = self.build(config, weights, store, expert_format, plan, routing, "full", sequences=rows)
        cache = KVCache.allocate(config, rows, context, self.device, self.dtype)
        return model, provider, router, Batch(model, cache)

    @staticmethod
    def join(batch: Batch, router, prompt: list[int], params: SamplingParams, trace_start: int):
        """batch.add, the newcomer replaying the trace from `trace_start` (replayed routing)."""
        generation = batch.add(prompt, params)
        if isinstance(router, ReplayRouter):
            router.place(generation.row, trace_start)
        return generation

    @staticmethod
    def batch_step(batch: Batch, router) -> list:
        """batch.step, telling a replaying router whose prompt a prefill chunk of this step carries."""
        if batch.prefilling and isinstance(router, ReplayRouter):
            router.prefilling(batch.prefilling[0].row)
        return batch.step()

    def decode_batch(self, config, weights, store, expert_format, plan, context, sequences, routing) -> dict:
        s, device = self.s, self.device
        model, provider, router, batch = self.batch_model(config, weights, store, expert_format, plan, sequences,
                                                          context, routing)
        trace_tokens = self.trace.num_tokens if isinstance(router, ReplayRouter) else 1
        generator = torch.Generator().manual_seed(s.seed + sequences)
        added = 0
        for tokens in (s.warmup_tokens, s.new_tokens):          # the first round warms up (and captures graphs)
            for _ in range(sequences):
                prompt = torch.randint(3, config.vocab_size, (s.prompt_tokens,), generator=generator).tolist()
                self.join(batch, router, prompt, SamplingParams(max_new_tokens=tokens),
                          added * trace_tokens // (2 * sequences))
                added += 1
            while batch.prefilling:
                self.batch_step(batch, router)
            provider.summary()
            provider.stats.reset()
            step_seconds, produced = [], 0
            while batch.busy:
                sync(device)
                started = time.perf_counter()
                produced += len(self.batch_step(batch, router))
                step_seconds.append(time.perf_counter() - started)
        seconds = sum(step_seconds)
        stats = provider.summary()
        return dict(decode_tokens_per_s=produced / seconds, per_sequence_tokens_per_s=produced / seconds / sequences,
                    inter_token_p50_s=percentile(step_seconds, 0.5), inter_token_p99_s=percentile(step_seconds, 0.99),
                    loads_per_token=stats["loads"] / max(produced, 1), hit_rate=stats["hit_rate"],
                    slots_per_layer=sorted(set(plan.slots.values())), cuda_graphs=batch.decode_step.capturable,
                    peak_gpu_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)

    def measure_join(self, label, config, weights, store, expert_format, dense_bytes, budget, sequences, routing) -> dict:
        """Once `sequences` generations decode, a prompt of `prefill_tokens` joins (prefilled a chunk a step between
        their decode steps, generate.Batch), `1 + prefill_repeats` times, the first a warm-up: the running streams'
        inter-token latency (the time between two steps' ends: each running stream gets a token a step) while the
        prompt prefills ("window"), and outside it. Its own cache (one more row, room for the prompt) and plan."""
        s, device = self.s, self.device
        gap = 8                               # steps between joins, outside the window
        window = -(-s.prefill_tokens // INTERLEAVED_PREFILL_CHUNK)
        joins = 1 + s.prefill_repeats
        new_tokens = sequences + 4 + joins * (window + gap) + gap
        context = max(s.prompt_tokens + new_tokens, s.prefill_tokens) + 2
        rows = sequences + 1
        try:
            plan = self.batch_plan(config, expert_format, dense_bytes, rows, context, budget)
        except UserError as e:
            self.log(f"{label}, a {s.prefill_tokens}-token prompt joining: does not fit: {e}")
            return {"join_status": "does not fit", "join_error": str(e)}
        self.log(f"{label}, a {s.prefill_tokens}-token prompt joining ...")
        try:
            model, provider, router, batch = self.batch_model(config, weights, store, expert_format, plan, rows, context,
                                                              routing)
            trace_tokens = self.trace.num_tokens if isinstance(router, ReplayRouter) else 1
            generator = torch.Generator().manual_seed(s.seed + 7 * sequences + 1)
            for index in range(sequences):
                prompt = torch.randint(3, config.vocab_size, (s.prompt_tokens,), generator=generator).tolist()
                self.join(batch, router, prompt, SamplingParams(max_new_tokens=new_tokens),
                          index * trace_tokens // (sequences + joins))
            while batch.prefilling:
                self.batch_step(batch, router)
            for _ in range(3):           # the full bucket: eager, captured, replayed
                self.batch_step(batch, router)
            inside, outside = [], []

            def timed_step(last: float) -> float:
                in_window = bool(batch.prefilling)
                self.batch_step(batch, router)
                sync(device)
                now = time.perf_counter()
                if counted or not in_window:
                    (inside if in_window else outside).append(now - last)
                return now

            sync(device)
            last = time.perf_counter()
            for number in range(joins):
                counted = number > 0
                for _ in range(gap):
                    last = timed_step(last)
                prompt = torch.randint(3, config.vocab_size, (s.prefill_tokens,), generator=generator).tolist()
                joiner = self.join(batch, router, prompt, SamplingParams(max_new_tokens=1),     # leaves at once
                                   (sequences + number) * trace_tokens // (sequences + joins))
                while not joiner.done:
                    last = timed_step(last)
            for _ in range(gap):
                last = timed_step(last)
            if len(batch.running) != sequences:
                raise RuntimeError(f"{len(batch.running)} streams ran to the end of the join measurement, not {sequences}")
        except UserError:
            raise
        except Exception as e:
            self.log(f"{label}, joining: failed: {type(e).__name__}: {e}")
            return {"join_status": "failed", "join_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "join_traceback": traceback.format_exc().splitlines()[-12:]}
        out = {"join_status": "ok", "join_prefill_tokens": s.prefill_tokens, "join_windows": joins - 1,
               "join_window_steps": len(inside), "join_inter_token_p50_s": percentile(inside, 0.5),
               "join_inter_token_p99_s": percentile(inside, 0.99), "steady_inter_token_p50_s": percentile(outside, 0.5),
               "steady_inter_token_p99_s": percentile(outside, 0.99),
               "join_slots_per_layer": sorted(set(plan.slots.values())),
               "join_kv_gib": KVCache.nbytes(config, rows, context, self.dtype) / 2**30}
        out["join_p99_over_steady_p50"] = (out["join_inter_token_p99_s"] / out["steady_inter_token_p50_s"]
                                           if inside and outside else None)
        if inside and outside:
            self.log(f"{label}, a {s.prefill_tokens}-token prompt joining: inter-token p50 "
                     f"{1e3 * out['join_inter_token_p50_s']:.1f} ms, p99 {1e3 * out['join_inter_token_p99_s']:.1f} ms "
                     f"while it prefills; {1e3 * out['steady_inter_token_p50_s']:.1f} ms p50 otherwise "
                     f"(p99 / that: {out['join_p99_over_steady_p50']:.2f})")
        return out

    def decode(self, model, step, provider, router, cache, config) -> dict:
        s = self.s
        generator = torch.Generator().manual_seed(s.seed)
        runs = []
        span = s.prompt_tokens + s.new_tokens
        summary = getattr(provider, "summary", dict)      # resident: no expert-cache counters
        for repeat in range(-1, s.repeats):       # -1: the warm-up run
            new_tokens = s.warmup_tokens if repeat < 0 else s.new_tokens
            prompt = torch.randint(3, config.vocab_size, (s.prompt_tokens,), generator=generator).tolist()
            if isinstance(router, ReplayRouter):
                router.seek((repeat + 1) * span)
            first_at = None
            count = 0
            for _ in generate(model, cache, prompt, SamplingParams(max_new_tokens=new_tokens), step=step):
                count += 1
                if first_at is None:          # prefill done: count decode only from here
                    summary()
                    if hasattr(provider, "stats"):
                        provider.stats.reset()
                    first_at = time.perf_counter()
            seconds = time.perf_counter() - first_at
            if repeat >= 0:
                runs.append({"tokens_per_s": (count - 1) / seconds, "seconds": seconds, "tokens": count - 1, **summary()})
        median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        out = {"decode_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "decode_repeats_tokens_per_s": [round(r["tokens_per_s"], 3) for r in runs]}
        if "bytes_loaded" in median:
            out.update(self.transfer_figures(median, "decode", config))
        return out

    def profile(self, model, step, router, cache, config) -> dict:
        from .profile import profile_decode

        s = self.s
        prompt = torch.randint(3, config.vocab_size, (s.prompt_tokens,), generator=torch.Generator().manual_seed(s.seed)).tolist()
        if isinstance(router, ReplayRouter):
            router.seek(0)
        step.set(0, int(prefill(model, cache, prompt, self.device)[-1].argmax()), len(prompt), row=0)

        def decode_one():
            step(1)
            step.next_tokens(1)       # the token reaches the host, as generate reads it

        for _ in range(2):      # warm (the first steps of a fresh DecodeStep run eagerly and capture its graphs)
            decode_one()
        return profile_decode(decode_one, s.profile_tokens, self.device, graph=step.graphs.get(1),
                              copier=getattr(model.provider, "copier", None))

    def prefill(self, model, provider, router, cache, config) -> dict:
        s, device = self.s, self.device
        generator = torch.Generator().manual_seed(s.seed + 1)
        summary = getattr(provider, "summary", dict)      # resident: no expert-cache counters
        runs = []
        for repeat in range(-1, s.prefill_repeats):
            prompt = torch.randint(3, config.vocab_size, (s.prefill_tokens,), generator=generator).tolist()
            if isinstance(router, ReplayRouter):
                router.seek(0)
            summary()
            if hasattr(provider, "stats"):
                provider.stats.reset()
            sync(device)
            started = time.perf_counter()
            logits = prefill(model, cache, prompt, device)
            sample(logits[-1], SamplingParams(max_new_tokens=1))    # the first token reaches the host
            seconds = time.perf_counter() - started
            if repeat >= 0:
                runs.append({"tokens_per_s": s.prefill_tokens / seconds, "seconds": seconds, "tokens": 1, **summary()})
        median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
        out = {"prefill_tokens": s.prefill_tokens, "prefill_tokens_per_s": median["tokens_per_s"],
               "time_to_first_token_s": median["seconds"]}
        if "bytes_loaded" in median:
            figures = self.transfer_figures(median, "prefill", config)
            out.update({k: figures[k] for k in ("prefill_h2d_gbps", "prefill_link_busy", "prefill_copy_wait_share")})
        return out

    def transfer_figures(self, run: dict, phase: str, config: ModelConfig) -> dict:
        peak = self.report["link_peak_gbps"]
        seconds = run["seconds"]
        achieved = run["bytes_loaded"] / seconds / 1e9
        out = {f"{phase}_h2d_gbps": achieved, f"{phase}_link_busy": achieved / peak,
               f"{phase}_copy_wait_share": run["wait_seconds"] / seconds}
        if phase == "decode":
            per_token = run["bytes_loaded"] / max(run["tokens"], 1)
            out = {"hit_rate": run["hit_rate"], "prefetch_recall": run.get("prefetch_recall"),
                   "prefetch_precision": run.get("prefetch_precision"),
                   "loads_per_token": run["loads"] / max(run["tokens"], 1),
                   "mb_loaded_per_token": per_token / 1e6,
                   "h2d_gbps": achieved, "link_busy": achieved / peak,
                   "copy_wait_share": run["wait_seconds"] / seconds,       # compute stream waiting on copies
                   "copy_busy_share": run["copy_seconds"] / seconds,       # copy stream busy
                   "transfer_ceiling_tokens_per_s": peak * 1e9 / per_token if per_token else None,
                   # DESIGN.md §4: peak / ((1 - h) x expert uses per token x bytes per expert)
                   "ceiling_at_hit_rate_tokens_per_s": (peak * 1e9 / ((1 - run["hit_rate"]) * len(config.moe_layers)
                                                        * config.top_k * run["bytes_loaded"] / run["loads"])
                                                        if run["loads"] and run["hit_rate"] < 1 else None),
                   "transfer_bound": run["wait_seconds"] / seconds >= 0.5,
                   "cpu_uses_per_token": run["cpu_uses"] / max(run["tokens"], 1), "cpu_gbps": run["cpu_gbps"],
                   "cpu_busy_share": run["cpu_seconds"] / seconds}
        return out


def run_benchmarks(settings: BenchSettings, log=print) -> dict:
    return Bench(settings, log).run()
