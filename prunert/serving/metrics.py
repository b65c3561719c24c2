"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library: counters,
gauges and histograms with fixed buckets, safe to update from any thread. `GET /metrics` serves render()."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # tokens / second
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # rows per decode step


@dataclass
class Counter:
    name: str
    help: str
    label: str = ""  # one label name, or "" for none
    values: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, label_value: str = "", amount: float = 1.0) -> None:
        with self.lock:
            self.values[label_value] = self.values.get(label_value, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self.lock:
            items = sorted(self.values.items()) or ([] if self.label else [("", 0.0)])
        for value, count in items:
            lines.append(f'{self.name}{{{self.label}="{_escape(value)}"}} {_num(count)}' if self.label else f"{self.name} {_num(count)}")
        return lines


@dataclass
class Gauge:
    name: str
    help: str
    value: float = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.value)}"]


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last: +Inf

    def observe(self, value: float) -> None:
        with self.lock:
            index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
            self.counts[index] += 1
            self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self.lock:
            counts, total = list(self.counts), self.total
        running = 0
        for bound, count in zip((*self.buckets, math.inf), counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{"+Inf" if bound == math.inf else _num(bound)}"}} {running}')
        return lines + [f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]


class EngineMetrics:
    """What the scheduler records; servers add their own (HTTP errors by code) beside it."""

    def __init__(self) -> None:
        self.requests = Counter("prunert_requests_total", "Requests finished, by finish reason.", "finish")
        self.rejected = Counter("prunert_requests_rejected_total", "Requests refused because the queue was full.")
        self.errors = Counter("prunert_engine_errors_total", "Server faults in vision, prefill or decode.")
        self.queue_depth = Gauge("prunert_queue_depth", "Requests waiting for a decode row.")
        self.active = Gauge("prunert_active_rows", "Requests decoding in the running batch.")
        self.batch_size = Histogram("prunert_batch_size", "Rows in each decode step.", BATCH_BUCKETS)
        self.ttft = Histogram("prunert_time_to_first_token_seconds", "Submit to first token (queue, vision, prefill).", TTFT_BUCKETS)
        self.decode_rate = Histogram("prunert_decode_tokens_per_second", "Each finished request's decode rate.", RATE_BUCKETS)

    def render(self, *extra: Counter | Gauge | Histogram) -> str:
        parts = (self.requests, self.rejected, self.errors, self.queue_depth, self.active, self.batch_size, self.ttft, self.decode_rate, *extra)
        return "\n".join(line for part in parts for line in part.render()) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
