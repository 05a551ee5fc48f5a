"""The memory planner: a device budget and a host budget -> what lives where.

    plan = make_plan(config, expert_nbytes=fmt.nbytes, dense_bytes=..., kv_bytes=..., device_budget=12 * 2**30,
                     host_budget=11 * 2**30)
    print(plan.describe())        # bytes per tier, slots per layer
    plan.slots                    # {MoE layer: expert slots on the device}

On the device: every non-expert weight, the KV cache for --max-context, a workspace for the
activations of one prefill chunk (and the CPU tier's rows: cpu_tier_bytes), and what is left as expert slots, as many per layer as fit
(spread evenly; a layer never gets more slots than it has experts), but for the first `cpu_layers` MoE layers,
whose experts stay on the host and run on the CPU (cpu_tier.py): they get none. On the host: as many experts
as the host budget holds in (pinned) RAM, the rest memory-mapped from disk. A device budget that
cannot hold one slot per MoE layer is refused with the smallest budget that works.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig, OffloadConfig, QuantConfig
from ..errors import UserError
from ..experts import slot_stride
from ..generate import PREFILL_CHUNK
from ..model import ATTENTION_CHUNK, KVCache
from ..quant.checkpoint import dense_nbytes

GiB = 2**30
WORKSPACE_MARGIN = 384 * 2**20  # cuBLAS workspace, Triton split-k buffers, router temporaries, the RoPE table (4 MiB at 4096 tokens), the CPU tier's decode rows (cpu_tier_bytes), allocator fragmentation (64 MiB was too little on an H200 at 12 GiB)

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str, flag: str) -> int:
    """'12GiB', '12G' (binary), '12GB' (decimal), '500MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise UserError(f"{flag} {text!r} is not a size; write e.g. 12GiB, 500MiB or 24GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UserError(f"{flag} {text!r}: the size must be positive")
    return size


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def workspace_bytes(config: ModelConfig, chunk: int, max_context: int, itemsize: int) -> int:
    """Activations of one forward over `chunk` tokens, generously: hidden-sized temporaries, the
    top-k rows of every token (and their fp32 sum), one expert's intermediates, router
    probabilities, an attention score matrix in fp32 for ATTENTION_CHUNK queries (in case attention
    falls back to the math kernel), plus the last token's logits."""
    c = config
    ffn = max(c.expert_ffn, c.dense_ffn, c.shared_expert_ffn)
    per_token = (c.hidden_size * (8 * itemsize + c.top_k * (itemsize + 4)) + 3 * ffn * itemsize + c.num_experts * 4)
    scores = min(chunk, ATTENTION_CHUNK) * max_context * (c.num_heads * 4 + 1)
    return chunk * per_token + scores + 2 * c.vocab_size * 4 + WORKSPACE_MARGIN


def cpu_tier_bytes(config: ModelConfig, chunk: int, itemsize: int, cpu_layers: int) -> int:
    """What the CPU tier (cpu_tier.py) keeps on the device beyond WORKSPACE_MARGIN: with CPU layers, the rows and
    mask of the CPU's products for one prefill chunk, one set that every layer shares (provider.ReadBuffers). The
    decode steps' rows, per layer and batch bucket, are within the margin (batch 1: 32 x 2 x 2 rows of 8 KiB, 1 MiB,
    for Mixtral-8x7B; 3 MiB for Qwen3-30B-A3B), as is the link's calibration (a copy into a slot)."""
    return chunk * config.top_k * (config.hidden_size * itemsize + 1) if cpu_layers else 0


@dataclass(frozen=True)
class Plan:
    device_budget: int
    dense_bytes: int       # non-expert weights
    kv_bytes: int
    max_context: int
    workspace_bytes: int
    expert_nbytes: int
    slots: dict[int, int]  # MoE layer -> expert slots on the device
    ram_experts: int       # experts in host RAM; the rest on disk
    disk_experts: int
    num_experts: int       # per MoE layer
    max_batch: int = 1     # sequences the KV cache holds

    @property
    def cpu_layers(self) -> list[int]:
        """MoE layers whose experts run on the CPU: those without slots."""
        return [layer for layer, n in self.slots.items() if n == 0]

    @property
    def holds_every_expert(self) -> bool:
        """Every expert of every MoE layer has a slot of its own: there is nothing to offload."""
        return all(n == self.num_experts for n in self.slots.values())

    @property
    def slot_bytes(self) -> int:
        return sum(self.slots.values()) * slot_stride(self.expert_nbytes)

    @property
    def device_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.workspace_bytes + self.slot_bytes

    def describe(self) -> str:
        n = sum(self.slots.values())
        lines = [
            f"offload plan: device {gib(self.device_bytes)} of {gib(self.device_budget)}: "
            f"non-expert weights {gib(self.dense_bytes)}, KV cache {gib(self.kv_bytes)} ({kv_tokens(self.max_batch, self.max_context)}), "
            f"workspace {gib(self.workspace_bytes)}, expert slots {gib(self.slot_bytes)} "
            f"({n} slots of {self.expert_nbytes / 2**20:.1f} MiB)",
            f"  slots per layer (of {self.num_experts} experts): {_ranges(self.slots)}"
            + (" (0: experts run on the CPU)" if self.cpu_layers else ""),
            f"  host: {gib(self.ram_experts * self.expert_nbytes)} of experts in RAM ({self.ram_experts} experts), "
            f"{gib(self.disk_experts * self.expert_nbytes)} memory-mapped from disk ({self.disk_experts} experts)",
        ]
        return "\n".join(lines)


