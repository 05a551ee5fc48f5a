"""Expert-cache bookkeeping: which expert sits in which slot, LRU order, counters. Plain Python, no CUDA.

    cache = LayerCache(num_slots=2, expert_nbytes=fmt.nbytes)
    for action, expert, slot in cache.schedule([1, 5]):    # the experts one forward of this layer needs
        ...   # "load": copy `expert` into `slot`; "use": compute with the expert in `slot`;
              # "issued": every load of this step has been started (a good moment to prefetch)
    cache.prefetch(7, protected={7})    # -> slot to copy expert 7 into, or None

The provider (provider.py) carries the actions out with real copies; the routing benchmark carries
them out with none, so simulated and real hit rates come from one implementation.

Counters (`LayerStats`, gathered in `OffloadStats`, whose `summary()` is what --stats and the
server's /metrics show):

    requests        expert uses asked for: each distinct expert a forward of the layer needs, once
    hits            of those, already in a slot (loaded, or in flight from a prefetch) when asked for
    misses          of those, loaded on demand or computed on the CPU (cpu_tier.py)
    cpu_uses        of the misses, those computed on the CPU (every use of a layer without slots)
    evictions       experts dropped from a slot to make room
    loads           copies into the layer's slots (misses + prefetch loads), and their bytes
    prefetch_loads  copies started by the prefetcher; prefetch_used: those asked for before eviction
    predicted[d], predicted_used[d], used_predicted[d]
                    prediction quality at lookahead d (layers ahead): experts predicted, predicted
                    and then used, and uses in forwards that had a prediction. recall =
                    predicted_used / used_predicted, precision = predicted_used / predicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields


@dataclass
class LayerStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    cpu_uses: int = 0
    evictions: int = 0
    loads: int = 0
    bytes_loaded: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0
    predicted: dict[int, int] = field(default_factory=dict)
    predicted_used: dict[int, int] = field(default_factory=dict)
    used_predicted: dict[int, int] = field(default_factory=dict)

    def clear(self) -> None:
        self.__init__()

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def record_cpu(self, experts: int) -> None:
        """Misses of a step that the CPU computes (the cache never sees them)."""
        self.requests += experts
        self.misses += experts
        self.cpu_uses += experts

    def record_prediction(self, distance: int, predicted: Iterable[int], used: Iterable[int]) -> None:
        predicted, used = set(predicted), set(used)
        for counter, value in ((self.predicted, len(predicted)), (self.predicted_used, len(predicted & used)),
                               (self.used_predicted, len(used))):
            counter[distance] = counter.get(distance, 0) + value


@dataclass
class OffloadStats:
    """Every counter of the offloaded provider. Times are measured only when asked for
    (OffloadConfig.measure_time); on the CPU tier copies are synchronous, so wait = copy time. The CPU's
    experts are always timed (host clock, cheap)."""

    layers: dict[int, LayerStats]
    wait_seconds: float = 0.0   # compute waiting for an expert's copy to finish
    copy_seconds: float = 0.0   # copies in progress (the copy stream busy)
    cpu_seconds: float = 0.0    # the CPU computing experts (cpu_tier.py)
    cpu_bytes: int = 0          # expert bytes the CPU read: one pass per 8 rows of an expert
    def reset(self) -> None:
        for stats in self.layers.values():
            stats.clear()   # in place: the layer caches hold these objects
        self.wait_seconds = self.copy_seconds = self.cpu_seconds = 0.0
        self.cpu_bytes = 0

    def total(self) -> LayerStats:
        total = LayerStats()
        for stats in self.layers.values():
            for f in fields(LayerStats):
                value = getattr(stats, f.name)
                if isinstance(value, dict):
                    for distance, count in value.items():
                        getattr(total, f.name)[distance] = getattr(total, f.name).get(distance, 0) + count
                else:
                    setattr(total, f.name, getattr(total, f.name) + value)
        return total

    def summary(self) -> dict[str, float]:
        """Flat numbers: hit_rate (pooled over layers), mean_layer_hit_rate, counts, bytes_loaded,
        prefetch_recall / prefetch_precision (lookahead 1; _d2, _d3... for deeper), wait_seconds,
        copy_seconds, h2d_gbps (bytes over copy time; 0 when times are not measured), cpu_uses, cpu_bytes,
        cpu_seconds, cpu_gbps (the CPU's expert bytes over its time computing them)."""
        t = self.total()
        rates = [s.hit_rate for s in self.layers.values() if s.requests]
        out = {
            "hit_rate": t.hit_rate,
            "mean_layer_hit_rate": sum(rates) / len(rates) if rates else 0.0,
            "requests": t.requests, "hits": t.hits, "misses": t.misses, "evictions": t.evictions,
            "loads": t.loads, "prefetch_loads": t.prefetch_loads, "prefetch_used": t.prefetch_used,
            "bytes_loaded": t.bytes_loaded,
            "wait_seconds": self.wait_seconds, "copy_seconds": self.copy_seconds,
            "h2d_gbps": t.bytes_loaded / self.copy_seconds / 1e9 if self.copy_seconds else 0.0,
            "cpu_uses": t.cpu_uses, "cpu_bytes": self.cpu_bytes, "cpu_seconds": self.cpu_seconds,
            "cpu_gbps": self.cpu_bytes / self.cpu_seconds / 1e9 if self.cpu_seconds else 0.0,
        }
        for distance in sorted(t.predicted):
            suffix = "" if distance == 1 else f"_d{distance}"
            used, predicted, hit = t.used_predicted[distance], t.predicted[distance], t.predicted_used[distance]
            out["prefetch_recall" + suffix] = hit / used if used else 0.0
            out["prefetch_precision" + suffix] = hit / predicted if predicted else 0.0
        return out


class LayerCache:
    """The slots of one MoE layer, managed least-recently-used."""

    def __init__(self, num_slots: int, expert_nbytes: int, stats: LayerStats | None = None):
        if num_slots < 1:
            raise ValueError(f"a layer needs at least one expert slot, got {num_slots}")
        self.num_slots = num_slots
        self.expert_nbytes = expert_nbytes
        self.stats = stats if stats is not None else LayerStats()
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = list(range(num_slots - 1, -1, -1))   # pop() gives slot 0 first
        self.recency: OrderedDict[int, None] = OrderedDict()        # experts, least recently used first
        self.loaded_at: dict[int, int] = {}                          # expert -> load sequence number
        self.prefetched: set[int] = set()                            # loaded by a prefetch, not asked for yet
        self.sequence = 0

    @property
    def resident(self) -> list[int]:
        """Experts in slots, least recently used first."""
        return list(self.recency)

    def schedule(self, needed: Sequence[int]) -> Iterator[tuple[str, int, int]]:
        """The work of one forward of this layer, as ("load" | "use" | "issued", expert, slot).

        Experts already in a slot are used first (in the order their copies were started), while
        the missing ones are copied into free or least-recently-used slots; an expert this step
        still has to use is never evicted, so with one slot the misses stream through it one by one.
        Each needed expert is loaded at most once. A consumer must act on each "use" before asking
        for the next action: the slot may be refilled right after.
        """
        stats = self.stats
        needed = list(dict.fromkeys(needed))
        hits = sorted((e for e in needed if e in self.slot_of), key=self.loaded_at.__getitem__)
        pending = deque(e for e in needed if e not in self.slot_of)
        stats.requests += len(needed)
        stats.hits += len(hits)
        stats.misses += len(pending)
        for expert in needed:
            if expert in self.prefetched:
                stats.prefetch_used += 1
                self.prefetched.discard(expert)
            if expert in self.recency:
                self.recency.move_to_end(expert)
        protected = set(needed)
        ready = deque((e, self.slot_of[e]) for e in hits)
        issued = False
        while ready or pending:
            while pending and (slot := self._victim(protected)) is not None:
                expert = pending.popleft()
                self._place(expert, slot)
                ready.append((expert, slot))
                yield "load", expert, slot
            if not pending and not issued:
                issued = True
                yield "issued", -1, -1
            expert, slot = ready.popleft()
            yield "use", expert, slot
            protected.discard(expert)

    def hits(self, needed: Iterable[int]) -> list[int]:
        """Those of `needed` that a step asking for them now would find in a slot."""
        return [e for e in needed if e in self.slot_of]

    def prefetch(self, expert: int, protected: set[int]) -> int | None:
        """Make room for a predicted expert: -> the slot to copy it into, or None when it is
        already in a slot or every slot holds a protected expert."""
        if expert in self.slot_of:
            return None
        slot = self._victim(protected)
        if slot is None:
            return None
        self._place(expert, slot)
        self.prefetched.add(expert)
        self.stats.prefetch_loads += 1
        return slot

    def _victim(self, protected: set[int]) -> int | None:
        if self.free:
            return self.free.pop()
        for expert in self.recency:
            if expert not in protected:
                self.stats.evictions += 1
                slot = self.slot_of.pop(expert)
                del self.recency[expert], self.loaded_at[expert]
                self.prefetched.discard(expert)
                return slot
        return None

    def _place(self, expert: int, slot: int) -> None:
        self.slot_of[expert] = slot
        self.recency[expert] = None
        self.sequence += 1
        self.loaded_at[expert] = self.sequence
        self.stats.loads += 1
        self.stats.bytes_loaded += self.expert_nbytes


class ForgetfulCache(LayerCache):
    """The paper's "without LRU" ablation (no cache): every slot is emptied before each forward of the layer,
    so each expert use is a load (prefetched experts, if any, are still kept for their forward)."""

    def hits(self, needed):
        return [e for e in needed if e in self.prefetched]

    def schedule(self, needed):
        for expert in [e for e in self.slot_of if e not in self.prefetched]:
            self.free.append(self.slot_of.pop(expert))
            del self.recency[expert], self.loaded_at[expert]
        return super().schedule(needed)
