"""LoRA fine-tuning: the model's own layers, its provider's experts (resident or offloaded), AdamW on the adapters.

    engine = Engine.load(RuntimeConfig(model=DIR), offload=OffloadConfig(enabled=True, slots_per_layer=2), training=True)
    trainer = Trainer(engine.model, Adapters.create(engine.config, LoraConfig(targets=("attention", "experts"))))
    loss = trainer.step(batch)             # batch: Rows (inputs, targets, mask), (rows, seq_len)
    Trainer(..., micro_rows=2).step(batch)  # the same step, 2 rows a forward and backward, gradients accumulated
    finetune(engine, lora, FinetuneConfig(data=..., out=...))     # the CLI's loop: data, progress, checkpoints

Each decoder layer is checkpointed: forward keeps only its input, backward recomputes it. The experts are the
exception. Forward records each MoE layer's routing and its experts' outputs; the recompute replays them and
streams nothing; backward walks the layers in reverse and asks the provider for exactly the experts forward
used, layer by layer, each expert once, computing its gradients as it passes (`ExpertPairs`). With offloaded
experts the provider's predictor is, for backward, the recording itself (`RecordedRouting`): while layer l's
experts run, the copies of layer l-1's start. Whatever the slots, offloaded gives the resident result bit for
bit: each expert sees the same rows, and every (token, choice) pair's gradient has a row of its own, summed over
the choices at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .config import FinetuneConfig, LoraConfig, ModelConfig
from .errors import UserError
from .experts import ExpertBatch
from .lora import Adapters, LoraExperts, shapes
from .model import ATTENTION_BACKENDS, KVCache, Transformer, expert_outputs, rotary
from .offload.planner import WORKSPACE_MARGIN, workspace_bytes
from .tokenizer import Tokenizer

STATE_FILE = "training_state.pt"


# -- data ------------------------------------------------------------------------------------------

class Example(NamedTuple):
    tokens: list[int]
    trained: list[bool]      # whether each token is a target of the loss


class Rows(NamedTuple):
    inputs: torch.Tensor     # int64 (rows, seq_len)
    targets: torch.Tensor    # int64 (rows, seq_len): the next tokens
    mask: torch.Tensor       # bool (rows, seq_len): which targets the loss counts


def read_examples(path: Path, tokenizer: Tokenizer, chat: bool) -> list[Example]:
    """A JSON-lines file: {"text"} (loss on every token), {"prompt", "completion"} (on the completion), or with
    `chat` {"messages": [...]} (the chat template; loss on the assistant's turns). Blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--data {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--data {path}: line {number} is not JSON ({e.msg} at column {e.colno})") from None
        examples.append(_example(record, tokenizer, chat, f"--data {path}: line {number}"))
    if not examples:
        raise UserError(f"--data {path}: no examples (one JSON object a line)")
    return examples


def _example(record, tokenizer: Tokenizer, chat: bool, where: str) -> Example:
    if chat:
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     and isinstance(m.get("role"), str) for m in messages):
            raise UserError(f'{where}: with --chat, expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        return _chat_example(messages, tokenizer, where)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        tokens = tokenizer.encode(record["text"])
        return Example(tokens, [False] + [True] * (len(tokens) - 1))
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        start = len(tokenizer.encode(record["prompt"]))
        tokens = tokenizer.encode(record["prompt"] + record["completion"])
        return Example(tokens, [i >= start for i in range(len(tokens))])
    raise UserError(f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}} '
                    f'(or --chat with {{"messages": [...]}})')


def _chat_example(messages: list[dict], tokenizer: Tokenizer, where: str) -> Example:
    tokens = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trained = [False] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.encode_chat(messages[:i], add_generation_prompt=True))
            end = len(tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False))
            trained[start:end] = [True] * (end - start)
    if not any(trained):
        raise UserError(f"{where}: no assistant message to learn from")
    return Example(tokens, trained)


