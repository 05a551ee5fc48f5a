"""The one object that the CLI and the server use, and the one place where a model's experts are composed.

    engine = Engine.load(RuntimeConfig(model="path/to/model"))
    run = engine.stream(engine.tokenizer.encode("def fib(n):"), SamplingParams(max_new_tokens=64))
    for text in run:
        print(text, end="")
    print(run.stats)

An Engine owns one model, its tokenizer and one KV cache; a run holds the cache until it ends,
so runs on one engine go one at a time.

`build_provider` composes the experts that `Engine.load` gives its model: every one resident, or offloaded as a
plan and an OffloadConfig say (host store, slots, cache policy, predictor, CPU tier). The benchmarks build their
models with it too, varying only the OffloadConfig, the router and the predictor.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint
from .config import ModelConfig, OffloadConfig, RuntimeConfig, SamplingParams
from .constrain import Grammars
from .errors import UserError
from .experts import DenseExpertFormat, ExpertFormat, ExpertProvider, ExpertSlots, ResidentExperts, slot_stride
from .generate import Batch, Generation
from .logprobs import LogprobRecorder, TokenLogprob
from .lora import Adapters, LoraExperts, merges_experts
from .model import KVCache, ModelWeights, Transformer
from .offload.cache import ForgetfulCache, LayerCache
from .offload.cpu_tier import CHOICES as CPU_EXPERTS, CpuExperts, unsupported
from .offload.planner import Plan, plan_for
from .offload.prefetch import ExpertPredictor, GatePredictor
from .offload.provider import OffloadedExperts
from .offload.store import ExpertStore
from .quant.checkpoint import QuantizedCheckpoint, open_checkpoint
from .quant.cpu_kernels import default_threads
from .quant.mxfp4 import MXFP4ExpertFormat
from .step import DecodeStep
from .tokenizer import Tokenizer

ExpertBuffer = Callable[[int, int], torch.Tensor]   # (layer, expert) -> the expert's packed bytes, uint8

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """A device with its index (cuda:0, not cuda): torch.cuda's memory functions insist on one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not supported; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def expert_storage(ckpt: Checkpoint, dtype: torch.dtype,
                   adapters: Adapters | None = None) -> tuple[ExpertFormat, ExpertBuffer]:
    """How experts are stored, and where each one's packed CPU buffer comes from: (layer, expert) -> uint8.
    Unquantized experts get their LoRA adapters (if any) added before they are packed."""
    if isinstance(ckpt, QuantizedCheckpoint):
        return ckpt.expert_storage(dtype)
    cfg = ckpt.config
    # MXFP4 experts (gpt-oss as published) stay MXFP4: 4.25 bits a weight over the link; --quant converts them
    if ckpt.mxfp4_experts:
        expert_format = MXFP4ExpertFormat(cfg.hidden_size, cfg.expert_ffn, dtype, cfg.expert_bias,
                                          swiglu=(cfg.swiglu_alpha, cfg.swiglu_limit))
    else:
        expert_format = DenseExpertFormat(cfg.hidden_size, cfg.expert_ffn, dtype, cfg.expert_bias)
    if adapters is not None and merges_experts(expert_format):
        return expert_format, lambda layer, expert_id: expert_format.pack(
            adapters.merged_expert(layer, expert_id, ckpt.expert(layer, expert_id)))
    return expert_format, lambda layer, expert_id: expert_format.pack(ckpt.expert(layer, expert_id))


CACHE_POLICIES = {"lru": LayerCache, "none": ForgetfulCache}   # OffloadConfig.cache -> each layer's slot bookkeeping


def ignore(_) -> None:
    """A progress or log callback that shows nothing."""


def build_provider(config: ModelConfig, weights: ModelWeights, experts: ExpertStore | ExpertBuffer,
                   expert_format: ExpertFormat, plan: Plan | None, offload: OffloadConfig, device: torch.device,
                   dtype: torch.dtype, predictor_for: Callable[[GatePredictor], ExpertPredictor] | None = None,
                   progress: Callable[[int], object] = ignore, log: Callable[[str], object] = ignore) -> ExpertProvider:
    """A model's experts. With a plan: offloaded from `experts`, a filled ExpertStore, into the plan's slots, with
    the cache policy, predictor, timing and CPU tier that `offload` asks for; "auto"'s calibration line goes to
    `log`. `predictor_for(gate)` stands in for the gate predictor where `offload` asks for one (the benchmark's
    replay of recorded guesses, at the gate's cost). Without a plan: every expert resident on `device`, copied from
    `experts`, an ExpertBuffer, each copy counted by `progress`."""
    if plan is None:
        return resident_experts(config, expert_format, experts, device, progress)
    predictor = gate_predictor(config, weights, offload)
    if predictor is not None and predictor_for is not None:
        predictor = predictor_for(predictor)
    cpu = cpu_experts(config, expert_format, experts, offload, device, dtype)
    provider = OffloadedExperts(experts, expert_format, plan.slots, device, predictor, measure_time=offload.measure_time,
                                cache_type=CACHE_POLICIES[offload.cache], cpu=cpu)
    if cpu is not None and cpu.costs is not None:      # "auto" calibrated as the provider took its slots
        log(cpu.costs.calibration.describe())
    return provider


