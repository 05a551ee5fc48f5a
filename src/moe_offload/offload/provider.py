"""OffloadedExperts: the ExpertProvider whose experts live on the host and stream into device slots.

    store = ExpertStore(config.moe_layers, config.num_experts, fmt.nbytes, pin=True)   # filled at load time
    provider = OffloadedExperts(store, fmt, slots={0: 2, 1: 2}, device="cuda", predictor=GatePredictor(...))
    model = Transformer(config, weights, provider)
    provider.summary()        # hit rate, prefetch recall/precision, bytes moved, times (see cache.py)

Each MoE layer owns a fixed number of slots: one device tensor (slots, stride) allocated here,
once; each slot's Expert is made once with `ExpertFormat.view` (which must only make views, never
read the bytes), so nothing is allocated while decoding.
Which expert goes into which slot is decided by `LayerCache` (cache.py, LRU); this file only
carries the decisions out, and is the one place that knows about CUDA streams and events:

- copies run on a dedicated copy stream; each slot has a "ready" event (recorded after its copy)
  and a "free" event (recorded on the compute stream after the last computation that read it);
  a copy into a slot waits for "free", a computation waits for "ready". The host never blocks.
- experts are yielded as they become ready: those already in slots first, then the loads in the
  order they were started; the MoE block's sum does not depend on the order (model.py).
- once every load of the current layer is issued, the predictor guesses the next layers' experts
  from the current residual and their copies are started into those layers' slots (never touching
  the current layer's slots, so nothing this step still needs is evicted).
On the CPU, the CPU stands in for the device: slots are CPU tensors and copies are plain copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from ..experts import ExpertFormat
from .cache import LayerCache, LayerStats, OffloadStats
from .planner import slot_stride
from .prefetch import ExpertPredictor
from .store import ExpertStore

PENDING_TIMINGS_LIMIT = 4096  # resolve finished timing events once this many are waiting


class OffloadedExperts:
    def __init__(self, store: ExpertStore, expert_format: ExpertFormat, slots: dict[int, int], device,
                 predictor: ExpertPredictor | None = None, measure_time: bool = False):
        self.store = store
        self.device = torch.device(device)
        self.predictor = predictor
        self.stats = OffloadStats({layer: LayerStats() for layer in slots})
        nbytes = expert_format.nbytes
        self.caches = {layer: LayerCache(n, nbytes, self.stats.layers[layer]) for layer, n in slots.items()}
        self.slot_memory = {layer: torch.empty((n, slot_stride(nbytes)), dtype=torch.uint8, device=self.device)
                            for layer, n in slots.items()}
        self.slot_experts = {layer: [expert_format.view(memory[i, :nbytes]) for i in range(len(memory))]
                             for layer, memory in self.slot_memory.items()}
        keys = [(layer, slot) for layer, n in slots.items() for slot in range(n)]
        if self.device.type == "cuda":
            self.copier = CudaCopier(self.device, keys, self.stats, measure_time)
        else:
            self.copier = HostCopier(self.stats, measure_time)
        order = {layer: i for i, layer in enumerate(slots)}
        self.distance = lambda layer, target: order[target] - order[layer]
        self.predictions: dict[int, dict[int, list[int]]] = {}   # target layer -> {lookahead: predicted ids}

    def experts(self, layer: int, expert_ids: Sequence[int], residual: torch.Tensor):
        cache = self.caches[layer]
        for distance, predicted in self.predictions.pop(layer, {}).items():
            cache.stats.record_prediction(distance, predicted, expert_ids)
        for action, expert, slot in cache.schedule(expert_ids):
            if action == "load":
                self._load(layer, expert, slot)
            elif action == "issued":
                if self.predictor is not None:
                    self._prefetch(layer, residual)
            else:
                self.copier.wait((layer, slot))
                try:
                    yield expert, self.slot_experts[layer][slot]
                finally:
                    self.copier.release((layer, slot))

    def summary(self) -> dict[str, float]:
        self.copier.collect_timings(wait=True)
        return self.stats.summary()

    def _load(self, layer: int, expert: int, slot: int) -> None:
        self.copier.load((layer, slot), self.slot_memory[layer][slot, :self.store.nbytes], self.store.buffer(layer, expert))

    def _prefetch(self, layer: int, residual: torch.Tensor) -> None:
        for target, predicted in self.predictor.predict(layer, residual).items():
            cache = self.caches.get(target)
            if cache is None:
                continue
            self.predictions.setdefault(target, {})[self.distance(layer, target)] = list(predicted)
            protected = set()
            for expert in predicted[:cache.num_slots]:   # most likely first; never evict a likelier one
                protected.add(expert)
                slot = cache.prefetch(expert, protected)
                if slot is not None:
                    self._load(target, expert, slot)


class HostCopier:
    """The CPU tier: copies are synchronous, so there is nothing to wait for but the copy itself."""

    def __init__(self, stats: OffloadStats, measure_time: bool):
        self.stats, self.measure_time = stats, measure_time

    def load(self, key, dst: torch.Tensor, src: torch.Tensor) -> None:
        started = time.perf_counter() if self.measure_time else 0.0
        dst.copy_(src)
        if self.measure_time:
            seconds = time.perf_counter() - started
            self.stats.copy_seconds += seconds
            self.stats.wait_seconds += seconds

    def wait(self, key) -> None:
        pass

    def release(self, key) -> None:
        pass

    def collect_timings(self, wait: bool) -> None:
        pass


class CudaCopier:
    """Copies on one dedicated stream, ordered against computation by two events per slot."""

    def __init__(self, device: torch.device, keys, stats: OffloadStats, measure_time: bool):
        self.device, self.stats, self.measure_time = device, stats, measure_time
        self.stream = torch.cuda.Stream(device)
        self.ready = {key: torch.cuda.Event() for key in keys}   # the slot's last copy finished
        self.free = {key: torch.cuda.Event() for key in keys}    # the slot's last reader finished
        self.timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.timings_lock = threading.Lock()   # the server's /metrics reads stats from another thread

    def load(self, key, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.stream.wait_event(self.free[key])
        with torch.cuda.stream(self.stream):
            start = self._mark(self.stream)
            dst.copy_(src, non_blocking=True)
            self.ready[key].record(self.stream)
            self._timed("copy", start, self.stream)

    def wait(self, key) -> None:
        compute = torch.cuda.current_stream(self.device)
        ready = self.ready[key]
        if self.measure_time and not ready.query():
            start = self._mark(compute)
            compute.wait_event(ready)
            self._timed("wait", start, compute)
        else:
            compute.wait_event(ready)

    def release(self, key) -> None:
        self.free[key].record(torch.cuda.current_stream(self.device))

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
