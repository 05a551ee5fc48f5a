"""The request queue and the worker thread that runs generations on the Engine.

    scheduler = Scheduler(engine, metrics, max_waiting=64)
    scheduler.start()
    sequence = Sequence(prompt_ids, params, asyncio.get_running_loop())
    scheduler.submit(sequence)              # raises QueueFull: answer 429; several: one request's choices
    async for piece in sequence.pieces():   # text pieces; ends at Finished, raises at Failed
        ...
    scheduler.cancel(sequence)              # client gone: leaves the queue, or the batch at the next step
                                            # (also during its prompt's prefill, between chunks)

Requests wait in arrival order in a bounded queue (`max_waiting`). One worker thread owns the
Engine: between steps it admits waiting sequences while the engine's batch has room (the KV cache's
rows, `--max-batch`), then calls `step()`: one step of the engine's batch (a chunk of a newcomer's
prompt, then one token of every running sequence: generate.Batch), whose tokens become each
sequence's text pieces, handed to its asyncio queue (thread-safely, through its event loop). A
sequence that ends, fails or is cancelled leaves the batch at once, between steps (a cancelled
prompt stops between its prefill chunks).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import SamplingParams
from ..engine import Engine, Run, RunStats
from ..generate import Generation
from .metrics import Metrics

log = logging.getLogger("moe_offload.server")


class QueueFull(Exception):
    """The waiting queue is at capacity: answer 429 with Retry-After."""


@dataclass
class Finished:
    run: Run


@dataclass
class Failed:
    error: Exception     # a UserError is the client's mistake (400); anything else is ours (500)


CANCELLED = object()     # put by the request handler itself when its client disconnects


class Sequence:
    """One request's generation, as seen from both sides: the worker thread and the event loop."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.events: asyncio.Queue = asyncio.Queue()   # str pieces, then Finished | Failed | CANCELLED
        self.arrived = time.perf_counter()
        self.admitted: float | None = None
        self.last_token_at: float | None = None
        self.run: Run | None = None
        self.cancelled = threading.Event()
        self.finished = False    # set when the Finished event has been read: the run ended normally
        self._loop = loop

    def deliver(self, event) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the event loop has closed: the server is shutting down
            pass

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they come; returns at the end (then `self.run` holds ids and stats) or on cancel."""
        while True:
            event = await self.events.get()
            if isinstance(event, str):
                yield event
            elif isinstance(event, Failed):
                raise event.error
            else:
                self.finished = isinstance(event, Finished)
                return


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self._waiting: deque[list[Sequence]] = deque()    # requests, each its choices not yet admitted
        self._active: dict[Generation, Sequence] = {}    # by their place in the engine's batch
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="moe-offload-scheduler", daemon=True)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._changed:
            self._stopping = True
            for request in self._waiting:
                for sequence in request:
                    sequence.cancelled.set()
            self._changed.notify_all()
        self._thread.join(timeout)

    def submit(self, *sequences: Sequence) -> None:
        """Queue `sequences` (one request's choices) at the back, side by side; refused only when the queue is full
        before them, so that a request of several choices takes one place in it."""
        with self._changed:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit, --max-queue)")
            self._waiting.append(list(sequences))
            self._changed.notify()

    def cancel(self, sequence: Sequence) -> None:
        """From the event loop: a waiting sequence leaves the queue now; an active one at the next step."""
        sequence.cancelled.set()
        with self._changed:
            request = next((request for request in self._waiting if sequence in request), None)
            if request is not None:
                request.remove(sequence)
                if not request:
                    self._waiting.remove(request)
                self.metrics.record_sequence(0, 0, None, 0.0, outcome="cancelled")

    def step(self) -> None:
        """One step of the engine's batch: every active sequence gets its next text piece, or ends."""
        for sequence in [s for s in self._active.values() if s.cancelled.is_set()]:
            self._end(sequence, CANCELLED, "cancelled")
        if not self._active:
            return
        started = time.perf_counter()
        try:
            tokens = self.engine.batch.step()
        except Exception as e:      # a failed forward fails every sequence in it
            log.exception("generation failed")
            for sequence in list(self._active.values()):
                self._end(sequence, Failed(e), "failed")
            return
        now = time.perf_counter()
        gaps = [now - self._active[g].last_token_at for g, _ in tokens if self._active[g].last_token_at is not None]
        self.metrics.record_step(len(self._active), len(tokens), now - started, gaps)
        for generation, token in tokens:
            sequence = self._active[generation]
            sequence.last_token_at = now
            text, stopped = sequence.run.take(token)
            if text:
                sequence.deliver(text)
            if stopped:
                self._end(sequence, Finished(sequence.run), "finished")
        for sequence in [s for s in self._active.values() if s.run.generation.done]:
            text = sequence.run.finish()
            if text:
                sequence.deliver(text)
            self._end(sequence, Finished(sequence.run), "finished")

    def _work(self) -> None:
        while self._admit():
            self.step()
        for sequence in list(self._active.values()):
            self._end(sequence, CANCELLED, "cancelled")

    def _admit(self) -> bool:
        """Move waiting sequences into the engine's batch while it has room; blocks while there is nothing to do."""
        with self._changed:
            while not self._active and not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return False
            admitted = []
            while self._waiting and len(self._active) + len(admitted) < self.engine.max_batch:
                admitted.append(self._waiting[0].pop(0))
                if not self._waiting[0]:
                    self._waiting.popleft()
        for sequence in admitted:
            sequence.admitted = time.perf_counter()
            try:
                sequence.run = self.engine.start(sequence.prompt_ids, sequence.params)
            except Exception as e:
                self._report(sequence, Failed(e), "failed")
                continue
            with self._changed:
                self._active[sequence.run.generation] = sequence
        return True

    def _end(self, sequence: Sequence, event, outcome: str) -> None:
        run = sequence.run
        if run is not None:
            self.engine.batch.cancel(run.generation)    # leaves the batch (a no-op once done)
            with self._changed:
                self._active.pop(run.generation, None)
        self._report(sequence, event, outcome)

    def _report(self, sequence: Sequence, event, outcome: str) -> None:
        run = sequence.run
        stats = run.stats if run is not None else RunStats()
        ttft = sequence.admitted - sequence.arrived + stats.time_to_first_token if stats.new_tokens else None
        self.metrics.record_sequence(stats.prompt_tokens, stats.new_tokens, ttft, stats.decode_seconds, outcome)
        sequence.deliver(event)
