"""The request queue and the worker thread that runs generations on the Engine.

    scheduler = Scheduler(engine, metrics, max_waiting=64)
    scheduler.start()
    sequence = Sequence(prompt_ids, params, asyncio.get_running_loop())
    scheduler.submit(sequence)              # raises QueueFull: answer 429
    async for piece in sequence.pieces():   # text pieces; ends at Finished, raises at Failed
        ...
    scheduler.cancel(sequence)              # client gone: leaves the queue, or stops at the next step
                                            # (or the next chunk of its prompt's prefill)

Requests wait in arrival order in a bounded queue (`max_waiting`). One worker thread owns the
Engine: it admits waiting sequences while fewer than `max_active` are active, then calls `step()`,
which produces the next text piece of every active sequence and hands it to that sequence's
asyncio queue (thread-safely, through its event loop). A sequence that ends, fails or is cancelled
leaves at once; its Run's generator is closed in the worker thread, the one that iterates it.

The Engine owns one KV cache, so today `max_active` is 1 and a step advances one Run. Batching
several sequences per step slots in here and nowhere else: with an engine that steps a batch of
runs (one forward for all active sequences), `max_active` becomes the batch size and `step()`
makes one batched call instead of a loop of `next(run)`. Sequence, submit, cancel and pieces, and
so the HTTP API, stay as they are.
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
    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int, max_active: int = 1):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.max_active = max_active
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
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
            for sequence in self._waiting:
                sequence.cancelled.set()
            self._changed.notify_all()
        self._thread.join(timeout)

    def submit(self, sequence: Sequence, follow_up: bool = False) -> None:
        """Queue `sequence` at the back; `follow_up`: a later choice of a request already admitted, never refused."""
        with self._changed:
            if len(self._waiting) >= self.max_waiting and not follow_up:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit, --max-queue)")
            self._waiting.append(sequence)
            self._changed.notify()

    def cancel(self, sequence: Sequence) -> None:
        """From the event loop: a waiting sequence leaves the queue now; an active one at the next step."""
        sequence.cancelled.set()
        with self._changed:
            if sequence in self._waiting:
                self._waiting.remove(sequence)
                self.metrics.record_sequence(0, 0, None, 0.0, outcome="cancelled")

    def step(self) -> None:
        """Produce the next text piece of every active sequence (the unit a batched engine would fuse)."""
        for sequence in list(self._active):
            self._advance(sequence)

    def _work(self) -> None:
        while self._admit():
            self.step()
        for sequence in list(self._active):
            self._end(sequence, CANCELLED, "cancelled")

    def _admit(self) -> bool:
        """Move waiting sequences into free active places; blocks while there is nothing to do."""
        with self._changed:
            while not self._active and not self._waiting and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return False
            admitted = []
            while self._waiting and len(self._active) < self.max_active:
                admitted.append(self._waiting.popleft())
                self._active.append(admitted[-1])
        for sequence in admitted:
            sequence.admitted = time.perf_counter()
            try:
                sequence.run = self.engine.stream(sequence.prompt_ids, sequence.params, sequence.cancelled.is_set)
            except Exception as e:
                self._end(sequence, Failed(e), "failed")
        return True

    def _advance(self, sequence: Sequence) -> None:
        if sequence.cancelled.is_set():
            self._end(sequence, CANCELLED, "cancelled")
            return
        try:
            piece = next(sequence.run.pieces)
        except StopIteration:
            if sequence.cancelled.is_set():   # cancelled during its prefill, which stopped between chunks
                self._end(sequence, CANCELLED, "cancelled")
            else:
                self._end(sequence, Finished(sequence.run), "finished")
        except Exception as e:
            log.exception("generation failed")
            self._end(sequence, Failed(e), "failed")
        else:
            sequence.deliver(piece)

    def _end(self, sequence: Sequence, event, outcome: str) -> None:
        run = sequence.run
        if run is not None:
            run.pieces.close()   # a generator must be closed by the thread that iterates it
        with self._changed:
            self._active.remove(sequence)
        stats = run.stats if run is not None else RunStats()
        ttft = sequence.admitted - sequence.arrived + stats.time_to_first_token if stats.new_tokens else None
        self.metrics.record_sequence(stats.prompt_tokens, stats.new_tokens, ttft, stats.decode_seconds, outcome)
        sequence.deliver(event)
