"""The paper's baseline: transformers' MixtralForCausalLM offloaded by accelerate under a GPU budget.

    result = measure_accelerate(SYNTHETIC_SHAPES["mixtral-8x7b"], budget_gib=12, device="cuda")

accelerate (`infer_auto_device_map` + `dispatch_model`, what `from_pretrained(device_map="auto",
max_memory=...)` does) keeps the first decoder layers on the GPU and the rest in CPU RAM; before
each forward of an offloaded layer its hooks copy ALL of the layer's weights (its 8 experts
included) to the GPU, synchronously, from pageable memory, and drop them afterwards. The weights
are bf16: accelerate cannot use our quantization.

Method (full Mixtral-8x7B would need ~90 GB of random bf16 weights in host RAM just for the
baseline, and several seconds per token, so it is measured per layer and extrapolated):
1. the placement: `infer_auto_device_map` on the FULL model (built on the meta device, no memory)
   with max_memory {gpu: budget} gives `gpu_layers` resident decoder layers; the other
   `offloaded_layers` go to the CPU;
2. the timing: a model with the full widths but `measure_gpu_layers` resident + `measure_cpu_layers`
   offloaded decoder layers (random bf16 weights) is dispatched by accelerate exactly so, and
   decoded token by token (batch 1, greedy, KV cache); hooks time every decoder layer (a CUDA
   sync at each layer boundary; accelerate's copies are synchronous anyway);
3. the estimate: seconds per token = the rest (embedding, final norm, lm_head, sampling: the
   measured total minus the layers; these modules sit where the full model's placement puts
   them, at 12 GiB the norm and the head in CPU RAM too) + gpu_layers x median resident layer + offloaded_layers x
   median offloaded layer. The reduced model's own measured tokens/s is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig

GIB = 1 << 30


@dataclass(frozen=True)
class AccelerateSettings:
    measure_gpu_layers: int = 1
    measure_cpu_layers: int = 2
    prompt_tokens: int = 128
    warmup_tokens: int = 2
    decode_tokens: int = 8


def mixtral_hf_config(config: ModelConfig, num_layers: int | None = None):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.expert_ffn,
        num_hidden_layers=num_layers or config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, num_local_experts=config.num_experts,
        num_experts_per_tok=config.top_k, rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def placement(config: ModelConfig, budget_bytes: int) -> dict:
    """How accelerate places the full model under `budget_bytes` of GPU memory (no weights built)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import MixtralForCausalLM

    with init_empty_weights():
        model = MixtralForCausalLM(mixtral_hf_config(config))
    device_map = infer_auto_device_map(model, max_memory={0: budget_bytes, "cpu": 1 << 50},
                                       no_split_module_classes=["MixtralDecoderLayer"], dtype=torch.bfloat16)
    gpu_layers = sum(1 for name, device in device_map.items() if name.startswith("model.layers.") and device == 0)
    # A whole decoder layer sits in one place; modules not under model.layers (embeddings, norm, head) too.
    whole_model_on_gpu = set(device_map.values()) == {0}
    return {"device_map": {k: str(v) for k, v in device_map.items()},
            "gpu_layers": config.num_layers if whole_model_on_gpu else gpu_layers,
            "offloaded_layers": 0 if whole_model_on_gpu else config.num_layers - gpu_layers}


def build_reduced_model(config: ModelConfig, settings: AccelerateSettings, device: torch.device,
                        top_level: dict[str, str] | None = None):
    """MixtralForCausalLM with the full widths and gpu + cpu decoder layers, random bf16 weights,
    dispatched by accelerate: layers [0, gpu) on `device`, the rest offloaded to CPU RAM, and the
    embedding, final norm and head where `top_level` ({module: "0" or "cpu"}, from `placement`)
    puts them (default: on `device`). On a CPU-only machine everything simply stays on the CPU."""
    from accelerate import dispatch_model, init_empty_weights
    from transformers import MixtralForCausalLM

    num_layers = settings.measure_gpu_layers + settings.measure_cpu_layers
    hf_config = mixtral_hf_config(config, num_layers)
    with init_empty_weights():
        model = MixtralForCausalLM(hf_config)
    buffers = {name: b.clone() for name, b in model.named_buffers()}   # rotary tables, built on the CPU already
    model = model.to(torch.bfloat16).to_empty(device="cpu").eval()     # bf16 while still empty: no fp32 copy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:   # written for real: untouched pages would make the host->device copies look faster
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    gpu = 0 if device.type == "cuda" else "cpu"
    device_map = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": gpu, "lm_head": gpu}
    for name, where in (top_level or {}).items():
        device_map[name] = "cpu" if where == "cpu" else gpu
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = gpu if i < settings.measure_gpu_layers else "cpu"
    return dispatch_model(model, device_map)


