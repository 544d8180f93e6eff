"""Shared helpers for the wire tests: a bounded event-loop runner and a
sans-I/O connection pair (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import pytest

from llmwire.protocol import Connection, Role, Settings
from llmwire.transport import new_event_loop


def arun(coro: Coroutine[Any, Any, Any], timeout: float = 15.0) -> Any:
    """Run ``coro`` on a fresh loop (uvloop if installed), never longer than ``timeout``."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        # Tasks a test left behind (fake servers' handlers...) end here.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class Pair:
    """Two sans-I/O connections joined by hand (h11's ConnectionPair idea)."""

    def __init__(self, secret_a: bytes = b"s3cret", secret_b: bytes | None = None,
                 settings_a: Settings | None = None, settings_b: Settings | None = None,
                 handshake: bool = True) -> None:
        self.a = Connection(Role.CLIENT, secret_a, settings=settings_a, nonce=b"A" * 32)
        self.b = Connection(Role.SERVER, secret_b or secret_a, settings=settings_b,
                            nonce=b"B" * 32)
        if handshake:
            self.pump()
            self.a.events_received()
            self.b.events_received()

    def pump(self, rounds: int = 50, now: float | None = None) -> None:
        for _ in range(rounds):
            moved = False
            for x, y in ((self.a, self.b), (self.b, self.a)):
                for buf in x.data_to_send():
                    moved = True
                    y.receive_data(buf, now)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    @staticmethod
    def send_all(conn: Connection, sid: int, data: bytes) -> int:
        """Send as much of ``data`` as credit allows; return bytes sent."""
        mv, sent = memoryview(data), 0
        while sent < len(data):
            n = min(len(data) - sent, conn.send_credit(sid), conn.max_send_frame)
            if n <= 0:
                break
            conn.send_data(sid, mv[sent:sent + n])
            sent += n
        return sent


@pytest.fixture
def pair() -> Pair:
    return Pair()
