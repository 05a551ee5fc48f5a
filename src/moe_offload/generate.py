"""Prefill, then decode through the KV cache: one generation, or a batch of them joining and leaving.

    for token_id in generate(model, cache, prompt_ids, params, eos_ids, step=DecodeStep(model, cache)):
        ...
    batch = Batch(model, cache, step)               # several generations at once (continuous batching)

Decoding runs step.py's DecodeStep (CUDA graphs where it can). Greedy decoding without penalties picks the
next token on the device (under a grammar too: its mask goes there, masked_greedy); other sampling (and
penalized greedy) runs on the CPU in fp32 from a seeded generator, so a seed gives the same tokens on any
device. Stop strings are text, not ids: the engine
handles them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import SamplingParams
from .constrain import Constraint, bitmask_words, unpack_bitmask
from .model import KVCache, Transformer
from .step import DecodeStep

PREFILL_CHUNK = 2048  # prompt tokens per forward: each expert crosses the link at most once per forward; bounds activations
INTERLEAVED_PREFILL_CHUNK = 512   # prompt tokens a step while other generations decode: bounds their wait


def prefill(model: Transformer, cache: KVCache, prompt_ids: list[int], device, last_only: bool = True) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns logits (1, vocab) of its last token,
    or (T, vocab) for every position when `last_only` is False."""
    pieces = []
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        chunk = torch.tensor([prompt_ids[start:start + PREFILL_CHUNK]], device=device)
        is_last = start + PREFILL_CHUNK >= len(prompt_ids)
        logits = model(chunk, cache, start_pos=start, last_only=last_only)
        if not last_only:
            pieces.append(logits[0])
        elif is_last:
            return logits[0]
    return torch.cat(pieces)


@dataclass(eq=False)
class Generation:
    """One sequence being decoded in a Batch: its prompt and sampling, its KV cache row, its progress."""

    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...]
    row: int                               # its KV cache row
    generator: torch.Generator | None      # seeded host sampling; None: greedy, or the process's generator
    watch: Callable[[torch.Tensor], None] | None = None   # sees each distribution before a token is picked from it
    constraint: Constraint | None = None   # its grammar's place (constrain.py): tokens are picked among those allowed
    output_ids: list[int] = field(default_factory=list)   # new tokens so far
    prompt_logits: list[torch.Tensor] = field(default_factory=list)   # every position's, when prompt logprobs are asked
    prefilled: int = 0                     # prompt tokens through the model so far
    done: bool = False

    @property
    def produced(self) -> int:
        return len(self.output_ids)

    def pick(self, logits: torch.Tensor) -> int:
        """A token from logits (vocab,) on the host: sample() with the generation's penalties and grammar."""
        allowed = self.constraint.allowed() if self.constraint is not None else None
        return sample(logits, self.params, self.generator, self.prompt_ids, self.output_ids, allowed)


