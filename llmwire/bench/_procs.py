"""Talking to benchmark child processes over a multiprocessing pipe.

Children send ``(kind, value)`` tuples; a child that fails sends
``("failed", "Type: message")`` and exits with status 1 (:func:`guard`), so
the parent reports the child's error instead of waiting out a timeout; a
child that dies without a word (killed, e.g. by the kernel's OOM killer) is
noticed through its exit status when :func:`expect` is given the process.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["expect", "guard"]


def expect(conn: Any, kind: str, timeout: float = 900.0, process: Any = None) -> Any:
    """The value of the next message, which must be ``kind``; RuntimeError
    if the child failed, died or stayed silent for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
        if process is not None and not process.is_alive() and not conn.poll(0):
            code = process.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise RuntimeError(f"a benchmark process ended before sending {kind!r} ({why}"
                               f"{'; out of memory?' if code == -9 else ''})")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"no {kind!r} from a benchmark process within {timeout:g}s")
    got, value = conn.recv()
    if got == "failed":
        raise RuntimeError(f"benchmark process failed: {value}")
    if got != kind:
        raise RuntimeError(f"expected {kind!r} from a benchmark process, got {got!r}")
    return value


def guard(conn: Any, body: Callable[[], None]) -> None:
    """Run ``body``; on any failure tell the parent and exit with status 1
    (the parent prints the one-line reason; no traceback on stderr)."""
    try:
        body()
    except BaseException as exc:
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass  # the parent is gone
        raise SystemExit(1) from None