def pack(examples: list[Example], seq_len: int, pad_id: int) -> Rows:
    """The examples one after another, cut into rows of seq_len inputs and their next tokens; the last row padded
    (padding is never a target)."""
    tokens = [t for e in examples for t in e.tokens]
    trained = [m for e in examples for m in e.trained]
    rows = max(1, -(-(len(tokens) - 1) // seq_len))
    padding = rows * seq_len + 1 - len(tokens)
    tokens = torch.tensor(tokens + [pad_id] * padding)
    trained = torch.tensor(trained + [False] * padding)
    windows = torch.arange(rows)[:, None] * seq_len + torch.arange(seq_len)[None, :]
    return Rows(tokens[windows], tokens[windows + 1], trained[windows + 1])


def batch_of(rows: Rows, step: int, per_step: int, seed: int, device) -> Rows:
    """Step `step`'s rows: every epoch a fresh order (from the seed and the epoch), `per_step` rows a step."""
    total = len(rows.inputs)
    steps_per_epoch = -(-total // per_step)
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    chosen = order[index * per_step:(index + 1) * per_step]
    return Rows(*(t[chosen].to(device) for t in rows))


# -- the training forward and backward ----------------------------------------------------------------

class ExpertPairs(torch.autograd.Function):
    """A MoE layer's (token, choice) pairs through their experts, x (T, hidden) -> (T * top_k, hidden), with the
    experts' adapters as inputs. Backward streams the experts again and differentiates each where it stands."""

    @staticmethod
    def forward(ctx, x, residual, trainer: "Trainer", index: int, ids, *params):
        if index in trainer.outputs:         # checkpoint's recompute: forward's outputs, nothing streamed
            picked = trainer.outputs.pop(index)
        else:
            picked = trainer.model.pair_outputs(index, ids, x, residual)
            trainer.outputs[index] = picked.detach()
            trainer.routing[index] = ids
        ctx.trainer, ctx.index = trainer, index
        ctx.save_for_backward(x, residual, ids, *params)
        return picked

    @staticmethod
    def backward(ctx, grad):
        x, residual, ids, *params = ctx.saved_tensors
        top_k = ids.shape[-1]
        x_pairs = x.detach().repeat_interleave(top_k, dim=0)       # pair p: token p // top_k
        grad_pairs = torch.zeros_like(x_pairs)
        grads = [None] * len(params)
        provider, mlp = ctx.trainer.model.provider, ctx.trainer.model.expert_mlp
        for batch in one_slot_each(provider.experts(ctx.index, ids, residual, x)):
            with torch.enable_grad():
                rows = x_pairs.detach().requires_grad_()
                out = expert_outputs(provider.expert_format, batch, rows, 1, mlp)
                wanted = [rows] + [p for p in params if p.requires_grad]
                found = iter(torch.autograd.grad(out, wanted, grad if batch.pairs is None else grad[batch.pairs],
                                                 allow_unused=True))
            grad_pairs += next(found)
            grads = [_add(g, next(found)) if p.requires_grad else None for g, p in zip(grads, params)]
        grad_x = grad_pairs.view(-1, top_k, x.shape[-1]).sum(dim=1)
        return (grad_x, None, None, None, None, *grads)


def one_slot_each(batches: Iterable[ExpertBatch]) -> Iterator[ExpertBatch]:
    """The batches, each over several slots (a layer whose experts all fit its slots) as one batch per slot, as the
    experts come when they stream through fewer slots: backward then holds one expert's activations at a time, not
    every expert's of the layer. The same bits: each pair's gradient comes from its own expert either way. A batch
    whose slots only the device knows (resident experts) stays whole."""
    for batch in batches:
        if batch.pairs is not None or batch.host_slots is None or len(set(batch.host_slots)) == 1:
            yield batch
            continue
        pairs_of: dict[int, list[int]] = {}
        for pair, slot in enumerate(batch.host_slots):
            pairs_of.setdefault(slot, []).append(pair)
        for slot, pairs in sorted(pairs_of.items()):
            yield batch._replace(slots=None, host_slots=[slot] * len(pairs),
                                 pairs=torch.tensor(pairs, device=batch.memory.device))


def _add(total, part):
    return part if total is None else (total if part is None else total + part)


def _targets(rows: Rows) -> torch.Tensor:
    """The count of masked targets (at least 1, so that a batch without any has loss 0), on the device: no sync."""
    return rows.mask.sum().clamp(min=1)


class RecordedRouting:
    """Backward's predictor: the MoE layer below this one will need exactly the experts forward recorded there."""

    def __init__(self, routing: dict[int, torch.Tensor], moe_layers: list[int]):
        self.routing = routing
        self.below = dict(zip(moe_layers[1:], moe_layers[:-1]))

    def predict(self, layer: int, residual: torch.Tensor) -> dict[int, torch.Tensor]:
        target = self.below.get(layer)
        return {} if target is None else {target: torch.unique(self.routing[target])}


class Trainer:
    """One model with adapters and AdamW on them; `step` is one optimizer step over a batch of rows, in forward and
    backward passes of `micro_rows` rows (None: all at once)."""

    def __init__(self, base: Transformer, adapters: Adapters, lr: float = FinetuneConfig.lr,
                 weight_decay: float = FinetuneConfig.weight_decay, micro_rows: int | None = None):
        if getattr(base.provider, "cpu", None) is not None:
            raise UserError("finetune: experts computed on the CPU have no gradients; load the model with "
                            "Engine.load(..., training=True) (no --cpu-moe-layers, --cpu-experts off)")
        self.config = base.config
        self.provider = base.provider    # the base provider: its predictor is swapped for backward
        self.adapters = adapters
        self.model = Transformer(base.config, adapters.attach(base.weights), LoraExperts(base.provider, adapters),
                                 router=base.router, pairs=self._pairs)
        self.optimizer = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=weight_decay)
        self.micro_rows = micro_rows
        self.outputs: dict[int, torch.Tensor] = {}    # MoE layer -> forward's expert outputs, until the recompute
        self.routing: dict[int, torch.Tensor] = {}    # MoE layer -> forward's expert ids, until its backward ends

    def _pairs(self, index, ids, x, residual):
        if not torch.is_grad_enabled():
            return self.model.pair_outputs(index, ids, x, residual)
        return ExpertPairs.apply(x, residual, self, index, ids, *self.adapters.layer_parameters(index, ("gate_up", "down")))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (rows, T) -> fp32 logits (rows, T, vocab), each decoder layer checkpointed."""
        cfg = self.config
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        rope = rotary(positions, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        mask = Transformer._attention_mask(positions, tokens.shape[1], cfg.sliding_window)
        h = self.model.weights.embed[tokens]
        for index in range(cfg.num_layers):
            h = checkpoint(self._layer, index, h, rope, positions, mask, use_reentrant=False)
        return self.model.head(h)

    def _layer(self, index: int, h: torch.Tensor, rope, positions, mask) -> torch.Tensor:
        """One decoder layer; the attention backends are chosen here, so that backward's recomputation (outside
        `logits`) runs the same kernels and saves the same tensors as the forward did."""
        cache = self._scratch_cache(index, h.shape[0], h.shape[1], h.device, h.dtype, rope)
        with sdpa_kernel(ATTENTION_BACKENDS):
            return self.model.layer(index, h, cache, 0, positions, None, rope, mask)

    def _scratch_cache(self, index, batch, length, device, dtype, rope) -> KVCache:
        """This layer's keys and values for one forward (a fresh tensor each time: recomputed, not overwritten)."""
        cfg = self.config
        keys, values = [None] * cfg.num_layers, [None] * cfg.num_layers
        keys[index] = torch.zeros(batch, cfg.num_kv_heads, length, cfg.head_dim, device=device, dtype=dtype)
        values[index] = torch.zeros_like(keys[index])
        return KVCache(keys, values, rope)

    def loss(self, rows: Rows) -> torch.Tensor:
        """Mean cross-entropy over the masked targets."""
        return self._summed_loss(rows) / _targets(rows)

    def _summed_loss(self, rows: Rows) -> torch.Tensor:
        logits = self.logits(rows.inputs)
        return F.cross_entropy(logits[rows.mask], rows.targets[rows.mask], reduction="sum")

    def gradients(self, rows: Rows) -> float:
        """Forward and backward of one step's rows, `micro_rows` at a time: the adapters' .grad set (zeroed first) to
        the gradients of the step's mean loss; -> that loss. Each micro-batch's summed loss is divided by the whole
        step's count of targets, so the micro-batches' gradients add up to the one pass's: only memory changes."""
        self.optimizer.zero_grad(set_to_none=True)
        targets = _targets(rows)
        return sum(self._backward(micro, targets) for micro in self._micro_batches(rows)).item()

    def _micro_batches(self, rows: Rows) -> list[Rows]:
        """The rows in runs of `micro_rows` (the last may be shorter), each a forward and backward."""
        return [Rows(*parts) for parts in zip(*(t.split(self.micro_rows or len(rows.inputs)) for t in rows))]

    def _backward(self, rows: Rows, targets: torch.Tensor) -> torch.Tensor:
        """One forward and backward, its gradients added into .grad; -> its summed loss / targets, detached. The
        recorded expert outputs and routing are this forward's own: its recompute replays them, its backward
        prefetches by them."""
        self.outputs.clear()
        loss = self._summed_loss(rows) / targets
        with self._backward_prefetch():
            loss.backward()
        self.routing.clear()
        return loss.detach()

    def step(self, rows: Rows) -> float:
        """One optimizer step over the rows (see `gradients`); -> the step's loss."""
        loss = self.gradients(rows)
        self.optimizer.step()
        return loss

    @torch.no_grad()
    def evaluate(self, rows: Rows) -> float:
        return self.loss(rows).item()

    @contextmanager
    def _backward_prefetch(self):
        """An offloaded provider's predictor, while backward runs: the recorded routing of the layer below."""
        provider = self.provider
        if not hasattr(provider, "predictor"):
            yield
            return
        forward = provider.predictor
        provider.predictor = RecordedRouting(self.routing, list(self.config.moe_layers))
        try:
            yield
        finally:
            provider.predictor = forward


# -- the command's loop -----------------------------------------------------------------------------

def training_bytes(config: ModelConfig, lora: LoraConfig, settings: FinetuneConfig, dtype: torch.dtype) -> int:
    """Device memory a step needs beyond the weights, generously: the adapters with their gradients and AdamW's two
    moments (fp32), and for one micro-batch's rows (a forward and backward): each layer's input (the checkpoints)
    and each MoE layer's recorded expert outputs, one layer's activations and their gradients (its recompute and
    backward), and the fp32 logits, their softmax and gradient."""
    c, itemsize = config, dtype.itemsize
    tokens = settings.micro_rows * settings.seq_len
    adapters = sum(lora.rank * experts * (rows + cols) * (len(c.moe_layers) if target in ("router", "gate_up", "down")
                                                           else c.num_layers)
                   for target, (rows, cols, experts) in shapes(config, lora).items())
    checkpoints = tokens * c.hidden_size * itemsize * (c.num_layers + len(c.moe_layers) * c.top_k)
    layer = 2 * (workspace_bytes(config, tokens, settings.seq_len, itemsize) - WORKSPACE_MARGIN)   # inference's has it once
    return 16 * adapters + checkpoints + layer + 3 * tokens * c.vocab_size * 4


def finetune(engine, lora: LoraConfig, settings: FinetuneConfig, examples: list[Example], progress: bool = True) -> dict:
    """Train adapters on the examples, saving PEFT files and a resumable state into settings.out every
    save_every steps and at the end. -> a summary (steps, last loss, tokens/s, seconds)."""
    pad_id = engine.tokenizer.eos_ids[0] if engine.tokenizer.eos_ids else 0
    rows = pack(examples, settings.seq_len, pad_id)
    steps_per_epoch = -(-len(rows.inputs) // settings.rows)
    total = settings.steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    device = engine.model.weights.embed.device
    adapters = Adapters.create(engine.config, lora, device, settings.seed)
    trainer = Trainer(engine.model, adapters, settings.lr, settings.weight_decay, settings.micro_rows)
    first = _resume(settings, lora, total, trainer)
    loss, started, tokens = float("nan"), time.perf_counter(), 0
    with tqdm(total=total, initial=first, desc="finetune", unit="step", file=sys.stderr,
              disable=not progress or None) as bar:
        for step in range(first, total):
            batch = batch_of(rows, step, settings.rows, settings.seed, device)
            loss = trainer.step(batch)
            tokens += batch.inputs.numel()
            rate = tokens / (time.perf_counter() - started)
            bar.set_postfix_str(f"loss {loss:.4f}, {rate:.0f} tokens/s")
            bar.update(1)
            if (step + 1) % settings.save_every == 0 or step + 1 == total:
                _save(settings, lora, total, trainer, step + 1)
    seconds = time.perf_counter() - started
    return {"steps": total, "resumed_at": first, "loss": loss, "seconds": seconds,
            "tokens_per_second": tokens / seconds if tokens else 0.0}


def _identity(settings: FinetuneConfig, lora: LoraConfig, total: int) -> dict:
    """What a resumed run must share with the one that saved the state. Not micro_batch_tokens: it changes the
    memory a step takes, not its gradients (but for rounding), so a resumed run may choose another."""
    return {"lora": asdict(lora) | {"targets": list(lora.targets)}, "data": str(settings.data), "chat": settings.chat,
            "seq_len": settings.seq_len, "batch_tokens": settings.batch_tokens, "seed": settings.seed, "steps": total}


def _resume(settings: FinetuneConfig, lora: LoraConfig, total: int, trainer: Trainer) -> int:
    """The step to start at: 0, or where the state in settings.out left off (adapters and optimizer restored)."""
    path = Path(settings.out) / STATE_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location=trainer.model.weights.embed.device)
    if state["identity"] != _identity(settings, lora, total):
        saved = ", ".join(f"{k}={v}" for k, v in state["identity"].items())
        raise UserError(f"--out {settings.out} holds another fine-tune ({saved}); resume it with the same "
                        f"settings or choose another --out")
    with torch.no_grad():
        for (key, pair), saved in zip(trainer.adapters.pairs.items(), state["adapters"]):
            for tensor, value in zip(pair, saved):
                tensor.copy_(value)
    trainer.optimizer.load_state_dict(state["optimizer"])
    print(f"resuming {settings.out} at step {state['step']} of {total}", file=sys.stderr)
    return state["step"]


def _save(settings: FinetuneConfig, lora: LoraConfig, total: int, trainer: Trainer, step: int) -> None:
    out = Path(settings.out)
    trainer.adapters.save(out, trainer.config)
    state = {"identity": _identity(settings, lora, total), "step": step,
             "adapters": [[t.detach() for t in pair] for pair in trainer.adapters.pairs.values()],
             "optimizer": trainer.optimizer.state_dict()}
    partial = out / (STATE_FILE + ".partial")
    torch.save(state, partial)
    partial.replace(out / STATE_FILE)
