"""Events the sans-I/O :class:`~llmwire.protocol.Connection` emits.

Frozen, slotted dataclasses; the asyncio layer turns them into wake-ups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NewType

#: A stream id: odd when the client opened it, even when the server did.
StreamId = NewType("StreamId", int)
#: A byte offset carried by OPEN (where a resumed stream's bytes belong).
Offset = NewType("Offset", int)

__all__ = [
    "StreamId", "Offset", "Event", "HandshakeComplete", "StreamOpened", "DataReceived", "StreamEnded",
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

    stream_id: StreamId
    header: dict[Any, Any]
    offset: Offset


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes arrived on a stream. Call ``Connection.consumed`` once they are used.

    ``posted``: ``data`` is a view of the buffer given to
    ``Connection.post_buffer`` (the bytes landed there, no copy was made).
    """

    stream_id: StreamId
    data: memoryview
    posted: bool = False


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer ended the stream; length and digest were verified."""

    stream_id: StreamId
    length: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class StreamFailed(Event):
    """A stream (ours or the peer's) failed; ``error`` is a StreamError."""

    stream_id: StreamId
    error: Exception


@dataclass(frozen=True, slots=True)
class CreditAvailable(Event):
    """The peer granted send credit on ``stream_id`` (0: the connection)."""

    stream_id: StreamId
    increment: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged(Event):
    """The peer answered our ping carrying ``payload``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no stream above ``last_stream_id``."""

    last_stream_id: StreamId
    code: int
    reason: str
