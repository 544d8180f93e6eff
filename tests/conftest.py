"""Shared fixtures and helpers for llmwire's tests.

The suite runs twice in CI: once as is (C kernels) and once with
``LLMWIRE_PURE_PYTHON=1`` (NumPy reference). Tests that compare the two
import ``llmwire._native`` directly, so they run in both passes. The wire
tests get a bounded event-loop runner and a sans-I/O connection pair (no
sockets). Test modules import helpers as ``from conftest import ...``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, settings

from llmwire.protocol import Connection, Role, Settings
from llmwire.transport import new_event_loop

settings.register_profile(
    "llmwire",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("llmwire")

try:
    from llmwire import _native as NATIVE
except ImportError:  # pragma: no cover - only where the extension did not build
    NATIVE = None

requires_native = pytest.mark.skipif(NATIVE is None, reason="llmwire._native did not import")

#: numpy storage dtype of each llmwire float dtype (bfloat16 as bit patterns)
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
#: unsigned view of the same width, to compare by bit pattern
UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}


def bits_of(array: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array (uint view of the same width)."""
    array = np.ascontiguousarray(array)
    return array.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[array.itemsize])


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shapes and equal bit patterns, element for element."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.itemsize == expected.itemsize
    a, e = bits_of(actual).reshape(-1), bits_of(expected).reshape(-1)
    bad = np.flatnonzero(a != e)
    assert bad.size == 0, (
        f"{bad.size} of {a.size} differ; first at {bad[:5].tolist()}: "
        f"{[hex(int(v)) for v in a[bad[:5]]]} != {[hex(int(v)) for v in e[bad[:5]]]}")


def as_numpy(tensor) -> np.ndarray:
    """A torch tensor or NumPy array as NumPy (bfloat16 as uint16 bits)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


@pytest.fixture(scope="session")
def native():
    """The C extension module; skips the test where it did not import."""
    if NATIVE is None:
        pytest.skip("llmwire._native did not import")
    return NATIVE


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


def frame_digest(body: bytes, frame: int = 1024 * 1024) -> bytes:
    """The stream digest by its definition in docs/protocol.md (version 2):
    xxh3-128 over (u32 length, u64 xxh3-64) of each DATA frame's payload."""
    h = xxhash.xxh3_128()
    for i in range(0, len(body), frame):
        part = body[i:i + frame]
        h.update(len(part).to_bytes(4, "big") + xxhash.xxh3_64_intdigest(part).to_bytes(8, "big"))
    return h.digest()


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
