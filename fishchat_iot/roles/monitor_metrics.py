"""Counters for the monitor: a latency histogram the msg_server feeds, bounded ring
buffers of recent events, the last hour of per-second samples, process figures read
from /proc, and the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import bisect
import collections
import os
import resource
import time
from collections.abc import Iterable
from typing import Any

# Delivery latency buckets, in milliseconds (accepted -> written to the recipient).
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000, 300000)
_bisect_left = bisect.bisect_left


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics); ``observe`` is O(log n) and
    on the message path: it updates one bucket and the sum, ``count`` is summed when
    read."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[_bisect_left(self.bounds, value)] += 1
        if value:
            self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            running += n
            out.append((str(bound), running))
        return out


class Ring:
    """The last ``size`` events (dicts with an ``at_ms``), newest last."""

    def __init__(self, size: int = 200) -> None:
        self.items: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.total = 0

    def add(self, **event: Any) -> None:
        event.setdefault("at_ms", int(time.time() * 1000))
        self.items.append(event)
        self.total += 1

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.items)[-limit:][::-1]


class Series:
    """One sample per period over the last hour: (at_ms, msgs/s in, msgs/s out, sessions)."""

    def __init__(self, period: float = 1.0, span: float = 3600.0) -> None:
        self.period = period
        self.points: collections.deque[tuple[int, float, float, int]] = collections.deque(
            maxlen=int(span / period)
        )
        self._last: tuple[float, int, int] | None = None

    def sample(self, msgs_in: int, msgs_out: int, sessions: int) -> tuple[float, float]:
        """Record a point; returns the rates (in, out) per second since the last one."""
        now = time.monotonic()
        rate_in = rate_out = 0.0
        if self._last is not None:
            t0, in0, out0 = self._last
            dt = max(now - t0, 1e-6)
            rate_in, rate_out = (msgs_in - in0) / dt, (msgs_out - out0) / dt
        self._last = (now, msgs_in, msgs_out)
        self.record(rate_in, rate_out, sessions)
        return rate_in, rate_out

    def record(self, rate_in: float, rate_out: float, sessions: int) -> None:
        """Record a point of rates measured elsewhere (the cluster's heartbeats)."""
        self.points.append((int(time.time() * 1000), rate_in, rate_out, sessions))

    def last(self) -> tuple[float, float]:
        if not self.points:
            return 0.0, 0.0
        p = self.points[-1]
        return p[1], p[2]

    def since(self, since_ms: int = 0, step: int = 1) -> list[list[float]]:
        pts = [p for p in self.points if p[0] > since_ms]
        return [[p[0], round(p[1], 2), round(p[2], 2), p[3]] for p in pts[::step]]


def process_stats() -> dict[str, float]:
    """CPU seconds, resident memory (bytes), open fds and start time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats: dict[str, float] = {"cpu_seconds": usage.ru_utime + usage.ru_stime}
    rss = usage.ru_maxrss * 1024.0  # peak, as a fallback
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    stats["resident_memory_bytes"] = float(rss)
    try:
        stats["open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    try:
        stats["max_fds"] = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (OSError, ValueError):
        pass
    return stats


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (
        (k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for k, v in labels.items()
    )
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Exposition:
    """Builds a Prometheus text exposition, one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, help_text: str, h: Histogram, scale: float = 1.0) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, n in h.cumulative():
            le = bound if bound == "+Inf" else _num(float(bound) * scale)
            self.lines.append(f'{name}_bucket{{le="{le}"}} {n}')
        self.lines.append(f"{name}_sum {_num(h.total * scale)}")
        self.lines.append(f"{name}_count {h.count}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _num(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