def expert_store(config: ModelConfig, expert_format: ExpertFormat, expert_buffer: ExpertBuffer,
                 ram_experts: int | None, device: torch.device, disk_dir: Path | None = None,
                 progress: Callable[[int], object] = ignore) -> ExpertStore:
    """Every expert into the host store: `ram_experts` in RAM (pinned on CUDA; None: all), the rest mapped from
    `disk_dir`."""
    store = ExpertStore(config.moe_layers, config.num_experts, expert_format.nbytes, ram_experts,
                        pin=device.type == "cuda", disk_dir=disk_dir)
    for layer in config.moe_layers:
        for expert_id in range(config.num_experts):
            store.write(layer, expert_id, expert_buffer(layer, expert_id))
            progress(1)
    return store


def resident_experts(config: ModelConfig, expert_format: ExpertFormat, expert_buffer: ExpertBuffer, device,
                     progress) -> ResidentExperts:
    """Every expert on the device: each layer's in one slot buffer, expert e in slot e."""
    slots_by_layer = {}
    for layer in config.moe_layers:
        slots = slots_by_layer[layer] = ExpertSlots(expert_format, config.num_experts, slot_stride(expert_format.nbytes), device)
        for expert_id in range(config.num_experts):
            slots.memory[expert_id, :expert_format.nbytes].copy_(expert_buffer(layer, expert_id))
            progress(1)
    return ResidentExperts(expert_format, slots_by_layer)


def gate_predictor(config: ModelConfig, weights: ModelWeights, offload: OffloadConfig) -> GatePredictor | None:
    """The speculative prefetch's predictor that `offload` asks for, or None (prefetch off)."""
    top_n = config.top_k if offload.prefetch_experts is None else offload.prefetch_experts
    return GatePredictor(config, weights.layers, offload.prefetch_depth, top_n, offload.prefetch_norm) if top_n else None


def cpu_experts(config: ModelConfig, expert_format: ExpertFormat, store: ExpertStore, offload: OffloadConfig,
                device: torch.device, dtype: torch.dtype) -> CpuExperts | None:
    """The CPU tier that --cpu-moe-layers and --cpu-experts ask for, or None. "auto" calibrates the link and the CPU
    (tens of milliseconds, once the provider has its slots) and lets the cost model choose per miss; on a CPU device there is no link to spare, so it is off.
    A model whose experts the CPU cannot run stays off under "auto" and is refused with --cpu-moe-layers."""
    if offload.cpu_experts not in CPU_EXPERTS:
        raise UserError(f"--cpu-experts {offload.cpu_experts!r}: use one of {', '.join(CPU_EXPERTS)}")
    dynamic = offload.cpu_experts == "auto" and device.type == "cuda"
    reason = unsupported(config, expert_format)
    if reason and offload.cpu_moe_layers:
        raise UserError(f"--cpu-moe-layers {offload.cpu_moe_layers}: {reason}")
    if reason or not (dynamic or offload.cpu_moe_layers):
        return None
    threads = max(1, default_threads() - 1) if device.type == "cuda" else None   # a core for the thread driving the GPU
    return CpuExperts(store, expert_format, device, threads=threads, auto=dynamic, hidden_size=config.hidden_size,
                      dtype=dtype)    # "auto" calibrates once the provider has its slots (OffloadedExperts)


def without_cpu_experts(offload: OffloadConfig, reason: str) -> OffloadConfig:
    """No CPU tier where the CPU would compute experts without their adapters (its kernels know nothing of LoRA,
    nor of gradients): --cpu-experts auto falls back to off; --cpu-moe-layers is refused."""
    if offload.cpu_moe_layers:
        raise UserError(f"--cpu-moe-layers {offload.cpu_moe_layers}: {reason} (the CPU computes experts without "
                        f"adapters or gradients)")
    return replace(offload, cpu_experts="off")