class Batch:
    """Continuous batching on one model and KV cache: generations join (a free cache row, their prompt prefilled a
    chunk a step) and leave (done or cancelled) between steps; a step decodes one token of every running one.

        batch = Batch(model, cache, step)                # cache rows: the most generations at once
        generation = batch.add(prompt_ids, params, eos_ids)
        for generation, token in batch.step(): ...      # the new tokens of this step, one per generation at most
        batch.cancel(generation)                          # leave now (its cache row is free again)

    A prompt is prefilled PREFILL_CHUNK tokens a step when nothing else runs, `interleaved_chunk` while others
    decode, so that a long prompt arriving delays their next tokens by one chunk's forward, not the whole prompt.
    """

    def __init__(self, model: Transformer, cache: KVCache, step: DecodeStep | None = None,
                 interleaved_chunk: int = INTERLEAVED_PREFILL_CHUNK):
        self.model, self.cache = model, cache
        self.decode_step = step or DecodeStep(model, cache)
        self.interleaved_chunk = interleaved_chunk
        self.free_rows = list(range(cache.keys[0].shape[0] - 1, -1, -1))     # pop() gives row 0 first
        self.prefilling: deque[Generation] = deque()
        self.running: list[Generation] = []       # running[i] is the DecodeStep's sequence i
        self.bitmasks: torch.Tensor | None = None  # grammar masks of a step's greedy choices (_greedy_bitmasks)

    @property
    def busy(self) -> bool:
        return bool(self.prefilling or self.running)

    @property
    def full(self) -> bool:
        return not self.free_rows

    def add(self, prompt_ids: list[int], params: SamplingParams, eos_ids: tuple[int, ...] = (),
            watch: Callable[[torch.Tensor], None] | None = None, constraint: Constraint | None = None) -> Generation:
        """`watch(logits)`, when given, sees each distribution before a token is picked from it: the prompt's last
        position (1, vocab), or every position (T, vocab) when `params.prompt_logprobs` is set; then (vocab,) a
        step (a buffer the next step overwrites; reading it costs greedy decoding a sync). `constraint`
        (params.grammar's): each token is picked among those it allows, then accepted."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not self.free_rows:
            raise RuntimeError(f"the batch is full: {self.cache.keys[0].shape[0]} sequences already")
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        generation = Generation(list(prompt_ids), params, eos_ids, self.free_rows.pop(), generator, watch, constraint)
        self.prefilling.append(generation)
        return generation

    def cancel(self, generation: Generation) -> None:
        """`generation` leaves the batch now (a no-op once it has left)."""
        generation.done = True
        self._leave(generation)

    def step(self) -> list[tuple[Generation, int]]:
        """One token of every running generation, then one chunk of the first prompt still prefilling (whose first
        token, when its prompt is done, comes with this step; it decodes from the next)."""
        tokens = []
        if self.running:
            self._decode(tokens)
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0], tokens)
        return tokens

    def _prefill_chunk(self, generation: Generation, tokens: list) -> None:
        chunk = PREFILL_CHUNK if not self.running else self.interleaved_chunk
        start = generation.prefilled
        ids = generation.prompt_ids[start:start + chunk]
        device = self.cache.keys[0].device
        every_position = generation.params.prompt_logprobs is not None
        logits = self.model(torch.tensor([ids], device=device), self.cache.row(generation.row), start_pos=start,
                            last_only=not every_position)[0]
        generation.prefilled += len(ids)
        if every_position:
            generation.prompt_logits.append(logits)
        if generation.prefilled < len(generation.prompt_ids):
            return
        self.prefilling.popleft()
        if every_position:
            logits, generation.prompt_logits = torch.cat(generation.prompt_logits), []
        if generation.watch:
            generation.watch(logits)
        if generation.params.max_new_tokens == 0:       # the prompt scored, nothing more
            generation.done = True
            self.free_rows.append(generation.row)
            return
        token = generation.pick(logits[-1])
        if self._take(generation, token, tokens):
            self.decode_step.set(len(self.running), token, len(generation.prompt_ids), generation.row)
            self.running.append(generation)
        else:
            self.free_rows.append(generation.row)

    def _decode(self, tokens: list) -> None:
        count = len(self.running)
        logits = self.decode_step(count)
        bitmasks = self._greedy_bitmasks(count)
        if bitmasks is not None:
            self.decode_step.choose(masked_greedy(logits, bitmasks))
        greedy = self.decode_step.next_tokens(count)         # one read for every greedy choice
        picked = []
        for index, generation in enumerate(self.running):
            if generation.watch:
                generation.watch(logits[index])
            token = greedy[index]
            if generation.params.picks_on_host:
                token = generation.pick(logits[index])
                self.decode_step.set(index, token)
            picked.append((generation, token))
        for generation, token in picked:     # then leave: leaving moves the last sequence into the leaver's place
            if not self._take(generation, token, tokens):
                self._leave(generation)

    def _greedy_bitmasks(self, count: int) -> torch.Tensor | None:
        """int32 (count, words) on the host: the grammar masks of the running generations picked greedily on the
        device, all ones for the others; None when no such generation has a grammar. One pinned buffer, reused:
        its upload has ended by the time the step's tokens are read, before the next step refills it."""
        constrained = [(index, generation.constraint) for index, generation in enumerate(self.running)
                       if generation.constraint is not None and not generation.params.picks_on_host]
        if not constrained:
            return None
        if self.bitmasks is None:
            words = bitmask_words(constrained[0][1].vocab_size)
            pinned = self.cache.keys[0].device.type == "cuda"
            self.bitmasks = torch.empty(self.cache.keys[0].shape[0], words, dtype=torch.int32, pin_memory=pinned)
        bitmasks = self.bitmasks[:count]
        bitmasks.fill_(-1)
        for index, constraint in constrained:
            constraint.fill(bitmasks[index])
        return bitmasks

    def _take(self, generation: Generation, token: int, tokens: list) -> bool:
        """Record the generation's new token; -> whether it goes on (not EOS, room for more)."""
        if token in generation.eos_ids:
            generation.done = True
            return False
        generation.output_ids.append(token)
        if generation.constraint is not None:
            generation.constraint.accept(token)
        tokens.append((generation, token))
        position = len(generation.prompt_ids) + generation.produced
        generation.done = generation.produced == generation.params.max_new_tokens or position >= self.cache.max_len
        return not generation.done

    def _leave(self, generation: Generation) -> None:
        if generation in self.prefilling:
            self.prefilling.remove(generation)
        elif generation in self.running:
            index, last = self.running.index(generation), len(self.running) - 1
            if index != last:                       # keep the running ones first in the step's tables
                self.decode_step.move(last, index)
                self.running[index] = self.running[last]
            self.running.pop()
        else:
            return
        self.free_rows.append(generation.row)


