"""OffloadedExperts: the ExpertProvider whose experts live on the host and stream into device slots.

    store = ExpertStore(config.moe_layers, config.num_experts, fmt.nbytes, pin=True)   # filled at load time
    provider = OffloadedExperts(store, fmt, slots={0: 2, 1: 2}, device="cuda", predictor=GatePredictor(...))
    model = Transformer(config, weights, provider)
    provider.summary()        # hit rate, prefetch recall/precision, bytes moved, times (see cache.py)

Each MoE layer owns a fixed number of slots: one device buffer (slots, stride) allocated here, once
(experts.ExpertSlots), so nothing is allocated while decoding. Which expert goes into which slot is
decided by `LayerCache` (cache.py, LRU); this file carries the decisions out, and is the one place
that knows about CUDA streams and events.

A step of a layer reads the host ONCE: the experts the router chose and the predictor's guesses for
later layers come back in one copy (`_stage`, then `_read`). Then:
- the missing experts are copied on a dedicated copy stream; each slot has a "ready" event (recorded
  after its copy) and a "free" event (recorded on the compute stream after the last computation
  that read it); a copy into a slot waits for "free", the computation waits for "ready";
- once the layer's own loads are issued, the guessed experts of later layers are copied into those
  layers' slots (never touching the current layer's, so nothing this step needs is evicted);
- when the step's experts fit in the layer's slots at once (decode: top-k experts), the experts run as one
  batch (the format's grouped kernels), each pair's slot looked up on the device in the layer's expert -> slot
  table (`SlotTable`: written from the host only when a slot the step reads changed, so a step of hits writes
  nothing); otherwise they stream through the slots one expert at a time, hits first.
- the host learns for free what the device has finished: every routing read waited for all the work queued
  before it. So a step of hits neither waits for copies the host saw finish nor marks its slots free with
  events: a copy into a slot waits for the slot's last reader only if no read since has shown it done.

Under CUDA graph capture (step.py) the same method only queues the device work and cuts the graph at
the read; the host's part runs between the replays of the pieces (`_settle`, `_release`).
On the CPU, the CPU stands in for the device: slots are CPU tensors and copies are plain copies.

With `cpu` (cpu_tier.py) some pairs run on the CPU from the store: every pair of a layer given 0 slots, and in
decode the misses its cost model sends there; the step's input comes back in the same read as its routing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from ..experts import ExpertBatch, ExpertFormat, ExpertSlots, slot_stride
from ..quant import cpu_kernels
from .cache import LayerCache, LayerStats, OffloadStats
from .cpu_tier import CpuExperts, RowBuffers
from .prefetch import ExpertPredictor
from .store import ExpertStore

PENDING_TIMINGS_LIMIT = 4096  # resolve finished timing events once this many are waiting


class RoutingError(RuntimeError):
    """A step's routing named an expert that does not exist: the router's logits were NaN (the fused route
    kernel then returns id num_experts), i.e. the layer's input was already broken."""