@dataclass
class RunStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0   # seconds, prefill included
    decode_seconds: float = 0.0        # after the first token

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"prompt tokens: {self.prompt_tokens}, new tokens: {self.new_tokens}, "
                f"time to first token: {self.time_to_first_token:.3f} s, "
                f"decode: {self.decode_tokens_per_second:.2f} tokens/s")


@dataclass(eq=False)
class Run:
    """One generation's text. The CLI iterates it for text pieces (`Engine.stream`); the server feeds it the tokens
    that its batch's steps produce (`Engine.start`, `take`, `finish`). Afterwards `token_ids`, `finish_reason`,
    `stats`, and the log-probabilities that SamplingParams asked for (logprobs.py). Each list grows before the
    piece that needs it is emitted: piece k is the text of tokens up to `piece_ends[k]`."""

    generation: Generation
    decoder: object                    # the tokenizer's stream decoder: tokens -> text, never half a character
    stops: "StopStrings"
    max_context: int
    pieces: Iterator[str] = iter(())
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" (EOS or a stop string) or "length"
    stop_string: str | None = None     # the stop string that ended it, if one did
    stats: RunStats = field(default_factory=RunStats)
    started: float = field(default_factory=time.perf_counter)
    piece_ends: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)          # one per new token (params.logprobs)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # prompt tokens 1..T-1 (params.prompt_logprobs)
    recorder: LogprobRecorder | None = None   # keeps each step's distribution for `logprobs`

    def __iter__(self):
        return self.pieces

    def text(self) -> str:
        return "".join(self)

    def take(self, token: int) -> tuple[str, bool]:
        """A new token -> (the text it makes safe to emit now, whether a stop string ended the run)."""
        now = time.perf_counter()
        if not self.token_ids:
            self.stats.time_to_first_token = now - self.started
        else:
            self.stats.decode_seconds = now - self.started - self.stats.time_to_first_token
        self.token_ids.append(token)
        if self.generation.params.logprobs is not None:
            self.logprobs.append(self.recorder.take(token))
        self.stats.new_tokens = len(self.token_ids)
        text, stopped = self.stops.feed(self.decoder.push(token))
        if stopped:
            self.finish_reason, self.stop_string = "stop", self.stops.matched
        if text:
            self.piece_ends.append(len(self.token_ids))
        return text, stopped

    def finish(self) -> str:
        """The generation has ended on its own (EOS, its token count, the context): the text held back until now."""
        params = self.generation.params
        out_of_room = (len(self.token_ids) == params.max_new_tokens
                       or len(self.generation.prompt_ids) + len(self.token_ids) >= self.max_context)
        self.finish_reason = "length" if out_of_room else "stop"  # else: EOS
        text, stopped = self.stops.feed(self.decoder.flush(), final=True)
        if stopped:
            self.finish_reason, self.stop_string = "stop", self.stops.matched
        if text:
            self.piece_ends.append(len(self.token_ids))
        return text


