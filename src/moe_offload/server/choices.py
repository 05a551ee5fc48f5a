"""The choices of one request (prompts x n), decoded together through the Scheduler.

    jobs = [Job(index=0, prompt_ids=ids, params=params), Job(index=1, prompt_ids=ids, params=other_seed)]
    choices = Choices(scheduler, jobs, asyncio.get_running_loop())
    choices.start()                                  # raises QueueFull: answer 429
    async for job, sequence, piece in choices.events():
        ...                                          # piece: text; None when that choice has ended
    choices.cancel()                                 # client gone: every choice still running stops

A request takes one place in the queue: its choices are queued together, refused only when the queue is
full before them, and join the engine's batch side by side as it has rows, so that they decode in the
same steps. Their pieces come as they are made, the choices' interleaved. Choices are indexed as OpenAI
indexes them: prompt i, completion j of n -> i * n + j.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import SamplingParams
from .scheduler import CANCELLED, Scheduler, Sequence


@dataclass(frozen=True)
class Job:
    index: int              # the choice's index in the answer
    sample: int             # j: which of the prompt's n completions (0 counts the prompt's tokens in usage)
    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None   # completions' echo: the prompt's text, put before the completion
    tools: list[dict] | None = None   # chat's tools: the reply is parsed for calls of them (tools.py)


class Choices:
    def __init__(self, scheduler: Scheduler, jobs: list[Job], loop: asyncio.AbstractEventLoop):
        self.scheduler, self.jobs = scheduler, jobs
        self.sequences = [Sequence(job.prompt_ids, job.params, loop) for job in jobs]
        self.ended: list[tuple[Job, Sequence]] = []   # the choices that finished, in the order they did
        self.gone = False                             # cancelled: the client left

    def start(self) -> None:
        self.scheduler.submit(*self.sequences)

    async def events(self) -> AsyncIterator[tuple[Job, Sequence, str | None]]:
        """(job, its sequence, a text piece) as pieces come; (job, sequence, None) when the choice has ended.
        Stops early when cancelled; raises what a failed generation raised."""
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(job: Job, sequence: Sequence) -> None:
            try:
                async for piece in sequence.pieces():
                    merged.put_nowait((job, sequence, piece))
                merged.put_nowait((job, sequence, None))
            except Exception as e:
                merged.put_nowait((job, sequence, e))

        forwarders = [asyncio.create_task(forward(job, sequence)) for job, sequence in zip(self.jobs, self.sequences)]
        try:
            while len(self.ended) < len(self.jobs):
                job, sequence, piece = await merged.get()
                if isinstance(piece, Exception):
                    raise piece
                if piece is None and not sequence.finished:
                    self.gone = True
                    return
                if piece is None:
                    self.ended.append((job, sequence))
                yield job, sequence, piece
        finally:
            for forwarder in forwarders:
                forwarder.cancel()

    def cancel(self) -> None:
        """Stop every choice still running or waiting; a no-op once every choice has ended."""
        if len(self.ended) == len(self.jobs):
            return
        self.gone = True
        for sequence in self.sequences:
            if not sequence.finished:
                self.scheduler.cancel(sequence)
                sequence.events.put_nowait(CANCELLED)

    def usage(self) -> dict:
        prompt = sum(sequence.run.stats.prompt_tokens for job, sequence in self.ended if job.sample == 0)
        completion = sum(len(sequence.run.token_ids) for _, sequence in self.ended)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
