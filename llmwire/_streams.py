"""The stream state machine: one transition table, its diagram, and the
state and credit each stream carries. No I/O and no clock (the caller's
``now`` is stored, never read). :class:`~llmwire.protocol.Connection` drives
it; docs/protocol.md's diagram is generated from :data:`STREAM_TRANSITIONS`.
"""

from __future__ import annotations

import enum

import xxhash

from .errors import LocalProtocolError, StreamClosedError

__all__ = ["StreamSide", "StreamState", "StreamEvent", "STREAM_TRANSITIONS",
           "stream_state_diagram", "Stream", "transition"]


class StreamSide(enum.Enum):
    """Streams are one-way: the side that opens one sends, the other receives."""

    SENDER = "sender"
    RECEIVER = "receiver"


class StreamState(enum.Enum):
    """States of one stream, as seen by one side."""

    IDLE = "IDLE"
    OPEN = "OPEN"
    CANCEL_SENT = "CANCEL_SENT"  # receiver cancelled; waiting for END/CANCEL
    CLOSED = "CLOSED"            # ended by END
    CANCELLED = "CANCELLED"      # ended by CANCEL


class StreamEvent(enum.Enum):
    """What happens to a stream: a frame sent or received."""

    SEND_OPEN = "send OPEN"
    SEND_DATA = "send DATA"
    SEND_END = "send END"
    SEND_CANCEL = "send CANCEL"
    RECV_OPEN = "recv OPEN"
    RECV_DATA = "recv DATA"
    RECV_END = "recv END"
    RECV_CANCEL = "recv CANCEL"


_S, _R = StreamSide.SENDER, StreamSide.RECEIVER
_St, _Ev = StreamState, StreamEvent

#: THE stream transition table: (side, state, event) -> new state. Anything
#: not in it is a LocalProtocolError (a SEND_* event) or a remote violation
#: (a RECV_* event). CLOSED and CANCELLED streams are forgotten; frames for a
#: forgotten stream are handled by the rules in docs/protocol.md.
STREAM_TRANSITIONS: dict[tuple[StreamSide, StreamState, StreamEvent], StreamState] = {
    (_S, _St.IDLE, _Ev.SEND_OPEN): _St.OPEN,
    (_S, _St.OPEN, _Ev.SEND_DATA): _St.OPEN,
    (_S, _St.OPEN, _Ev.SEND_END): _St.CLOSED,
    (_S, _St.OPEN, _Ev.SEND_CANCEL): _St.CANCELLED,
    (_S, _St.OPEN, _Ev.RECV_CANCEL): _St.CANCELLED,   # answered with CANCEL
    (_R, _St.IDLE, _Ev.RECV_OPEN): _St.OPEN,
    (_R, _St.OPEN, _Ev.RECV_DATA): _St.OPEN,
    (_R, _St.OPEN, _Ev.RECV_END): _St.CLOSED,
    (_R, _St.OPEN, _Ev.RECV_CANCEL): _St.CANCELLED,
    (_R, _St.OPEN, _Ev.SEND_CANCEL): _St.CANCEL_SENT,
    (_R, _St.CANCEL_SENT, _Ev.RECV_DATA): _St.CANCEL_SENT,  # in flight; dropped
    (_R, _St.CANCEL_SENT, _Ev.RECV_END): _St.CANCELLED,
    (_R, _St.CANCEL_SENT, _Ev.RECV_CANCEL): _St.CANCELLED,
}


def stream_state_diagram() -> str:
    """Render :data:`STREAM_TRANSITIONS` as Mermaid state diagrams (one per side)."""
    lines: list[str] = []
    for side in StreamSide:
        lines.append(f"**{side.value}** side:")
        lines.append("")
        lines.append("```mermaid")
        lines.append("stateDiagram-v2")
        for (s, old, ev), new in STREAM_TRANSITIONS.items():
            if s is side:
                lines.append(f"    {old.value} --> {new.value}: {ev.value}")
        lines.append("```")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def transition(st: "Stream", event: StreamEvent) -> None:
    """Move ``st`` along :data:`STREAM_TRANSITIONS`: a SEND_* event the table
    does not allow is the caller's error (LocalProtocolError), a RECV_* one
    the peer's (StreamClosedError)."""
    new = STREAM_TRANSITIONS.get((st.side, st.state, event))
    if new is None:
        msg = f"{event.value} not allowed on {st.side.value} stream {st.id} in {st.state.value}"
        if event.name.startswith("SEND"):
            raise LocalProtocolError(msg)
        raise StreamClosedError(st.id, msg)
    st.state = new


class Stream:
    """One stream's state, credit (sender) or window (receiver), and digest."""

    __slots__ = ("id", "side", "state", "credit", "window", "unacked", "hasher",
                 "length", "progress_at", "posted", "target", "sampled")

    def __init__(self, stream_id: int, side: StreamSide, now: float) -> None:
        self.id = stream_id
        self.side = side
        self.state = StreamState.IDLE
        self.credit = 0        # sender: bytes we may still send
        self.window = 0        # receiver: bytes the peer may still send
        self.unacked = 0       # receiver: consumed bytes not yet granted back
        self.hasher = xxhash.xxh3_128()
        self.length = 0
        self.progress_at = now
        self.posted: memoryview | None = None  # receiver: where DATA lands next
        self.target = 0        # receiver: the window's current size (auto-tuned)
        self.sampled = 0       # receiver: bytes consumed during the window sample