class LayerTimer:
    """Times each decoder layer's forward (accelerate's weight copies included), with a device sync at each boundary."""

    def __init__(self, layers, device: torch.device):
        self.device = device
        self.seconds: dict[int, list[float]] = {i: [] for i in range(len(layers))}
        self.started = 0.0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._start)
            layer.register_forward_hook(lambda module, args, out, i=i: self._stop(i))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, module, args):
        self._sync()
        self.started = time.perf_counter()

    def _stop(self, index):
        self._sync()
        self.seconds[index].append(time.perf_counter() - self.started)

    def clear(self):
        for times in self.seconds.values():
            times.clear()


@torch.no_grad()
def measure_accelerate(config: ModelConfig, budget_gib: float, device, settings: AccelerateSettings = AccelerateSettings(),
                       log=print) -> dict:
    device = torch.device(device)
    budget_bytes = int(budget_gib * GIB)
    place = placement(config, budget_bytes)
    log(f"accelerate: full model at {budget_gib} GiB -> {place['gpu_layers']} decoder layers on the GPU, "
        f"{place['offloaded_layers']} offloaded to CPU RAM")
    started = time.perf_counter()
    top_level = {name: where for name, where in place["device_map"].items() if not name.startswith("model.layers.")}
    model = build_reduced_model(config, settings, device, top_level)
    build_seconds = time.perf_counter() - started
    timer = LayerTimer(model.model.layers, device)
    ids = torch.randint(3, config.vocab_size, (1, settings.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    token_seconds = []
    for step in range(settings.warmup_tokens + settings.decode_tokens):
        if step == settings.warmup_tokens:
            timer.clear()
        t0 = time.perf_counter()
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        token.cpu()     # the token reaches the host, as in real decoding
        if step >= settings.warmup_tokens:
            token_seconds.append(time.perf_counter() - t0)
    resident = [t for i in range(settings.measure_gpu_layers) for t in timer.seconds[i]]
    offloaded = [t for i in range(settings.measure_gpu_layers, len(timer.seconds)) for t in timer.seconds[i]]
    layers_per_token = sum(sum(times) for times in timer.seconds.values()) / len(token_seconds)
    per_token = statistics.median(token_seconds)
    rest = max(per_token - layers_per_token, 0.0)
    resident_layer = statistics.median(resident) if resident else 0.0
    offloaded_layer = statistics.median(offloaded) if offloaded else 0.0
    full_seconds = rest + place["gpu_layers"] * resident_layer + place["offloaded_layers"] * offloaded_layer
    # (offloaded parameters sit on the meta device between forwards: their sizes are still right)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[-1].parameters())
    return {
        "mode": "accelerate",
        "weights": "bf16 (accelerate cannot use our quantization)",
        "budget_gib": budget_gib,
        "gpu_layers": place["gpu_layers"],
        "offloaded_layers": place["offloaded_layers"],
        "method": (f"per-layer timing of a {settings.measure_gpu_layers}+{settings.measure_cpu_layers}-layer model "
                   f"(full widths, accelerate dispatch), extrapolated to the full model's placement"),
        "decode_tokens_per_s": 1.0 / full_seconds if full_seconds else 0.0,
        "decode_tokens_per_s_is": "extrapolated",
        "measured_model_tokens_per_s": 1.0 / per_token,
        "resident_layer_ms": 1e3 * resident_layer,
        "offloaded_layer_ms": 1e3 * offloaded_layer,
        "rest_ms": 1e3 * rest,
        "offloaded_layer_gb": layer_bytes / 1e9,
        "offloaded_layer_h2d_gbps": layer_bytes / offloaded_layer / 1e9 if offloaded_layer else 0.0,
        "decode_tokens": settings.decode_tokens,
        "build_seconds": build_seconds,
    }

