"""The choices of one request (prompts x n), generated one after another through the Scheduler.

    jobs = [Job(index=0, prompt_ids=ids, params=params), Job(index=1, prompt_ids=ids, params=other_seed)]
    choices = Choices(scheduler, jobs, asyncio.get_running_loop())
    choices.start()                                  # raises QueueFull: answer 429
    async for job, sequence, piece in choices.events():
        ...                                          # piece: text; None when that choice has ended
    choices.cancel()                                 # client gone: the running one stops, the rest never start

A request takes one place in the queue: its first choice waits there like any request, each later one
is submitted when the one before ends, past the queue's limit (an admitted request is never refused
half-way). Choices are indexed as OpenAI indexes them: prompt i, completion j of n -> i * n + j.
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
        self.scheduler, self.jobs, self.loop = scheduler, jobs, loop
        self.current: Sequence | None = None
        self.ended: list[tuple[Job, Sequence]] = []   # the choices that finished, in order
        self.gone = False                             # cancelled: the client left

    def start(self) -> None:
        self.current = Sequence(self.jobs[0].prompt_ids, self.jobs[0].params, self.loop)
        self.scheduler.submit(self.current)

    async def events(self) -> AsyncIterator[tuple[Job, Sequence, str | None]]:
        """(job, its sequence, a text piece) as pieces come; (job, sequence, None) when the choice has ended.
        Stops early when cancelled; raises what a failed generation raised."""
        for k, job in enumerate(self.jobs):
            if k:
                if self.gone:
                    return
                self.current = Sequence(job.prompt_ids, job.params, self.loop)
                self.scheduler.submit(self.current, follow_up=True)
            sequence = self.current
            async for piece in sequence.pieces():
                yield job, sequence, piece
            if not sequence.finished:
                self.gone = True
                return
            self.ended.append((job, sequence))
            yield job, sequence, None

    def cancel(self) -> None:
        """Stop the running choice and start no other; a no-op once every choice has ended."""
        if len(self.ended) == len(self.jobs):
            return
        self.gone = True
        if self.current is not None:
            self.scheduler.cancel(self.current)
            self.current.events.put_nowait(CANCELLED)

    def usage(self) -> dict:
        prompt = sum(sequence.run.stats.prompt_tokens for job, sequence in self.ended if job.sample == 0)
        completion = sum(len(sequence.run.token_ids) for _, sequence in self.ended)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