class Engine:
    def __init__(self, config: ModelConfig, model: Transformer, tokenizer: Tokenizer, cache: KVCache, name: str,
                 plan: Plan | None = None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.step = DecodeStep(model, cache)   # captures its CUDA graphs once, for every run of this engine
        self.batch = Batch(model, cache, self.step)   # the generations running; as many at once as the cache has rows
        self.name = name
        self.plan = plan   # the offload plan; None when every expert is resident

    @property
    def max_context(self) -> int:
        return self.cache.max_len

    @property
    def max_batch(self) -> int:
        """Generations at once: the KV cache's rows."""
        return self.cache.keys[0].shape[0]

    @classmethod
    def load(cls, runtime: RuntimeConfig = RuntimeConfig(), progress: bool = True,
             offload: OffloadConfig = OffloadConfig(), extra_workspace=None, training: bool = False) -> "Engine":
        """extra_workspace(config, dtype) -> bytes the offload planner reserves on the device beyond inference's
        workspace (fine-tuning's activations and optimizer state, train.training_bytes). `training`: the model will
        be fine-tuned (train.Trainer), so no expert runs on the CPU."""
        device = resolve_device(runtime.device)
        dtype = resolve_dtype(runtime.dtype, device)
        ckpt = open_checkpoint(runtime.model, runtime.quant, device)
        config = ckpt.config
        if runtime.max_context < 1:
            raise UserError(f"--max-context must be at least 1, got {runtime.max_context}")
        max_context = min(runtime.max_context, config.max_position_embeddings)
        tokenizer = Tokenizer.from_folder(runtime.model, eos_ids=config.eos_token_ids)
        adapters = Adapters.load(runtime.lora, config, device) if runtime.lora else None
        expert_format, expert_buffer = expert_storage(ckpt, dtype, adapters)
        on_the_fly = adapters is not None and "experts" in adapters.lora.targets and not merges_experts(expert_format)
        if on_the_fly or training:
            offload = without_cpu_experts(offload, "fine-tuning computes the experts on the device only" if training
                                          else "--lora's adapters on quantized experts apply on the device only")
        quant = ckpt.quant if isinstance(ckpt, QuantizedCheckpoint) else None
        if runtime.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {runtime.max_batch}")
        extra = extra_workspace(config, dtype) if extra_workspace else 0
        plan = (plan_for(config, expert_format.nbytes, dtype, max_context, offload, device, quant, runtime.max_batch, extra)
                if offload.enabled else None)
        if plan and progress:
            print(plan.describe(), file=sys.stderr)
        # resident: one graph a decode token, no host sync per layer. Not for training: its backward takes an
        # offloaded layer's experts one at a time (train.one_slot_each), a resident layer's all at once
        if plan and plan.holds_every_expert and not training:
            if progress:
                print("  every expert fits on the device: running them resident, nothing offloaded", file=sys.stderr)
            plan = None
        total = ckpt.num_dense_tensors() + len(config.moe_layers) * config.num_experts
        with tqdm(total=total, desc="loading", unit="tensor", disable=not progress or None, file=sys.stderr) as bar:
            weights = ckpt.dense_weights(device, dtype, progress=bar.update)
            if adapters:
                weights = adapters.merged(weights)
            experts = (expert_store(config, expert_format, expert_buffer, plan.ram_experts, device, offload.offload_dir,
                                    bar.update) if plan else expert_buffer)
            provider = build_provider(config, weights, experts, expert_format, plan, offload, device, dtype,
                                      progress=bar.update, log=partial(tqdm.write, file=sys.stderr) if progress else ignore)
            if on_the_fly:
                provider = LoraExperts(provider, adapters)     # quantized experts: their adapters on the fly
        model = Transformer(config, weights, provider)
        cache = KVCache.allocate(config, batch=runtime.max_batch, max_len=max_context, device=device, dtype=dtype)
        return cls(config, model, tokenizer, cache, name=Path(runtime.model).name, plan=plan)

    @cached_property
    def grammars(self) -> Grammars:
        """Constrained decoding's token table (constrain.py), built on first use."""
        return Grammars(self.tokenizer, self.config.vocab_size)

    def expert_stats(self) -> dict[str, float]:
        """Expert-cache counters for --stats and /metrics (hit rate, prefetch recall, ...; see
        offload/cache.py for each one); empty when resident."""
        provider = self.model.provider
        return provider.summary() if hasattr(provider, "summary") else {}   # OffloadedExperts, maybe under LoraExperts

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_context}, "
                f"prompt and completion together; "
                f"shorten the prompt or raise --max-context (the model allows {self.config.max_position_embeddings})"
            )

    def start(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        """A generation joins the engine's batch; its tokens come from `self.batch.step()` (fed to `Run.take`)."""
        self.check_prompt(prompt_ids)
        recorder = None
        if params.logprobs is not None or params.prompt_logprobs is not None:
            recorder = LogprobRecorder(prompt_ids, params.logprobs or 0, params.prompt_logprobs)
        constraint = self.grammars.constraint(params.grammar) if params.grammar else None
        generation = self.batch.add(prompt_ids, params, self.tokenizer.eos_ids, recorder and recorder.see, constraint)
        run = Run(generation, self.tokenizer.stream_decoder(), StopStrings(params.stop), self.max_context,
                  recorder=recorder, prompt_logprobs=recorder.prompt if recorder else [])
        run.stats.prompt_tokens = len(prompt_ids)
        return run

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        """One generation on its own: iterate the run for its text pieces."""
        run = self.start(prompt_ids, params)
        run.pieces = self._pieces(run)
        return run

    def _pieces(self, run: Run) -> Iterator[str]:
        try:
            while not run.generation.done:
                for _, token in self.batch.step():
                    text, stopped = run.take(token)
                    if text:
                        yield text
                    if stopped:
                        return
            text = run.finish()
            if text:
                yield text
        finally:
            self.batch.cancel(run.generation)


class StopStrings:
    """Withholds text that might be the start of a stop string; cuts the text at the first stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None   # the stop string reached (the first in the text)

    def feed(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was reached)."""
        text = self.held + piece
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return text[:at], True
        keep = 0 if final else max((_partial_suffix(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