def generate(model: Transformer, cache: KVCache, prompt_ids: list[int], params: SamplingParams,
             eos_ids: tuple[int, ...] = (), step: DecodeStep | None = None,
             watch: Callable[[torch.Tensor], None] | None = None, constraint: Constraint | None = None) -> Iterator[int]:
    """Yield new token ids until EOS (not yielded), `params.max_new_tokens`, or prompt plus new tokens fill the
    cache: one generation on a batch of its own (`watch`, `constraint`: Batch.add's). `step`: the model's decode
    step, reused across generations (a fresh one runs eagerly for its first token and captures its graphs on the
    second)."""
    batch = Batch(model, cache, step)
    generation = batch.add(prompt_ids, params, eos_ids, watch, constraint)
    try:
        while not generation.done:
            for _, token in batch.step():
                yield token
    finally:
        batch.cancel(generation)


def masked_greedy(logits: torch.Tensor, bitmasks: torch.Tensor) -> torch.Tensor:
    """The likeliest token of each row of logits (rows, vocab) among those its bitmask allows (int32 (rows, words)
    on the host; uploaded without waiting), computed on the logits' device: sample()'s greedy pick under a
    grammar, without reading the logits back."""
    allowed = unpack_bitmask(bitmasks.to(logits.device, non_blocking=True), logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf")).argmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           prompt_ids: list[int] = (), output_ids: list[int] = (), allowed: torch.Tensor | None = None) -> int:
    """logits (vocab,) -> one token id: only `allowed` ones (bool (vocab,), a grammar's), the penalties
    (`prompt_ids` and `output_ids`: the tokens so far), then greedy, or temperature, top-k, top-p and
    min-p (warp) and a draw from `generator`."""
    logits = logits.float().cpu()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logits = penalize(logits, params, prompt_ids, output_ids)
    if params.temperature == 0:
        return int(logits.argmax())
    warped = warp(logits, params)
    if warped is None:
        return int(logits.argmax())
    return int(torch.multinomial(warped.softmax(-1), 1, generator=generator))


def penalize(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """logits (vocab,) fp32 with the repetition penalty on every token of the prompt and the output (as
    transformers and vLLM), then the presence and frequency penalties on the output's tokens (as vLLM)."""
    if not params.penalized:
        return logits
    logits = logits.clone()
    if params.repetition_penalty != 1:
        seen = torch.tensor([*prompt_ids, *output_ids], dtype=torch.int64).unique()
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64), minlength=logits.numel())[:logits.numel()]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Temperature, then top-k, top-p and min-p, as transformers orders them: logits (vocab,) fp32 with the
    dropped tokens at -inf; None for a temperature so small (< ~1e-37) that fp32 overflows (greedy is its limit)."""
    logits = logits / params.temperature
    if not torch.isfinite(logits.max()):
        return None
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest set reaching top_p
        drop[0] = False   # the likeliest token always stays, even for a top_p that is 0 in fp32 (5e-324)
        logits[order[drop]] = float("-inf")
    if params.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits
