"""Events the sans-I/O :class:`~llmwire.protocol.Connection` emits.

Frozen, slotted dataclasses; the asyncio layer turns them into wake-ups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event", "HandshakeComplete", "StreamOpened", "DataReceived", "StreamEnded",
    "StreamFailed", "CreditAvailable", "PingAcknowledged", "GoAwayReceived",
]


class Event:
    """Base class of all protocol events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """Both sides proved the secret; streams may now be opened."""

    version: int
    peer_settings: dict[str, int]


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened stream ``stream_id`` with ``header`` starting at ``offset``."""

    stream_id: int
    header: dict[Any, Any]
    offset: int


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes arrived on a stream. Call ``Connection.consumed`` once they are used."""

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer ended the stream; length and digest were verified."""

    stream_id: int
    length: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class StreamFailed(Event):
    """A stream (ours or the peer's) failed; ``error`` is a StreamError."""

    stream_id: int
    error: Exception


@dataclass(frozen=True, slots=True)
class CreditAvailable(Event):
    """The peer granted send credit on ``stream_id`` (0: the connection)."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """The peer answered our ping carrying ``payload``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no stream above ``last_stream_id``."""

    last_stream_id: int
    code: int
    reason: str
