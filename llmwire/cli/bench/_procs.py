"""Talking to benchmark child processes over a multiprocessing pipe.

Children send ``(kind, value)`` tuples; a child that fails sends
``("failed", "Type: message")`` and exits with status 1 (:func:`guard`), so
the parent reports the child's error instead of waiting out a timeout; a
child that dies without a word (killed, e.g. by the kernel's OOM killer) is
noticed through its exit status when :func:`expect` is given the process.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

__all__ = ["ChildFailed", "ChildSilent", "expect", "guard", "reap", "raise_client_failure"]


def expect(conn: Any, kind: str, timeout: float = 900.0, process: Any = None,
           name: str = "a benchmark process") -> Any:
    """The value of the next message, which must be ``kind``; RuntimeError
    if the child failed, died or stayed silent for ``timeout`` seconds.
    ``name`` names the child in those errors."""
    deadline = time.monotonic() + timeout
    while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
        if process is not None and not process.is_alive() and not conn.poll(0):
            code = process.exitcode
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise RuntimeError(f"{name} ended before sending {kind!r} ({why}"
                               f"{'; out of memory?' if code == -9 else ''})")
        if time.monotonic() >= deadline:
            raise ChildSilent(f"no {kind!r} from {name} within {timeout:g}s")
    got, value = conn.recv()
    if got == "failed":
        raise ChildFailed(f"{name} failed: {value[0]}", value[1])
    if got != kind:
        raise RuntimeError(f"expected {kind!r} from {name}, got {got!r}")
    return value


class ChildSilent(RuntimeError):
    """A child sent nothing within the time allowed (and is still alive)."""


class ChildFailed(RuntimeError):
    """A child reported a failure; ``collateral`` when it was only the peer
    going away (a lost connection or cancelled stream), which makes the
    other child's failure the one worth reporting."""

    def __init__(self, message: str, collateral: bool = False) -> None:
        super().__init__(message)
        self.collateral = collateral


def guard(conn: Any, body: Callable[[], None]) -> None:
    """Run ``body``; on any failure tell the parent and exit with status 1
    (the parent prints the one-line reason; no traceback on stderr)."""
    from ...errors import ConnectionClosed, StreamCancelled, TransferInterrupted

    try:
        body()
    except BaseException as exc:
        collateral = isinstance(exc, (ConnectionClosed, StreamCancelled, TransferInterrupted,
                                      ConnectionError))
        try:
            text = " ".join(str(exc).split())
            message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            conn.send(("failed", (message, collateral)))
        except OSError:
            pass  # the parent is gone
        raise SystemExit(1) from None


def reap(processes: Iterable[Any], wait: float) -> None:
    """Give each started process up to ``wait`` seconds to end, then
    terminate it (and wait briefly for that); ``None`` and never-started
    processes are skipped."""
    for process in processes:
        if process is None or process.pid is None:
            continue
        process.join(wait)
        if process.is_alive():
            process.terminate()
            process.join(5)


def raise_client_failure(pipes: Iterable[Any], names: Iterable[str]) -> None:
    """When the server only saw a client go (a collateral failure), raise the
    failure a client reported, if one did within a second."""
    for pipe, name in zip(pipes, names):
        if pipe.poll(1.0):
            kind, value = pipe.recv()
            if kind == "failed":
                raise ChildFailed(f"client {name} failed: {value[0]}", value[1])
