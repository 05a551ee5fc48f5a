"""Server counters, rendered in the Prometheus text format (version 0.0.4) for GET /metrics.

    metrics = Metrics()
    metrics.count_request("/v1/completions", 200)
    metrics.record_sequence(prompt_tokens=12, new_tokens=16, time_to_first_token=0.2, decode_seconds=0.9)
    metrics.record_step(batch_size=4, tokens=4, seconds=0.05, inter_token=[0.05, 0.05, 0.05])
    text = metrics.render(queue_depth=3, queue_capacity=64, active=1, expert_stats=engine.expert_stats())

Written by the event loop (requests) and the scheduler thread (sequences), hence the lock.
`expert_stats` keys are exported as they come, one gauge each: `moe_offload_expert_<key>`
(e.g. `hit_rate`, `prefetch_recall` when the engine offloads; none for a resident model).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter

PREFIX = "moe_offload"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)   # seconds
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)          # seconds


class Histogram:
    """Cumulative bucket counts, count and sum of observed values (Prometheus' histogram)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.buckets = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.sequences = Counter()          # "finished", "cancelled", "failed"
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_tokens = 0              # tokens after each sequence's first
        self.decode_seconds = 0.0
        self.last_decode_tokens_per_second = 0.0
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)
        self.batch_size = 0                 # sequences in the engine's last step
        self.steps = 0
        self.step_tokens = 0                # tokens that engine steps produced, every sequence's
        self.step_seconds = 0.0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def record_sequence(self, prompt_tokens: int, new_tokens: int, time_to_first_token: float | None,
                        decode_seconds: float, outcome: str = "finished") -> None:
        """One generation ended; `time_to_first_token` counts from arrival (queue wait included)."""
        with self._lock:
            self.sequences[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += new_tokens
            if new_tokens > 1 and decode_seconds > 0:
                self.decode_tokens += new_tokens - 1
                self.decode_seconds += decode_seconds
                self.last_decode_tokens_per_second = (new_tokens - 1) / decode_seconds
            if time_to_first_token is not None:
                self.time_to_first_token.observe(time_to_first_token)

    def record_step(self, batch_size: int, tokens: int, seconds: float, inter_token: list[float]) -> None:
        """One step of the engine's batch: its sequences, the tokens it made, its time, and for each sequence that
        had a token before, the time since that one."""
        with self._lock:
            self.batch_size = batch_size
            self.steps += 1
            self.step_tokens += tokens
            self.step_seconds += seconds
            for value in inter_token:
                self.inter_token.observe(value)

    def render(self, queue_depth: int, queue_capacity: int, active: int, expert_stats: dict) -> str:
        with self._lock:
            out = Exposition()
            out.family("requests_total", "counter", "HTTP requests answered, by endpoint and status code",
                       [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.requests.items())])
            out.family("sequences_total", "counter", "generations ended, by outcome (finished, cancelled, failed)",
                       [({"outcome": o}, self.sequences[o]) for o in ("finished", "cancelled", "failed")])
            out.family("prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, self.prompt_tokens)])
            out.family("generated_tokens_total", "counter", "tokens generated", [({}, self.generated_tokens)])
            out.family("decode_tokens_total", "counter", "tokens generated after each sequence's first",
                       [({}, self.decode_tokens)])
            out.family("decode_seconds_total", "counter", "seconds spent decoding after each sequence's first token",
                       [({}, self.decode_seconds)])
            out.family("decode_tokens_per_second", "gauge", "decode speed of the last finished sequence",
                       [({}, self.last_decode_tokens_per_second)])
            out.histogram("time_to_first_token_seconds", "arrival to first token, queue wait and prefill included",
                          self.time_to_first_token)
            out.histogram("inter_token_seconds", "time between a sequence's consecutive tokens", self.inter_token)
            out.family("batch_size", "gauge", "sequences in the engine's last step", [({}, self.batch_size)])
            out.family("steps_total", "counter", "engine steps (one token of every running sequence)", [({}, self.steps)])
            out.family("step_tokens_total", "counter", "tokens made by engine steps, all sequences together",
                       [({}, self.step_tokens)])
            out.family("step_seconds_total", "counter", "seconds in engine steps (step_tokens_total over it: aggregate "
                       "tokens/s)", [({}, self.step_seconds)])
        out.family("queue_depth", "gauge", "requests waiting for the engine", [({}, queue_depth)])
        out.family("queue_capacity", "gauge", "waiting requests allowed before 429", [({}, queue_capacity)])
        out.family("active_sequences", "gauge", "sequences being generated now", [({}, active)])
        for key, value in sorted(expert_stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.family(f"expert_{_metric_name(key)}", "gauge", f"expert cache: {key}", [({}, value)])
        return out.text()


class Exposition:
    """Builds the text: `# HELP`, `# TYPE`, then one `name{labels} value` line per sample."""

    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        name = f"{PREFIX}_{name}"
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        name = f"{PREFIX}_{name}"
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, n in zip(histogram.bounds, histogram.buckets):
            self.lines.append(f'{name}_bucket{{le="{bound}"}} {n}')
        self.lines += [f'{name}_bucket{{le="+Inf"}} {histogram.count}', f"{name}_sum {_number(histogram.sum)}",
                       f"{name}_count {histogram.count}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_").lower() or "value"