class OffloadedExperts:
    def __init__(self, store: ExpertStore, expert_format: ExpertFormat, slots: dict[int, int], device,
                 predictor: ExpertPredictor | None = None, measure_time: bool = False, cache_type=LayerCache,
                 cpu: CpuExperts | None = None):
        self.store = store
        self.expert_format = expert_format
        self.device = torch.device(device)
        self.predictor = predictor
        self.cpu = cpu
        self.cpu_layers = {layer for layer, n in slots.items() if n == 0}   # every pair of these runs on the CPU
        if self.cpu_layers and cpu is None:
            raise ValueError(f"layers {sorted(self.cpu_layers)} have no slots: they need the CPU tier (cpu=)")
        self.stats = OffloadStats({layer: LayerStats() for layer in slots})
        nbytes = expert_format.nbytes
        on_device = {layer: n for layer, n in slots.items() if n}
        self.caches = {layer: cache_type(n, nbytes, self.stats.layers[layer]) for layer, n in on_device.items()}
        self.slots = {layer: ExpertSlots(expert_format, n, slot_stride(nbytes), self.device) for layer, n in on_device.items()}
        self.tables = {layer: SlotTable(store.num_experts, self.device) for layer in on_device}
        keys = [(layer, slot) for layer, n in on_device.items() for slot in range(n)]
        if self.device.type == "cuda":
            self.copier = CudaCopier(self.device, keys, self.stats, measure_time)
        else:
            self.copier = HostCopier(self.stats, measure_time)
        order = {layer: i for i, layer in enumerate(slots)}
        self.distance = lambda layer, target: order[target] - order[layer]
        self.predictions: dict[int, dict[int, list[int]]] = {}   # target layer -> {lookahead: predicted ids}
        self.buffers: dict[int, ReadBuffers] = {}  # layer -> where its routing reads land and its slot tables lie
        self.large_inputs: dict = {}               # the CPU's buffers for steps of more than MAX_ROWS tokens, shared
        self.in_use: dict[int, list[int]] = {}     # layer -> slots its current step computes with
        self.graph = None                          # step.py's GraphCapture while a CUDA graph is being captured
        if cpu is not None and cpu.auto and cpu.costs is None and self.slots:
            layer = next(iter(self.slots))         # measure the link into a slot: nothing beyond the plan's memory
            cpu.calibrate(self.slots[layer].memory[0, :nbytes])
        if cpu is not None and cpu.costs is not None:
            cpu.costs.link_idle = self.copier.idle
            self.copier.observe = cpu.costs.observe_copy

    def holds_at_once(self, experts: int, tokens: int) -> bool:
        """Whether a step of `tokens` tokens that needs `experts` experts runs as one batch in every layer: the slots
        hold them all, or the CPU takes the misses that do not fit."""
        fits = all(cache.num_slots >= experts for cache in self.caches.values())
        return fits or (self.cpu is not None and self.cpu.takes(tokens))

    def slot_experts(self, layer: int) -> dict[int, int]:
        """Slot -> the expert it holds (or is being copied in), now (a layer without slots holds none)."""
        cache = self.caches.get(layer)
        return {} if cache is None else {slot: expert for expert, slot in cache.slot_of.items()}

    def experts(self, layer: int, ids: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> Iterator[ExpertBatch]:
        read = self._stage(layer, ids, residual, x)
        if self.graph is not None:        # capturing: the host's part runs between the replays, on this read
            self.graph.cut(lambda: self._settle(layer, read))
            yield self._batch(layer, read, None)
            self.graph.after_piece(lambda: self._release(layer))
            return
        pairs, needed, guesses = self._read(layer, read)
        on_cpu = self._split(layer, read, pairs, needed)
        if layer in self.cpu_layers or len(needed) - len(on_cpu) <= self.caches[layer].num_slots:
            host_slots = self._place(layer, read, pairs, needed, guesses, on_cpu)
            yield self._batch(layer, read, host_slots)
            self._release(layer)
        else:
            yield from self._streamed(layer, ids, pairs, needed, guesses)

    def summary(self) -> dict[str, float]:
        self.copier.collect_timings(wait=True)
        return self.stats.summary()

    # -- a layer's step ---------------------------------------------------------------------------

    def _stage(self, layer: int, ids: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> "RoutingRead":
        """Queue the layer's one read: the chosen ids and the guesses for later layers, into one host buffer, and
        the experts' input where the CPU may compute some of them."""
        guesses = self.predictor.predict(layer, residual) if self.predictor is not None else {}
        if layer not in self.buffers:
            self.buffers[layer] = ReadBuffers(self.device, self.large_inputs)
        cpu_may_run = layer in self.cpu_layers or (self.cpu is not None and self.cpu.takes(ids.shape[0]))
        return self.buffers[layer].stage(ids.flatten(), list(guesses.values()), list(guesses), x if cpu_may_run else None)

    def _batch(self, layer: int, read: "RoutingRead", host_slots: list[int] | None) -> ExpertBatch:
        """The step's one batch: the slots, each pair's slot (looked up on the device: under capture, in the piece
        after the host wrote the table), and the rows the CPU computed where it may have."""
        computed = None if read.x is None else read.out.computed(whole=layer in self.cpu_layers)
        if layer in self.cpu_layers:
            return ExpertBatch(None, None, None, None, computed=computed)
        slots = self.slots[layer]
        pair_slots = self.tables[layer].on_device.index_select(0, read.ids)
        return ExpertBatch(slots.memory, slots.experts, pair_slots, host_slots, computed=computed)

    def _split(self, layer: int, read: "RoutingRead", pairs: list[int], needed: list[int]) -> set[int]:
        """The experts of this step that the CPU computes: all of a layer without slots; in decode (its input came
        with the read), the misses that the cost model sends there and those the free slots cannot take."""
        if layer in self.cpu_layers:
            return set(needed)
        if read.x is None:
            return set()
        cache = self.caches[layer]
        hits = cache.hits(needed)
        misses = Counter(e for e in pairs if e not in hits)
        return self.cpu.costs.split(dict(misses), cache.num_slots - len(hits))

    def _read(self, layer: int, read: "RoutingRead") -> tuple[list[int], list[int], dict[int, list[int]]]:
        """The layer's one blocking wait: its routing on the host. -> each pair's expert, the distinct experts
        (sorted), and the guesses for later layers."""
        pairs, guesses = self.copier.read(read)
        needed = sorted(set(pairs))
        if needed and not 0 <= needed[0] <= needed[-1] < self.store.num_experts:     # ids already on the host: free
            bad = needed[0] if needed[0] < 0 else needed[-1]
            raise RoutingError(f"layer {layer}: the router chose expert id {bad}, outside 0..{self.store.num_experts - 1}: "
                               f"its logits are not finite (NaN or inf reached this layer's input)")
        for distance, predicted in self.predictions.pop(layer, {}).items():
            self.stats.layers[layer].record_prediction(distance, predicted, needed)
        return pairs, needed, guesses

    def _settle(self, layer: int, read: "RoutingRead") -> None:
        """The host's part of a captured step (its experts always fit: holds_at_once)."""
        pairs, needed, guesses = self._read(layer, read)
        self._place(layer, read, pairs, needed, guesses, self._split(layer, read, pairs, needed))

    def _place(self, layer: int, read: "RoutingRead", pairs: list[int], needed: list[int],
               guesses: dict[int, list[int]], on_cpu: set[int]) -> list[int] | None:
        """Experts that fit the layer's slots at once (those the CPU does not compute): start the CPU's, copy the
        misses, start the prefetches, write each pair's slot into the layer's table on the device (after which the
        compute stream waits for the copies), bring the CPU's products to the device, and return the slots."""
        job = None if read.x is None else self.cpu.start(layer, read.x, read.out, pairs, on_cpu, self.stats)
        self.stats.layers[layer].record_cpu(len(on_cpu))
        host_slots = None
        if layer in self.cpu_layers:
            self._prefetch(layer, guesses)
        else:
            host_slots = self._place_on_device(layer, read, pairs, [e for e in needed if e not in on_cpu], guesses)
        if job is not None:
            self.cpu.finish(job)
        return host_slots

    def _place_on_device(self, layer: int, read: "RoutingRead", pairs: list[int], needed: list[int],
                         guesses: dict[int, list[int]]) -> list[int]:
        slot_of = {}
        for action, expert, slot in self.caches[layer].schedule(needed):
            if action == "load":
                self._load(layer, expert, slot)
            elif action == "issued":
                self._prefetch(layer, guesses)
            else:                        # "use": all fit, so no slot of this step is refilled before it runs
                slot_of[expert] = slot
        self.in_use[layer] = list(slot_of.values())
        for slot in self.in_use[layer]:
            self.copier.wait((layer, slot))
        spare = next(iter(slot_of.values()), 0)    # the CPU's pairs read a slot the step reads anyway (or slot 0)
        host_slots = [slot_of.get(e, spare) for e in pairs]
        self.tables[layer].write(dict(zip(pairs, host_slots)))
        return host_slots

    def _streamed(self, layer: int, ids: torch.Tensor, pairs: list[int], needed: list[int],
                  guesses: dict[int, list[int]]) -> Iterator[ExpertBatch]:
        """More experts than slots: each in turn, hits first, the misses copied as slots free up, those more rows
        need first (a batch's shared experts early, so their larger products overlap the later copies)."""
        order = torch.argsort(ids.flatten(), stable=True)       # pairs grouped by expert, experts ascending
        counts = Counter(pairs)
        starts, start = {}, 0
        for e in needed:
            starts[e], start = start, start + counts[e]
        slots = self.slots[layer]
        by_rows = sorted(needed, key=lambda e: -counts[e])      # stable: ties by id
        for action, expert, slot in self.caches[layer].schedule(by_rows):
            if action == "load":
                self._load(layer, expert, slot)
            elif action == "issued":
                self._prefetch(layer, guesses)
            else:
                self.copier.wait((layer, slot))
                chosen = order[starts[expert]:starts[expert] + counts[expert]]
                try:
                    yield ExpertBatch(slots.memory, slots.experts, None, [slot] * counts[expert], chosen)
                finally:
                    self.copier.release((layer, slot))

    def _release(self, layer: int) -> None:
        for slot in self.in_use.pop(layer, ()):
            self.copier.release_after_read((layer, slot))

    # -- copies ---------------------------------------------------------------------------------

    def _load(self, layer: int, expert: int, slot: int) -> None:
        if self.cpu is not None and self.cpu.costs is not None:
            self.cpu.costs.queue_copy()
        self.copier.load((layer, slot), self.slots[layer].memory[slot, :self.store.nbytes], self.store.buffer(layer, expert))

    def _prefetch(self, layer: int, guesses: dict[int, list[int]]) -> None:
        for target, predicted in guesses.items():
            cache = self.caches.get(target)
            predicted = [e for e in predicted if e >= 0]
            if cache is None:
                continue
            self.predictions.setdefault(target, {})[self.distance(layer, target)] = predicted
            protected = set()
            for expert in predicted[:cache.num_slots]:   # most likely first; never evict a likelier one
                protected.add(expert)
                slot = cache.prefetch(expert, protected)
                if slot is not None:
                    self._load(target, expert, slot)


class SlotTable:
    """A layer's expert -> slot table on the device, int32 (num_experts,): the grouped kernels' slot of each pair
    is a lookup of its expert there. The host keeps the same values and copies them over (from pinned memory, on
    the compute stream) only when an entry a step reads changed. The pinned copy is rewritten only at the layer's
    next step, after that step's routing read, which waited for this copy."""

    def __init__(self, num_experts: int, device: torch.device):
        self.on_device = torch.zeros(num_experts, dtype=torch.int32, device=device)
        self.host = torch.zeros(num_experts, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.values = self.host.numpy()

    def write(self, slot_of: dict[int, int]) -> None:
        """Expert -> slot for the experts of a step (the other entries keep stale slots that no pair reads)."""
        changed = [(expert, slot) for expert, slot in slot_of.items() if self.values[expert] != slot]
        if changed:
            for expert, slot in changed:
                self.values[expert] = slot
            self.on_device.copy_(self.host, non_blocking=True)


class RoutingRead(NamedTuple):
    """One staged read of a layer's step: the host memory its copy lands in, what the copy holds (the pairs'
    experts, then one guess per target layer), and the pairs' experts on the device. A captured step keeps
    the read it recorded: its copy lands there on every replay, whatever later eager steps stage."""

    values: np.ndarray               # the pinned host buffer, as numpy (a fast read into Python ints)
    sizes: list[int]
    targets: list[int]
    ids: torch.Tensor                # int64 (pairs,) on the device: each pair's expert
    event: torch.cuda.Event | None   # recorded after the copy (CUDA)
    x: torch.Tensor | None           # the step's input (tokens, hidden) on the host, where the CPU may run pairs
    out: RowBuffers | None           # and where the CPU's products go


class ReadBuffers:
    """A layer's host buffer for routing reads (pinned on CUDA), grown as needed (a grown buffer is a new one: a
    captured read keeps the old)."""

    def __init__(self, device: torch.device, large: dict | None = None):
        self.device = device
        self.pinned = device.type == "cuda"
        self.inputs: dict[tuple, tuple[torch.Tensor, RowBuffers]] = {}   # x's shape and dtype -> x's and the CPU's
        self.large = {} if large is None else large    # the same for steps of more than MAX_ROWS tokens: all layers'
        self.host = torch.empty(0, dtype=torch.int64)
        self.values = self.host.numpy()     # the same memory, made once per buffer
        self.event = torch.cuda.Event() if self.pinned else None

    def stage(self, ids: torch.Tensor, guesses: list[torch.Tensor], targets: list[int],
              x: torch.Tensor | None) -> RoutingRead:
        """Queue the copy of the pairs' `ids` and the `guesses` (int64 device tensors) into the host buffer, and of
        `x` into its own."""
        staged = torch.cat([ids, *guesses]) if guesses else ids
        if self.host.numel() < staged.numel():
            self.host = torch.empty(staged.numel(), dtype=torch.int64, pin_memory=self.pinned)
            self.values = self.host.numpy()
        self.host[:staged.numel()].copy_(staged, non_blocking=True)
        host_x, out = self._inputs(x, ids.numel()) if x is not None else (None, None)
        if x is not None:
            host_x.copy_(x, non_blocking=True)
        return RoutingRead(self.values, [part.numel() for part in (ids, *guesses)], targets, ids, self.event,
                           host_x, out)

    def _inputs(self, x: torch.Tensor, pairs: int) -> tuple[torch.Tensor, RowBuffers]:
        """Host memory for x, and the CPU's products, one per shape and layer; for prefill's shapes (more tokens than
        a decode step that the CPU may help has) one set that every layer shares, of the last such shape (a
        captured read holds on to its own). Sharing is safe: a layer's CPU work starts after its routing read, which
        waited for everything the layer before queued, its rows' copy included (the planner budgets one set:
        planner.cpu_tier_bytes)."""
        key = x.shape, x.dtype
        inputs = self.inputs if x.shape[0] <= cpu_kernels.MAX_ROWS else self.large
        if key not in inputs:
            if inputs is self.large:
                inputs.clear()
            inputs[key] = (torch.empty(x.shape, dtype=x.dtype, pin_memory=self.pinned),
                           RowBuffers(pairs, x.shape[1], x.dtype, self.device))
        return inputs[key]


def split(read: RoutingRead) -> tuple[list[int], dict[int, list[int]]]:
    """A read's values (its copy must have finished): each pair's expert, and target layer -> guess."""
    values = read.values[:sum(read.sizes)].tolist()
    parts, start = [], 0
    for size in read.sizes:
        parts.append(values[start:start + size])
        start += size
    return parts[0], dict(zip(read.targets, parts[1:]))


class HostCopier:
    """The CPU tier: copies are synchronous, so there is nothing to wait for but the copy itself."""

    observe = None                       # copies are not timed for the CPU tier's cost model here

    def __init__(self, stats: OffloadStats, measure_time: bool):
        self.stats, self.measure_time = stats, measure_time

    def load(self, key, dst: torch.Tensor, src: torch.Tensor) -> None:
        started = time.perf_counter() if self.measure_time else 0.0
        dst.copy_(src)
        if self.measure_time:
            seconds = time.perf_counter() - started
            self.stats.copy_seconds += seconds
            self.stats.wait_seconds += seconds

    def read(self, read: RoutingRead):
        return split(read)

    def wait(self, key) -> None:
        pass

    def release(self, key) -> None:
        pass

    def release_after_read(self, key) -> None:
        pass

    def idle(self) -> bool:
        return True

    def collect_timings(self, wait: bool) -> None:
        pass


class CudaCopier:
    """Copies on one dedicated stream, ordered against computation by two events per slot, where the host does not
    know better: a routing read (`read`) waited for everything queued before it, so a slot read before the last
    read is free, and a copy the host has seen finish needs no wait."""

    def __init__(self, device: torch.device, keys, stats: OffloadStats, measure_time: bool):
        self.device, self.stats, self.measure_time = device, stats, measure_time
        self.stream = torch.cuda.Stream(device)
        self.ready = {key: torch.cuda.Event() for key in keys}   # the slot's last copy finished
        self.free = {key: torch.cuda.Event() for key in keys}    # the slot's last reader finished
        self.reads = 0                   # routing reads so far; the last one waited on
        self.last_reader: dict = {}      # slot -> (reads when its last reader was queued, whether `free` marks it)
        self.copies = 0                  # copies queued so far
        self.copied: dict = {}           # slot -> the number of its last copy
        self.copies_seen = 0             # copies the host has seen finish (they finish in order)
        self.timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.timings_lock = threading.Lock()   # the server's /metrics reads stats from another thread
        self.read_wait_seconds = 0.0           # host time blocked in routing reads
        self.last_copy: torch.cuda.Event | None = None   # recorded after the last copy queued
        self.observe = None                    # (bytes, seconds) of each finished copy: the CPU tier's cost model
        self.observed: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []

    def load(self, key, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._after_last_reader(key)
        self.copies += 1
        self.copied[key] = self.copies
        with torch.cuda.stream(self.stream):
            start = self._mark(self.stream)
            observed = torch.cuda.Event(enable_timing=True) if self.observe is not None else None
            if observed is not None:
                observed.record(self.stream)     # after the wait for the slot: the copy's own time follows
            dst.copy_(src, non_blocking=True)
            self.ready[key].record(self.stream)
            self.last_copy = self.ready[key]
            if observed is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.stream)
                self.observed.append((src.numel(), observed, end))
            self._timed("copy", start, self.stream)

    def read(self, read: RoutingRead):
        """The layer's one blocking wait: for its routing read to reach the host."""
        read.event.record(torch.cuda.current_stream(self.device))
        self.reads += 1
        started = time.perf_counter()
        read.event.synchronize()
        self.read_wait_seconds += time.perf_counter() - started
        if self.copies_seen < self.copies and self.last_copy.query():
            self.copies_seen = self.copies
        self._report_copies()
        return split(read)

    def idle(self) -> bool:
        """Whether every copy queued so far has finished."""
        return self.last_copy is None or self.last_copy.query()

    def _report_copies(self) -> None:
        """The finished copies' times to `observe`, oldest first (the copy stream runs them in order)."""
        done = 0
        for nbytes, start, end in self.observed:
            if not end.query():
                break
            self.observe(nbytes, start.elapsed_time(end) / 1000)
            done += 1
        del self.observed[:done]

    def wait(self, key) -> None:
        """Computation queued from now on reads the slot after its copy (if the host has not seen that finish)."""
        if self.copied.get(key, 0) <= self.copies_seen:
            return
        compute = torch.cuda.current_stream(self.device)
        ready = self.ready[key]
        if self.measure_time and not ready.query():
            start = self._mark(compute)
            compute.wait_event(ready)
            self._timed("wait", start, compute)
        else:
            compute.wait_event(ready)

    def release(self, key) -> None:
        """The slot's reader has been queued: the next copy into it waits for this point of the compute stream."""
        self.free[key].record(torch.cuda.current_stream(self.device))
        self.last_reader[key] = (self.reads, True)

    def release_after_read(self, key) -> None:
        """The same, for a slot whose readers were queued after the current routing read: the next read (which
        waits for them) frees it, so no event is recorded unless a copy into it comes first."""
        self.last_reader[key] = (self.reads, False)

    def _after_last_reader(self, key) -> None:
        """The copy stream waits for the slot's last reader to finish, unless a routing read since has shown it (or
        nothing read the slot since its last copy, which this one follows on the copy stream)."""
        reads, marked = self.last_reader.pop(key, (-1, True))
        if reads < self.reads:
            return
        if not marked:
            self.free[key].record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self.free[key])

    def _mark(self, stream):
        if not self.measure_time:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _timed(self, kind: str, start, stream) -> None:
        if start is None:
            return
        with self.timings_lock:
            self.timings.append((kind, start, self._mark(stream)))
        if len(self.timings) > PENDING_TIMINGS_LIMIT:
            self.collect_timings(wait=False)

    def collect_timings(self, wait: bool) -> None:
        """Add finished (or, with `wait`, all) timed intervals to the stats."""
        if wait and self.timings:
            torch.cuda.synchronize(self.device)
        with self.timings_lock:
            pending = []
            for kind, start, end in self.timings:
                if not end.query():
                    pending.append((kind, start, end))
                    continue
                seconds = start.elapsed_time(end) / 1000
                if kind == "copy":
                    self.stats.copy_seconds += seconds
                else:
                    self.stats.wait_seconds += seconds
            self.timings = pending
