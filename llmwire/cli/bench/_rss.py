"""Sample processes' resident memory from outside, through /proc.

DESIGN.md's memory model: figures are RSS measured from outside, peak minus
the process's baseline after it built its own model. Mapped file pages count
in RSS, which is why file streaming must unmap as it goes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int) -> tuple[int, int]:
    """``(rss, anonymous rss)`` of ``pid`` in bytes, from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]) * PAGE, int(fields[2]) * PAGE
    return resident, resident - shared


@dataclass
class Timeline:
    """RSS samples of one process: (seconds since start, rss, anon rss)."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def peak(self, since: float = 0.0) -> int:
        return max((rss for t, rss, _ in self.samples if t >= since), default=0)

    def at(self, moment: float) -> int:
        """The last sample taken at or before ``moment``."""
        before = [rss for t, rss, _ in self.samples if t <= moment]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)


class RssSampler:
    """A thread sampling each pid every ``interval`` seconds until stopped."""

    def __init__(self, pids: dict[str, int], interval: float = 0.005) -> None:
        self.timelines = {name: Timeline(pid) for name, pid in pids.items()}
        self.interval = interval
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self.started

    def _loop(self) -> None:
        while not self._stop.is_set():
            moment = self.now()
            for timeline in self.timelines.values():
                try:
                    rss, anon = rss_bytes(timeline.pid)
                except (OSError, IndexError, ValueError):
                    continue  # the process ended
                timeline.samples.append((moment, rss, anon))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