def make_plan(config: ModelConfig, expert_nbytes: int, dense_bytes: int, kv_bytes: int, max_context: int,
              workspace: int, device_budget: int, host_budget: int | None = None,
              slots_per_layer: int | None = None, max_batch: int = 1, cpu_layers: int = 0) -> Plan:
    if not 0 <= cpu_layers <= len(config.moe_layers):
        raise UserError(f"--cpu-moe-layers {cpu_layers}: use 0 to {len(config.moe_layers)} (the model's MoE layers)")
    on_cpu, layers = config.moe_layers[:cpu_layers], config.moe_layers[cpu_layers:]
    fixed = dense_bytes + kv_bytes + workspace
    stride = slot_stride(expert_nbytes)
    smallest = fixed + len(layers) * stride
    if device_budget < smallest:
        raise UserError(
            f"--gpu-memory {gib(device_budget)} is too small: non-expert weights {gib(dense_bytes)}, KV cache "
            f"{gib(kv_bytes)} for {kv_tokens(max_batch, max_context)} and workspace {gib(workspace)} plus one expert "
            f"slot per layer ({len(layers)} x {expert_nbytes / 2**20:.1f} MiB) need {_round_up_gib(smallest)} GiB; "
            f"raise --gpu-memory to at least {_round_up_gib(smallest)}GiB, or lower --max-context"
            + (" or --max-batch" if max_batch > 1 else "") + (", or raise --cpu-moe-layers" if layers else ""))
    if slots_per_layer is not None:
        if not 1 <= slots_per_layer <= config.num_experts:
            raise UserError(f"--slots {slots_per_layer}: use 1 to {config.num_experts} (the experts per layer)")
        need = fixed + len(layers) * slots_per_layer * stride
        if need > device_budget:
            raise UserError(f"--slots {slots_per_layer} needs {_round_up_gib(need)} GiB on the device but --gpu-memory "
                            f"is {gib(device_budget)}; lower --slots or raise --gpu-memory to {_round_up_gib(need)}GiB")
        slots = dict.fromkeys(layers, slots_per_layer)
    else:
        total = min((device_budget - fixed) // stride, len(layers) * config.num_experts)
        base, extra = divmod(total, max(len(layers), 1))
        slots = {layer: base + (i < extra) for i, layer in enumerate(layers)}
    slots = {**dict.fromkeys(on_cpu, 0), **slots}
    all_experts = len(config.moe_layers) * config.num_experts
    ram = all_experts if host_budget is None else min(all_experts, host_budget // expert_nbytes)
    return Plan(device_budget, dense_bytes, kv_bytes, max_context, workspace, expert_nbytes, slots,
                ram, all_experts - ram, config.num_experts, max_batch)


def kv_tokens(max_batch: int, max_context: int) -> str:
    return f"{max_context} tokens" if max_batch == 1 else f"{max_batch} sequences x {max_context} tokens"


def _round_up_gib(n: int) -> str:
    return f"{-(-n * 100 // GiB) / 100:.2f}"


def _ranges(slots: dict[int, int]) -> str:
    """{0: 2, 1: 2, 2: 1} -> '2 in layers 0-1, 1 in layer 2'."""
    groups: list[list] = []
    for layer, count in slots.items():
        if groups and groups[-1][0] == count and groups[-1][2] + 1 == layer:
            groups[-1][2] = layer
        else:
            groups.append([count, layer, layer])
    return ", ".join(f"{c} in layer {a}" if a == b else f"{c} in layers {a}-{b}" for c, a, b in groups)


def plan_for(config: ModelConfig, expert_nbytes: int, dtype: torch.dtype, max_context: int,
             offload: OffloadConfig, device, quant: QuantConfig | None = None, max_batch: int = 1,
             extra_workspace: int = 0) -> Plan:
    """The plan for a model whose non-expert weights are in `dtype` but for the roles `quant` quantizes, on `device`,
    with a KV cache of `max_batch` sequences of `max_context` tokens, and `extra_workspace` bytes more of workspace
    (fine-tuning's activations and optimizer state)."""
    if offload.prefetch_experts is not None and not 0 <= offload.prefetch_experts <= config.num_experts:
        raise UserError(f"--prefetch {offload.prefetch_experts}: use 0 (off) to {config.num_experts} (the experts per layer)")
    deepest = max(1, len(config.moe_layers) - 1)
    if not 1 <= offload.prefetch_depth <= deepest:
        raise UserError(f"--prefetch-depth {offload.prefetch_depth}: use 1 to {deepest} (the model has "
                        f"{len(config.moe_layers)} MoE layers)")
    device = torch.device(device)
    itemsize = dtype.itemsize
    dense = dense_nbytes(config, dtype, quant)
    budget = offload.gpu_memory if offload.gpu_memory is not None else free_memory(device)
    chunk = min(PREFILL_CHUNK, max_context)
    workspace = workspace_bytes(config, chunk, max_context, itemsize) + cpu_tier_bytes(config, chunk, itemsize,
                                                                                        offload.cpu_moe_layers)
    return make_plan(config, expert_nbytes, dense, KVCache.nbytes(config, max_batch, max_context, dtype), max_context,
                     workspace + extra_workspace, budget, offload.cpu_memory, offload.slots_per_layer, max_batch,
                     offload.cpu_moe_layers)


def free_memory(device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
