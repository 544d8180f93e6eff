"""A rate-limited link with real TCP: two network namespaces joined by a veth
pair, an ``htb`` rate limit on each end (this kernel has no ``netem``; delay
comes from :mod:`._relay`).

:class:`NamespaceLink` creates both namespaces, and deletes them (which
deletes the veth pair and everything in them) on exit, on an exception, on
Ctrl-C and on SIGTERM. Namespaces are named ``llmwire-<pid>-a|b``; ones left
by a process that no longer exists (killed with SIGKILL) are removed the
next time a link is set up. Traffic flows only between the two namespaces'
own addresses (10.213.0.1 and 10.213.0.2). Needs root (CAP_NET_ADMIN) and the
``ip`` and ``tc`` commands: :func:`unavailable` says why not, in one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from types import FrameType
from typing import Any, Callable

__all__ = ["NamespaceLink", "unavailable", "sweep_stale"]

PREFIX = "llmwire-"
ADDRESSES = ("10.213.0.1", "10.213.0.2")


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root; using the loopback relay for rate and delay"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no {tool!r} command; using the loopback relay for rate and delay"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete ``llmwire-<pid>-*`` namespaces whose creating process is gone."""
    removed = []
    for name in _namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)-[ab]", name)
        if m and not _alive(int(m.group(1))):
            _run("ip", "netns", "delete", name, check=False)
            removed.append(name)
    return removed


def htb_burst(rate_bps: int) -> int:
    """Bytes htb may send at once: 1 ms at the rate, at least 64 KiB (one
    GSO segment on veth), so the limit holds without starving TSO bursts."""
    return max(64 * 1024, rate_bps // 8 // 1000)


class NamespaceLink:
    """Namespaces ``a`` and ``b`` joined by veth, each end limited to
    ``rate_bps`` bits per second by htb. Use as a context manager;
    :meth:`command` wraps an argv to run inside one of them."""

    def __init__(self, rate_bps: int) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.rate_bps = rate_bps
        pid = os.getpid()
        self.names = (f"{PREFIX}{pid}-a", f"{PREFIX}{pid}-b")
        self.devices = (f"lwa{pid % 10**8}", f"lwb{pid % 10**8}")  # IFNAMSIZ is 16
        self.addresses = ADDRESSES
        self._created: list[str] = []
        self._old_term: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> "NamespaceLink":
        self._old_term = signal.signal(signal.SIGTERM, _terminate)
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        sweep_stale()
        for name in self.names:
            _run("ip", "netns", "add", name)
            self._created.append(name)
        (na, nb), (da, db) = self.names, self.devices
        _run("ip", "link", "add", da, "netns", na, "type", "veth", "peer", "name", db,
             "netns", nb)
        burst = htb_burst(self.rate_bps)
        for ns, dev, addr in ((na, da, ADDRESSES[0]), (nb, db, ADDRESSES[1])):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                 "default", "1")
            _run("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
                 "htb", "rate", f"{self.rate_bps}bit", "ceil", f"{self.rate_bps}bit",
                 "burst", str(burst), "cburst", str(burst))

    def teardown(self) -> None:
        """Delete the namespaces (and with them the veth pair); idempotent.
        Processes still inside them must have been stopped by the caller."""
        while self._created:
            _run("ip", "netns", "delete", self._created.pop(), check=False)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    def command(self, side: int, argv: list[str]) -> list[str]:
        """``argv`` run in namespace ``side`` (0: a, 1: b)."""
        return ["ip", "netns", "exec", self.names[side], *argv]

    def exists(self) -> bool:
        present = set(_namespaces())
        return all(name in present for name in self.names)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every ``with NamespaceLink`` unwinds.
    raise SystemExit(128 + signum)
