"""Process trees from outside, through /proc: who is below whom, each one's
RSS over time (per role, and the whole tree's at each moment), and signals
that never hit a reused pid. For the benches that run real engine
deployments (Flower, NVFlare), whose processes start processes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Callable, Iterable

from ._rss import rss_bytes

__all__ = ["TreeSampler", "descendants", "started_at", "signal_if_same", "argv_of",
           "stop_tree"]


def _stat_field(pid: int | str, index: int) -> int | None:
    """Field ``index`` of /proc/PID/stat after the command name (0: state;
    1: the parent; 19: the start time), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[index])
    except (OSError, IndexError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := _stat_field(entry, 1)) is not None:
            tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(roots: list[int]) -> set[int]:
    """Every live process below ``roots`` (from /proc)."""
    tree, seen, todo = _children(), set(), list(roots)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def argv_of(pid: int) -> list[str]:
    """A process's command line ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def started_at(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with its pid, who it is."""
    return _stat_field(pid, 19)


def signal_if_same(pid: int, started: int | None, sig: int) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``started``."""
    if started is None or started_at(pid) != started:
        return  # gone, or the pid now names another process
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_tree(processes: Iterable[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """Stop processes started in sessions of their own, and everything below
    them: SIGTERM to each one's group and to every descendant, up to
    ``grace`` seconds for them to go, then SIGKILL to the groups (children
    a tool left) and to each descendant still the process seen then."""
    processes = list(processes)
    below = {pid: started_at(pid) for pid in
             descendants([p.pid for p in processes if p.poll() is None])}
    for pid, started in below.items():
        signal_if_same(pid, started, signal.SIGTERM)
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (
            any(p.poll() is None for p in processes)
            or any(started_at(pid) == started for pid, started in below.items())):
        time.sleep(0.1)
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if process.poll() is None:
            process.wait(10)
    for pid, started in below.items():
        signal_if_same(pid, started, signal.SIGKILL)


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 once it is gone)."""
    try:
        return rss_bytes(pid)[0]
    except (OSError, IndexError, ValueError):
        return 0


class TreeSampler:
    """Samples the RSS of ``roots`` (pid -> role) and every process below
    them every ``interval`` s: peaks per process and role, each process's
    first sample (its idle RSS), and the peak of the whole tree's sum.
    ``classify(pid)`` names the role of a process found below the roots
    (``"other"`` when it cannot tell: that never replaces a role it told)."""

    def __init__(self, roots: dict[int, str], classify: Callable[[int], str],
                 interval: float = 0.05) -> None:
        self.roots, self.classify, self.interval = dict(roots), classify, interval
        self.peaks: dict[int, int] = {}
        self.first: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self.parent: dict[int, int | None] = {}
        self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in set(self.roots) | descendants(list(self.roots)):
                if pid not in self.parent:
                    self.parent[pid] = _stat_field(pid, 1)
                # asked again each time: a child is first seen as its parent's
                # fork, or between fork and exec (no command line yet)
                role = self.roots.get(pid) or self.classify(pid)
                if role != "other" or pid not in self.role:
                    self.role[pid] = role
                rss = _rss(pid)
                if rss:
                    total += rss
                    self.first.setdefault(pid, rss)
                    self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            self.tree_peak = max(self.tree_peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, role: str, idle: dict[int, int] | None = None) -> tuple[int, int]:
        """``(peak, idle)`` of the role's largest process (0, 0 if none ran):
        idle is what the process reported before it held a model (``idle``,
        by pid), else its first sample."""
        pids = [p for p, r in self.role.items() if r == role and p in self.peaks]
        if not pids:
            return 0, 0
        top = max(pids, key=lambda p: self.peaks[p])
        return self.peaks[top], (idle or {}).get(top, self.first[top])
