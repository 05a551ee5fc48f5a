"""`moe-offload bench --train`: LoRA training steps on a synthetic model with offloaded experts.

    moe-offload bench --train --synthetic mixtral-8x7b --quant 4/2 --budget 12GiB,24GiB --seq-len 2048 \\
        --lora-rank 16 --targets attention,experts

Per budget: the plan (training's activations and optimizer state reserved, train.training_bytes), then warm-up
steps and timed steps on random tokens: training tokens/s (median step), link busy (bytes copied over the
step's time, against the measured pinned-copy peak), the expert-cache hit rate, the device's peak memory, and
what the same fine-tune would need with every expert resident. The last stdout line is the report as JSON.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import FinetuneConfig, LoraConfig, OffloadConfig
from ..engine import build_provider, expert_storage, expert_store, resolve_device
from ..errors import UserError
from ..experts import slot_stride
from ..generate import PREFILL_CHUNK
from ..lora import Adapters
from ..model import KVCache, Transformer
from ..offload.planner import GiB, make_plan, parse_size, workspace_bytes
from ..train import Rows, Trainer, training_bytes
from .runner import environment, measure_link_peak, parse_quant, sync, weights_nbytes
from .synthetic import SyntheticCheckpoint


@dataclass(frozen=True)
class TrainBenchSettings:
    synthetic: str = "mixtral-8x7b"
    quant: str = "4/2"
    budgets: tuple[str, ...] = ("12GiB", "24GiB")
    seq_len: int = 2048
    lora: LoraConfig = LoraConfig(rank=16, alpha=32.0, targets=("attention", "experts"))
    warmup_steps: int = 1
    steps: int = 3
    device: str = "cuda"


def run_training_bench(s: TrainBenchSettings, log=print) -> dict:
    device = resolve_device(s.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = SyntheticCheckpoint.create(s.synthetic, parse_quant(s.quant), device)
    config = ckpt.config
    log(f"[train {s.quant}] building {ckpt.folder.name} on {device} ...")
    weights = ckpt.dense_weights(device, dtype)
    expert_format, expert_buffer = expert_storage(ckpt, dtype)
    store = expert_store(config, expert_format, expert_buffer, None, device)
    settings = FinetuneConfig(seq_len=s.seq_len, batch_tokens=s.seq_len)
    extra = training_bytes(config, s.lora, settings, dtype)
    dense = weights_nbytes(weights)
    all_experts = len(config.moe_layers) * config.num_experts * slot_stride(expert_format.nbytes)
    peak_link = measure_link_peak(device)
    common = {"model": ckpt.folder.name, "quant": s.quant, "seq_len": s.seq_len, "lora_rank": s.lora.rank,
              "targets": ",".join(s.lora.targets), "dense_gib": dense / GiB, "training_gib": extra / GiB,
              "resident_need_gib": (dense + all_experts + extra) / GiB, "link_peak_gbps": peak_link}
    results = []
    for budget_text in s.budgets:
        entry = {**common, "budget": budget_text}
        try:
            plan = make_plan(config, expert_format.nbytes, dense, KVCache.nbytes(config, 1, 1, dtype), 1,
                             workspace_bytes(config, min(PREFILL_CHUNK, s.seq_len), s.seq_len, dtype.itemsize) + extra,
                             parse_size(budget_text, "--budget"))
        except UserError as e:
            log(f"[train {s.quant} @ {budget_text}] does not fit: {e}")
            results.append({**entry, "status": "does not fit", "error": str(e)})
            continue
        log(plan.describe())
        results.append({**entry, **_measure(s, config, weights, store, expert_format, plan, device, dtype, peak_link, log)})
    return {"environment": environment(device), "results": results}


def _measure(s: TrainBenchSettings, config, weights, store, expert_format, plan, device, dtype, peak_link, log) -> dict:
    offload = OffloadConfig(enabled=True, cpu_experts="off")    # training computes the experts on the device only
    provider = build_provider(config, weights, store, expert_format, plan, offload, device, dtype)
    trainer = Trainer(Transformer(config, weights, provider), Adapters.create(config, s.lora, device))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, s.seq_len + 1), generator=generator).to(device)
    rows = Rows(tokens[:, :-1], tokens[:, 1:], torch.ones(1, s.seq_len, dtype=torch.bool, device=device))
    for _ in range(s.warmup_steps):
        trainer.step(rows)
    provider.stats.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(s.steps):
        sync(device)
        started = time.perf_counter()
        loss = trainer.step(rows)
        sync(device)
        times.append(time.perf_counter() - started)
        log(f"  step {step + 1}: {times[-1]:.2f} s, loss {loss:.3f}")
    stats = provider.summary()
    seconds = sum(times)
    return {"status": "ok", "slots_per_layer": sorted(set(plan.slots.values())), "planned_gib": plan.device_bytes / GiB,
            "tokens_per_second": s.seq_len / statistics.median(times), "step_seconds": statistics.median(times),
            "hit_rate": stats["hit_rate"], "gb_copied_per_step": stats["bytes_loaded"] / s.steps / 1e9,
            "link_busy": stats["bytes_loaded"] / seconds / 1e9 / peak_link,
            "peak_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None}
