"""The sans-I/O llmwire connection: bytes in, events out, bytes to send out.

No sockets, no event loop, no clock: the caller feeds received bytes
(:meth:`Connection.receive_data`, or :meth:`Connection.get_buffer` +
:meth:`Connection.buffer_updated` to receive straight into payload buffers),
sends what :meth:`Connection.data_to_send` returns, passes the current time
``now`` in, and calls :meth:`Connection.handle_timer` at
:meth:`Connection.get_timer`. docs/protocol.md is the spec.

Stream states live in one table, :data:`STREAM_TRANSITIONS`, with the
per-stream state and credit, in :mod:`llmwire._streams` (as h11 keeps its
state machine apart from its connection); the diagram in docs/protocol.md
is generated from it by :func:`stream_state_diagram`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Union

import msgpack

from . import frames as fr
from .errors import (
    AuthenticationError,
    BadPreface,
    ChecksumMismatch,
    ConnectionClosed,
    ConnectionLost,
    FlowControlError,
    FrameTooLarge,
    HandshakeError,
    IntegrityError,
    LlmwireError,
    LocalProtocolError,
    MalformedFrame,
    PeerError,
    PeerTimeout,
    StreamCancelled,
    StreamClosedError,
    StreamTimeout,
    UnknownFrameType,
    VersionMismatch,
)
from .events import (
    CreditAvailable,
    Offset,
    StreamId,
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PingAcknowledged,
    StreamEnded,
    StreamFailed,
    StreamOpened,
)
from .frames import ErrorCode, FrameType
from ._streams import (
    STREAM_TRANSITIONS, StreamEvent, StreamSide, StreamState, stream_state_diagram, transition,
)
from ._streams import Stream as _Stream
from ._window import WindowTuner

_S, _R = StreamSide.SENDER, StreamSide.RECEIVER

__all__ = [
    "PROTOCOL_VERSION", "Role", "ConnectionState", "StreamState", "StreamSide",
    "StreamEvent", "STREAM_TRANSITIONS", "Settings", "Connection",
    "stream_state_diagram",
]

Buffer = Union[bytes, bytearray, memoryview]

# Version 2: a stream's digest is built from its DATA frames' checksums
# (one hashing pass per byte, not two); version 1 hashed the bytes again.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2, 2)
#: Before authentication no frame may be larger than this.
HANDSHAKE_MAX_PAYLOAD = 4096
NONCE_SIZE = 32
MAX_WINDOW = 2**31 - 1
_AUTH_LABEL = b"llmwire-auth"
# Frames whose payload is at least this large are received straight into
# their own buffer (no copy out of the scratch buffer).
_DIRECT_PAYLOAD = 16 * 1024
_SCRATCH_SIZE = 256 * 1024
# Until the peer is authenticated the scratch buffer only needs room for the
# preface and one handshake frame: an unauthenticated peer costs 8 KiB, not 256.
_HANDSHAKE_SCRATCH_SIZE = 8 * 1024
# Credit goes back once 1/_GRANT_DIVISOR of a window has been consumed...
_GRANT_DIVISOR = 2
# ... and once auto-tuning has grown a window (the window, not the link, was
# the limit), every quarter: with halves a window-limited sender idles about
# a quarter of each round trip. Halves cost less CPU where the window is not
# the limit (loopback: fewer CREDIT frames and sender wake-ups).
_GROWN_GRANT_DIVISOR = 4


class Role(enum.Enum):
    """Which end of the connection. Clients open odd stream ids, servers even."""

    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    """Connection states, in order. ERROR and CLOSED are final."""

    PREFACE = "PREFACE"    # waiting for the peer's magic and versions
    HELLO = "HELLO"        # waiting for the peer's HELLO (settings, nonce)
    AUTH = "AUTH"          # waiting for the peer's AUTH proof
    OPEN = "OPEN"          # authenticated: streams flow
    CLOSING = "CLOSING"    # GOAWAY sent or received: no new streams
    CLOSED = "CLOSED"      # ended cleanly (GOAWAY then EOF, or local abort)
    ERROR = "ERROR"        # ended by an error, kept in Connection.error


@dataclass(frozen=True)
class Settings:
    """Local limits and timers. The first five are advertised in HELLO.

    ``window_autotune``: the receive windows (``stream_window``,
    ``connection_window``) grow towards twice the measured bandwidth-delay
    product of what the consumer takes, never beyond ``max_window`` (local
    only, not advertised; docs/protocol.md, "Window auto-tuning").
    """

    max_frame_payload: int = 1024 * 1024
    stream_window: int = 16 * 1024 * 1024
    connection_window: int = 32 * 1024 * 1024
    max_header_size: int = 64 * 1024
    max_streams: int = 256
    keepalive_interval: float | None = 10.0
    idle_timeout: float | None = 30.0
    handshake_timeout: float | None = 10.0
    progress_timeout: float | None = None
    window_autotune: bool = True
    max_window: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_advertised(self.advertised(), LocalProtocolError)
        if type(self.max_window) is not int or not 1024 <= self.max_window <= MAX_WINDOW:
            raise LocalProtocolError(f"setting max_window={self.max_window!r} outside "
                                     f"1024..{MAX_WINDOW}")

    def advertised(self) -> dict[str, int]:
        """The settings sent to the peer in HELLO."""
        d = asdict(self)
        return {k: d[k] for k in _ADVERTISED}


_ADVERTISED = ("max_frame_payload", "stream_window", "connection_window",
               "max_header_size", "max_streams")
_SETTING_RANGES = {
    "max_frame_payload": (1024, fr.MAX_FRAME_PAYLOAD_CAP),
    "stream_window": (1024, MAX_WINDOW),
    "connection_window": (1024, MAX_WINDOW),
    "max_header_size": (64, fr.MAX_FRAME_PAYLOAD_CAP - 8),
    "max_streams": (1, 2**20),
}


def _check_advertised(values: Mapping[str, Any], exc: type[Exception]) -> None:
    for name, (lo, hi) in _SETTING_RANGES.items():
        v = values.get(name)
        if type(v) is not int or not lo <= v <= hi:
            raise exc(f"setting {name}={v!r} outside {lo}..{hi}")


def _grant_threshold(window: int, initial: int) -> int:
    """Consumed bytes after which a window's credit goes back."""
    return window // (_GRANT_DIVISOR if window <= initial else _GROWN_GRANT_DIVISOR)


def _error_code(exc: BaseException) -> int | None:
    """The ERROR code to send for a local detection, or None to send nothing."""
    if isinstance(exc, (BadPreface, VersionMismatch, PeerError, ConnectionLost)):
        return None
    for cls, code in ((FrameTooLarge, ErrorCode.FRAME_SIZE_ERROR),
                      (UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE),
                      (ChecksumMismatch, ErrorCode.CHECKSUM_ERROR),
                      (AuthenticationError, ErrorCode.AUTH_FAILED),
                      (HandshakeError, ErrorCode.HANDSHAKE_ERROR),
                      (FlowControlError, ErrorCode.FLOW_CONTROL_ERROR),
                      (PeerTimeout, ErrorCode.TIMEOUT)):
        if isinstance(exc, cls):
            return code
    return ErrorCode.PROTOCOL_ERROR


class Connection:
    """One end of an llmwire connection, as a pure state machine.

    ``secret`` is the shared secret (bytes, or str encoded as UTF-8); it never
    crosses the wire. ``now`` is the caller's monotonic time in seconds.
    ``nonce`` may be given for reproducible tests (32 bytes); by default it is
    drawn from :mod:`secrets`.

    Any method that detects a connection-level fault raises it after putting
    the connection in ``ConnectionState.ERROR`` (and queueing an ERROR frame
    for the peer where that makes sense). Stream-level faults do not raise:
    they come out as :class:`~llmwire.events.StreamFailed` events.
    """

    def __init__(self, role: Role, secret: bytes | str, *, settings: Settings | None = None,
                 now: float = 0.0, nonce: bytes | None = None,
                 versions: tuple[int, int] = SUPPORTED_VERSIONS) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise LocalProtocolError("secret must be non-empty bytes or str")
        self.role = role
        self.settings = settings or Settings()
        self.state = ConnectionState.PREFACE
        self.error: LlmwireError | None = None
        self.version: int | None = None
        self.peer_settings: dict[str, int] = {}
        self._secret = bytes(secret)
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        if len(self._nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
        self._versions = versions
        self._now = now
        self._created = now
        self._last_recv = now
        self._last_ping = now
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self._preface = fr.encode_preface(*versions)
        self._peer_preface = b""
        self._hello = b""
        self._peer_hello = b""
        self._peer_nonce = b""
        self._auth_sent = False
        self._hello_sent_at = now
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._last_peer_stream = 0
        self._send_streams = 0
        self._recv_streams = 0
        self._conn_credit = 0                       # we may send this much
        self._conn_window = self.settings.connection_window  # peer may send
        self._conn_unacked = 0
        self._tuner = WindowTuner(self.settings.max_window) if self.settings.window_autotune else None
        self._conn_target = self.settings.connection_window  # current connection window
        self.goaway_sent = False
        self.goaway_received: GoAwayReceived | None = None
        # receive machinery
        self._scratch = bytearray(_HANDSHAKE_SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_header: fr.FrameHeader | None = None
        self._filled = 0
        self._expect_large = False
        # The payload being received lands in a posted buffer of this stream
        # (None: in a pool buffer or the scratch buffer).
        self._payload_posted: _Stream | None = None
        # Payload buffers are reused once the consumer has dropped every view
        # of them: fresh 1 MiB buffers cost page faults on every frame.
        self._pool: list[bytearray] = []
        # A prompt consumer needs two or three; one that lets the window fill
        # up (it is decoding, or writing to disk) needs one per frame of the
        # window (the current one, _conn_target): keep that many, so steady
        # streaming allocates nothing.
        self._posting = 0  # streams with a posted buffer
        self._out.append(self._preface)

    # ------------------------------------------------------------ public: output

    def data_to_send(self) -> list[Buffer]:
        """Return (and forget) the buffers to write, in order.

        DATA payloads are the caller's own buffers (memoryviews, not copies):
        they must stay unchanged until written.
        """
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        """Whether events or bytes are waiting to be collected."""
        return bool(self._events) or bool(self._out)

    def events_received(self) -> list[Event]:
        """Return (and forget) the events produced so far."""
        ev, self._events = self._events, []
        return ev

    # ------------------------------------------------------------ public: input

    def receive_data(self, data: Buffer, now: float | None = None) -> None:
        """Feed bytes received from the peer (copies them in)."""
        mv = memoryview(data).cast("B")
        while len(mv):
            buf = self.get_buffer()
            k = min(len(buf), len(mv))
            buf[:k] = mv[:k]
            self.buffer_updated(k, now)
            mv = mv[k:]

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (for ``recv_into``).

        While a large payload is arriving this is the rest of that payload's
        own buffer, so the bytes land where the consumer will read them.
        """
        self._check_not_finished()
        if self._payload_view is not None:
            return self._payload_view[self._filled:]
        if len(self._scratch) < _SCRATCH_SIZE and self.state in (ConnectionState.OPEN,
                                                                  ConnectionState.CLOSING):
            self._grow_scratch()
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < fr.HEADER_SIZE + _DIRECT_PAYLOAD:
            n = self._end - self._start
            self._scratch[:n] = self._scratch[self._start:self._end]
            self._start, self._end = 0, n
        if self._expect_large:
            # After a large frame another is likely: read just its header, so
            # that its payload goes straight into its own buffer.
            want = fr.HEADER_SIZE - (self._end - self._start)
            if want > 0:
                return self._scratch_view[self._end:self._end + want]
        return self._scratch_view[self._end:]

    def _grow_scratch(self) -> None:
        """Authenticated: the full receive buffer, keeping what is still unparsed."""
        grown = bytearray(_SCRATCH_SIZE)
        n = self._end - self._start
        grown[:n] = self._scratch_view[self._start:self._end]
        self._scratch, self._scratch_view = grown, memoryview(grown)
        self._start, self._end = 0, n

    def buffer_updated(self, nbytes: int, now: float | None = None) -> None:
        """``nbytes`` were written into the last :meth:`get_buffer` view."""
        self._check_not_finished()
        if now is not None:
            self._now = now
        if nbytes <= 0:
            return
        self._last_recv = self._now
        try:
            if self._payload_view is not None:
                self._filled += nbytes
                if self._filled == len(self._payload_view):
                    header = self._payload_header
                    payload = self._payload_view
                    posted = self._payload_posted
                    self._payload = self._payload_view = self._payload_header = None
                    self._payload_posted = None
                    self._filled = 0
                    assert header is not None
                    self._handle_frame(header, payload, posted)
                    del payload
                return
            self._end += nbytes
            self._parse()
        except LlmwireError as exc:
            self._fail(exc)
            raise

    def receive_eof(self) -> None:
        """The peer closed its side. Clean after GOAWAY, else ConnectionLost."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            return
        if self._payload_view is not None or self._start != self._end:
            exc: ConnectionClosed = ConnectionLost("connection closed in the middle of a frame")
        elif self.goaway_received is None:
            exc = ConnectionLost("peer closed the connection without GOAWAY")
        else:
            self.state = ConnectionState.CLOSED
            self._fail_all_streams(ConnectionClosed("connection closed by the peer"))
            return
        self._fail(exc)
        raise exc

    # ------------------------------------------------------------ public: timers

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called (None: never)."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            return None
        s = self.settings
        deadlines: list[float] = []
        if self.state in (ConnectionState.OPEN, ConnectionState.CLOSING):
            if s.idle_timeout is not None:
                deadlines.append(self._last_recv + s.idle_timeout)
            if s.keepalive_interval is not None:
                deadlines.append(max(self._last_recv, self._last_ping) + s.keepalive_interval)
            if s.progress_timeout is not None:
                for st in self._streams.values():
                    if st.side is _R and st.state is StreamState.OPEN and st.window > 0:
                        deadlines.append(st.progress_at + s.progress_timeout)
        elif s.handshake_timeout is not None:
            deadlines.append(self._created + s.handshake_timeout)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Send keepalive pings, and fail whatever timed out (PeerTimeout raises)."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            return
        self._now = now
        s = self.settings
        if self.state not in (ConnectionState.OPEN, ConnectionState.CLOSING):
            if s.handshake_timeout is not None and now >= self._created + s.handshake_timeout:
                self._raise(PeerTimeout(f"handshake not complete after {s.handshake_timeout} s"))
            return
        if s.idle_timeout is not None and now >= self._last_recv + s.idle_timeout:
            self._raise(PeerTimeout(f"nothing heard from the peer for {s.idle_timeout} s"))
        if (s.keepalive_interval is not None
                and now >= max(self._last_recv, self._last_ping) + s.keepalive_interval):
            self.ping()
        if s.progress_timeout is not None:
            for st in list(self._streams.values()):
                if (st.side is _R and st.state is StreamState.OPEN and st.window > 0
                        and now >= st.progress_at + s.progress_timeout):
                    err = StreamTimeout(st.id, f"no data for {s.progress_timeout} s")
                    self._cancel_recv(st, ErrorCode.TIMEOUT, "progress timeout")
                    self._events.append(StreamFailed(st.id, err))

    # ------------------------------------------------------------ public: actions

    def open_stream(self, header: Mapping[Any, Any] | None = None,
                    offset: Offset | int = 0) -> StreamId:
        """Open a send stream with a msgpack-able ``header``; return its id."""
        self._require_open()
        if self.goaway_received is not None or self.goaway_sent:
            raise LocalProtocolError("connection is closing (GOAWAY): no new streams")
        if not self.can_open_stream():
            raise LocalProtocolError(
                f"peer allows {self.peer_settings['max_streams']} concurrent streams")
        if not 0 <= offset < 2**64:
            raise LocalProtocolError(f"offset {offset} outside 0..2**64-1")
        try:
            raw = msgpack.packb(dict(header or {}), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"stream header is not msgpack-able: {exc}") from None
        limit = min(self.peer_settings["max_header_size"],
                    self.peer_settings["max_frame_payload"] - 8)
        if len(raw) > limit:
            raise LocalProtocolError(f"stream header of {len(raw)} bytes exceeds the "
                                     f"peer's limit of {limit}")
        sid = self._next_stream_id
        if sid >= 2**32:
            raise LocalProtocolError("stream ids exhausted; open a new connection")
        self._next_stream_id += 2
        st = _Stream(sid, _S, self._now)
        self._transition(st, StreamEvent.SEND_OPEN)
        st.credit = self.peer_settings["stream_window"]
        self._streams[sid] = st
        self._send_streams += 1
        self._emit(FrameType.OPEN, 0, sid, fr.encode_open(offset, raw))
        return StreamId(sid)

    def can_open_stream(self) -> bool:
        """Whether the peer's max_streams leaves room for one more stream."""
        return (self.state is ConnectionState.OPEN and not self.goaway_sent
                and self.goaway_received is None
                and self._send_streams < self.peer_settings["max_streams"])

    def send_credit(self, stream_id: StreamId | int) -> int:
        """Bytes that may be sent now on ``stream_id``: min(stream, connection credit)."""
        st = self._streams.get(stream_id)
        if st is None or st.side is not _S or st.state is not StreamState.OPEN:
            return 0
        return min(st.credit, self._conn_credit)

    @property
    def max_send_frame(self) -> int:
        """Largest DATA payload the peer accepts in one frame."""
        return self.peer_settings.get("max_frame_payload", 0)

    def send_data(self, stream_id: StreamId | int, data: Buffer) -> None:
        """Queue one DATA frame. ``len(data)`` must fit credit and max frame size."""
        self._require_open(closing_ok=True)
        st = self._send_stream(stream_id)
        if not isinstance(data, bytes):
            data = memoryview(data)
            if data.ndim != 1 or data.format not in ("B", "b", "c"):
                data = data.cast("B")
        n = len(data)
        if n == 0:
            return
        if n > self.max_send_frame:
            raise LocalProtocolError(f"{n} bytes exceed the peer's max frame of "
                                     f"{self.max_send_frame}; split the data")
        if n > st.credit or n > self._conn_credit:
            raise LocalProtocolError(f"{n} bytes exceed the credit (stream {st.credit}, "
                                     f"connection {self._conn_credit})")
        self._transition(st, StreamEvent.SEND_DATA)
        st.credit -= n
        self._conn_credit -= n
        st.length += n
        checksum = fr.payload_checksum(data)
        st.hasher.update(fr.digest_record(n, checksum))
        self._out.append(fr.encode_header(FrameType.DATA, 0, stream_id, data, checksum))
        self._out.append(data)

    def end_stream(self, stream_id: StreamId | int) -> bytes:
        """Queue END with the stream's length and digest; return the digest
        (xxh3-128 over each DATA frame's length and checksum, docs/protocol.md)."""
        self._require_open(closing_ok=True)
        st = self._send_stream(stream_id)
        self._transition(st, StreamEvent.SEND_END)
        digest = st.hasher.digest()
        self._emit(FrameType.END, 0, stream_id, fr.encode_end(st.length, digest))
        self._forget(st)
        return digest

    def cancel_stream(self, stream_id: StreamId | int, code: int = ErrorCode.CANCEL,
                      reason: str = "") -> None:
        """Cancel a stream, ours (we stop sending) or the peer's (we refuse the rest).

        Cancelling a stream that is already over does nothing.
        """
        self._require_open(closing_ok=True)
        st = self._streams.get(stream_id)
        if st is None or st.state is not StreamState.OPEN:
            return
        if st.side is _S:
            self._transition(st, StreamEvent.SEND_CANCEL)
            self._emit(FrameType.CANCEL, 0, stream_id, fr.encode_code_reason(code, reason))
            self._forget(st)
        else:
            self._cancel_recv(st, code, reason)

    def consumed(self, stream_id: StreamId | int, nbytes: int) -> None:
        """The consumer has taken ``nbytes`` of ``stream_id``: grant credit back.

        Credit is returned as data is consumed, not as it arrives, so a slow
        consumer slows the sender down. Grants are batched (half a window; a
        quarter once auto-tuning has grown it).
        """
        if nbytes <= 0 or self.state not in (ConnectionState.OPEN, ConnectionState.CLOSING):
            return
        if self._tuner is not None:
            self._tuner.on_consumed(nbytes)
        self._conn_unacked += nbytes
        st = self._streams.get(stream_id)
        if st is not None and st.side is _R and st.state is StreamState.OPEN:
            st.sampled += nbytes
            st.unacked += nbytes
            if st.unacked >= _grant_threshold(st.target, self.settings.stream_window):
                self._grant(st)
        self._maybe_grant_connection()

    def post_buffer(self, stream_id: StreamId | int, buffer: Buffer) -> None:
        """Receive the next DATA payloads of ``stream_id`` straight into ``buffer``.

        ``buffer`` is any writable C-contiguous buffer. Each following DATA
        frame of the stream whose payload fits in the rest of the buffer
        lands there, frame after frame from its start, without a copy; its
        checksum is verified there, and it comes out as
        ``DataReceived(stream_id, view, posted=True)`` where ``view`` is the
        part of ``buffer`` it filled. Credit is not returned for it until
        :meth:`consumed` is called, as for any DATA.

        The posting ends when the buffer is full, when a DATA frame of the
        stream does not fit in the rest (that frame and the ones after it
        arrive in receive buffers, as without posting: copy them, then post
        again), on :meth:`unpost_buffer`, or when the stream ends, fails or
        is cancelled. Once it has ended the connection never writes into
        ``buffer`` again (a payload arriving at that moment is moved to a
        receive buffer). Posting again replaces an earlier posting.

        Raises LocalProtocolError unless ``stream_id`` is an open stream we
        receive on, or if ``buffer`` is read-only or not contiguous.
        """
        self._check_not_finished()
        st = self._streams.get(stream_id)
        if st is None or st.side is not _R or st.state is not StreamState.OPEN:
            raise LocalProtocolError(f"stream {stream_id} is not an open receive stream")
        mv = memoryview(buffer)
        if mv.readonly:
            raise LocalProtocolError("post_buffer() needs a writable buffer")
        if not mv.c_contiguous:
            raise LocalProtocolError("post_buffer() needs a C-contiguous buffer")
        if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
            mv = mv.cast("B")
        self._unpost(st)
        if len(mv):
            st.posted = mv
            self._posting += 1

    def unpost_buffer(self, stream_id: StreamId | int) -> None:
        """End the posting of ``stream_id``, if any (see :meth:`post_buffer`).

        Returns once the connection holds no reference to the buffer.
        Frames already delivered from it stay delivered.
        """
        st = self._streams.get(stream_id)
        if st is not None:
            self._unpost(st)

    def posted_space(self, stream_id: StreamId | int) -> int:
        """Bytes still free in the stream's posted buffer (0: none posted)."""
        st = self._streams.get(stream_id)
        return 0 if st is None or st.posted is None else len(st.posted)

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        """Send a PING (8 bytes); the answer comes as PingAcknowledged."""
        self._require_open(closing_ok=True)
        if len(payload) != 8:
            raise LocalProtocolError("ping payload must be 8 bytes")
        self._last_ping = self._now
        self._emit(FrameType.PING, 0, 0, payload)

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer no new streams will be accepted; existing ones go on."""
        if self.state not in (ConnectionState.OPEN, ConnectionState.CLOSING) or self.goaway_sent:
            return
        self.goaway_sent = True
        self.state = ConnectionState.CLOSING
        self._emit(FrameType.GOAWAY, 0, 0,
                   fr.encode_goaway(self._last_peer_stream, code, reason))

    def abort(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        """End the connection now with an ERROR frame; state becomes CLOSED."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            return
        self._emit(FrameType.ERROR, 0, 0, fr.encode_code_reason(code, reason))
        self.state = ConnectionState.CLOSED
        self._fail_all_streams(ConnectionClosed("connection aborted locally"))

    def close(self) -> None:
        """The caller has closed the byte stream itself (after :meth:`goaway`).

        The state becomes CLOSED; streams not yet over fail with ConnectionClosed.
        """
        if self.state in (ConnectionState.CLOSED, ConnectionState.ERROR):
            return
        self.state = ConnectionState.CLOSED
        self._fail_all_streams(ConnectionClosed("connection closed locally"))

    @property
    def open_streams(self) -> dict[int, StreamState]:
        """Ids and states of the streams not yet over."""
        return {sid: st.state for sid, st in self._streams.items()}

    # ------------------------------------------------------------ internals

    def _check_not_finished(self) -> None:
        if self.state is ConnectionState.ERROR:
            raise ConnectionClosed("connection failed", self.error)
        if self.state is ConnectionState.CLOSED:
            raise ConnectionClosed("connection closed")

    def _require_open(self, closing_ok: bool = False) -> None:
        self._check_not_finished()
        ok = (ConnectionState.OPEN, ConnectionState.CLOSING) if closing_ok else (ConnectionState.OPEN,)
        if self.state not in ok:
            raise LocalProtocolError(f"connection is {self.state.value}, not OPEN")

    def _send_stream(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None or st.side is not _S:
            raise LocalProtocolError(f"stream {stream_id} is not an open send stream")
        return st

    def _transition(self, st: _Stream, event: StreamEvent) -> None:
        transition(st, event)

    def _forget(self, st: _Stream) -> None:
        self._unpost(st)
        if self._streams.pop(st.id, None) is not None:
            if st.side is _S:
                self._send_streams -= 1
            else:
                self._recv_streams -= 1

    def _emit(self, ftype: FrameType, flags: int, stream_id: int, payload: bytes) -> None:
        self._out.append(fr.encode_header(ftype, flags, stream_id, payload))
        if payload:
            self._out.append(payload)

    def _fail(self, exc: LlmwireError) -> None:
        if self.state in (ConnectionState.ERROR, ConnectionState.CLOSED):
            return
        code = _error_code(exc)
        if code is not None and self.state is not ConnectionState.PREFACE:
            self._emit(FrameType.ERROR, 0, 0, fr.encode_code_reason(code, str(exc)))
        self.state = ConnectionState.ERROR
        self.error = exc
        self._fail_all_streams(ConnectionClosed("connection failed", exc))

    def _raise(self, exc: LlmwireError) -> None:
        self._fail(exc)
        raise exc

    def _fail_all_streams(self, exc: Exception) -> None:
        for st in list(self._streams.values()):
            st.posted = None
            self._events.append(StreamFailed(st.id, exc))
        self._posting = 0
        if self._payload_posted is not None:
            # Nothing more lands anywhere; drop the reference to the caller's buffer.
            self._payload = self._payload_view = self._payload_header = None
            self._payload_posted = None
        self._streams.clear()
        self._send_streams = self._recv_streams = 0

    def _grant(self, st: _Stream) -> None:
        inc = st.unacked
        st.unacked = 0
        st.window += inc
        st.progress_at = self._now
        self._emit(FrameType.CREDIT, 0, st.id, fr.encode_credit(inc))

    def _start_window_sample(self) -> None:
        assert self._tuner is not None
        for st in self._streams.values():
            st.sampled = 0
        self.ping(self._tuner.start(self._now))

    def _finish_window_sample(self) -> None:
        """The sample's PING was acknowledged: grow the windows it found
        limiting (credit goes out now)."""
        tuner = self._tuner
        assert tuner is not None
        consumed = tuner.consumed
        factor = tuner.finish(self._now)
        tuner.rest(factor is not None and self._grow_windows(consumed, factor),
                   self._conn_target)

    def _judge_window_sample_early(self) -> None:
        """Mid-sample: grow what already shows as limiting (see _window)."""
        tuner = self._tuner
        assert tuner is not None
        factor = tuner.early(self._now)
        if factor is None or not tuner.may_grow_early(
                factor, min(self.settings.stream_window, self._conn_target)):
            return
        if self._grow_windows(tuner.consumed, factor, early=True):
            tuner.end_early()
            tuner.rest(True, self._conn_target)

    def _grow_windows(self, consumed: int, factor: float, early: bool = False) -> bool:
        """Grow each window whose consumer took enough of it in a sample
        (``consumed`` bytes on the connection, ``factor`` from the tuner;
        ``early``: mid-sample)."""
        tuner = self._tuner
        assert tuner is not None
        grew = False
        for st in self._streams.values():
            if st.side is _R and st.state is StreamState.OPEN:
                new = tuner.grown(st.target, st.sampled, factor, early)
                if new > st.target:
                    grew = True
                    st.unacked += new - st.target
                    st.target = new
                    self._grant(st)
        new = tuner.grown(self._conn_target, consumed, factor, early)
        if new > self._conn_target:
            self._conn_unacked += new - self._conn_target
            self._conn_target = new
            self._grant_connection()
            grew = True
        return grew

    @property
    def receive_windows(self) -> dict[int, int]:
        """Current receive window sizes: stream id -> bytes, and 0 for the
        connection (they grow under ``Settings.window_autotune``)."""
        sizes = {sid: st.target for sid, st in self._streams.items() if st.side is _R}
        sizes[0] = self._conn_target
        return sizes

    def _grant_connection(self) -> None:
        inc = self._conn_unacked
        self._conn_unacked = 0
        self._conn_window += inc
        self._emit(FrameType.CREDIT, 0, 0, fr.encode_credit(inc))

    def _cancel_recv(self, st: _Stream, code: int, reason: str) -> None:
        self._transition(st, StreamEvent.SEND_CANCEL)
        self._unpost(st)
        st.window = 0
        self._emit(FrameType.CANCEL, 0, st.id, fr.encode_code_reason(code, reason))

    def _max_payload(self) -> int:
        if self.state in (ConnectionState.OPEN, ConnectionState.CLOSING):
            return self.settings.max_frame_payload
        return HANDSHAKE_MAX_PAYLOAD

    # ------------------------------------------------------------ parsing

    def _parse(self) -> None:
        buf = self._scratch_view
        while True:
            avail = self._end - self._start
            if self.state is ConnectionState.PREFACE:
                k = min(avail, len(fr.MAGIC))
                if bytes(buf[self._start:self._start + k]) != fr.MAGIC[:k]:
                    raise BadPreface("peer did not send the llmwire magic "
                                     f"(got {bytes(buf[self._start:self._start + k])!r})")
                if avail < fr.PREFACE_SIZE:
                    return
                self._peer_preface = bytes(buf[self._start:self._start + fr.PREFACE_SIZE])
                self._start += fr.PREFACE_SIZE
                self._on_preface()
                continue
            if avail < fr.HEADER_SIZE:
                return
            header = fr.parse_header(buf[self._start:self._start + fr.HEADER_SIZE],
                                     self._max_payload())
            self._check_header(header)
            total = fr.HEADER_SIZE + header.length
            if header.type is FrameType.DATA and self._posting:
                st = self._streams.get(header.stream_id)
                if st is not None and st.posted is not None:
                    if len(st.posted) >= header.length and st.state is StreamState.OPEN:
                        self._parse_posted(st, header, avail)
                        if self.state in (ConnectionState.ERROR, ConnectionState.CLOSED):
                            return
                        if self._payload_view is not None:
                            return
                        continue
                    # Too small for this frame: the posting ends here, the
                    # frame goes the usual way (the consumer copies it).
                    self._unpost(st)
            if avail >= total:
                self._expect_large = False
                lo = self._start + fr.HEADER_SIZE
                payload = bytes(buf[lo:lo + header.length])
                self._start += total
                self._handle_frame(header, payload)
                if self.state in (ConnectionState.ERROR, ConnectionState.CLOSED):
                    return
                continue
            if header.length >= _DIRECT_PAYLOAD:
                # Limits were checked above: allocating is now safe.
                payload_buf = self._payload_buffer(header.length)
                view = memoryview(payload_buf)[:header.length]
                have = avail - fr.HEADER_SIZE
                lo = self._start + fr.HEADER_SIZE
                view[:have] = buf[lo:self._end]
                self._start = self._end = 0
                self._expect_large = True
                self._payload = payload_buf
                self._payload_view = view
                self._payload_header = header
                self._filled = have
            return

    def _parse_posted(self, st: _Stream, header: fr.FrameHeader, avail: int) -> None:
        """Receive the DATA frame whose header starts the scratch buffer into
        the stream's posted buffer."""
        assert st.posted is not None
        target = st.posted[:header.length]
        lo = self._start + fr.HEADER_SIZE
        have = min(avail - fr.HEADER_SIZE, header.length)
        target[:have] = self._scratch_view[lo:lo + have]
        self._start += fr.HEADER_SIZE + have
        if have == header.length:
            self._handle_frame(header, target, st)
            return
        self._start = self._end = 0
        self._expect_large = True
        self._payload = None
        self._payload_view = target
        self._payload_header = header
        self._payload_posted = st
        self._filled = have

    def _unpost(self, st: _Stream) -> None:
        """End ``st``'s posting. A payload still arriving into it moves to a
        pool buffer: the posted buffer is never written again."""
        if st.posted is None:
            return
        st.posted = None
        self._posting -= 1
        if self._payload_posted is st:
            assert self._payload_view is not None and self._payload_header is not None
            length = self._payload_header.length
            buf = self._payload_buffer(length)
            view = memoryview(buf)[:length]
            view[:self._filled] = self._payload_view[:self._filled]
            self._payload = buf
            self._payload_view = view
            self._payload_posted = None

    def _payload_buffer(self, length: int) -> bytearray:
        size = self.settings.max_frame_payload
        pool = self._pool
        for i in range(len(pool)):
            # 2 references: the pool's and getrefcount's argument. Anything
            # more is a consumer still holding a view: leave that one alone.
            if sys.getrefcount(pool[i]) == 2:
                return pool[i]
        buf = bytearray(size)
        if len(pool) < 2 + self._conn_target // self.settings.max_frame_payload:
            pool.append(buf)
        return buf

    def _check_header(self, h: fr.FrameHeader) -> None:
        """Checks that need no payload: state, ids and flow control."""
        if self.state is not ConnectionState.OPEN and self.state is not ConnectionState.CLOSING:
            if h.type is FrameType.ERROR:
                return
            expected = FrameType.HELLO if self.state is ConnectionState.HELLO else FrameType.AUTH
            if h.type is not expected:
                raise HandshakeError(f"{h.type.name} frame before authentication "
                                     f"(expected {expected.name})")
            return
        if h.type in (FrameType.HELLO, FrameType.AUTH):
            raise MalformedFrame(f"{h.type.name} frame after the handshake")
        if h.type is FrameType.DATA:
            if h.length > self._conn_window:
                raise FlowControlError(f"DATA of {h.length} bytes exceeds the connection "
                                       f"credit of {self._conn_window}")
            st = self._streams.get(h.stream_id)
            if st is not None and st.side is _R and h.length > st.window \
                    and st.state is StreamState.OPEN:
                raise FlowControlError(f"DATA of {h.length} bytes on stream {h.stream_id} "
                                       f"exceeds its credit of {st.window}")
        if h.type in (FrameType.DATA, FrameType.END, FrameType.OPEN):
            if self._is_ours(h.stream_id):
                raise MalformedFrame(f"{h.type.name} on stream {h.stream_id}, which only "
                                     "we may send on")
            if h.type is not FrameType.OPEN and h.stream_id > self._last_peer_stream:
                raise MalformedFrame(f"{h.type.name} on stream {h.stream_id}, never opened")

    def _is_ours(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.CLIENT)

    def _handle_frame(self, h: fr.FrameHeader, payload: Buffer,
                      posted: _Stream | None = None) -> None:
        actual = fr.payload_checksum(payload)
        if actual != h.checksum:
            raise ChecksumMismatch(h.stream_id, h.checksum, actual)
        t = h.type
        if t is FrameType.DATA:
            self._on_data(h.stream_id, payload, actual, posted)
        elif t is FrameType.CREDIT:
            self._on_credit(h.stream_id, fr.parse_credit(payload))
        elif t is FrameType.OPEN:
            self._on_open(h.stream_id, payload)
        elif t is FrameType.END:
            self._on_end(h.stream_id, payload)
        elif t is FrameType.CANCEL:
            self._on_cancel(h.stream_id, payload)
        elif t is FrameType.PING:
            if h.flags & fr.Flag.ACK:
                if self._tuner is not None and self._tuner.ping == payload:
                    self._finish_window_sample()
                elif self._tuner is not None and self._tuner.claim_late(bytes(payload),
                                                                         self._now):
                    pass  # its sample ended early: windows grew before this ACK
                else:
                    self._events.append(PingAcknowledged(bytes(payload)))
            else:
                if len(payload) != 8:
                    raise MalformedFrame("PING payload must be 8 bytes")
                self._emit(FrameType.PING, fr.Flag.ACK, 0, bytes(payload))
        elif t is FrameType.GOAWAY:
            last, code, reason = fr.parse_goaway(payload)
            ev = GoAwayReceived(last, code, reason)
            self.goaway_received = ev
            if self.state is ConnectionState.OPEN:
                self.state = ConnectionState.CLOSING
            self._events.append(ev)
        elif t is FrameType.ERROR:
            code, reason = fr.parse_code_reason(payload)
            if code == ErrorCode.AUTH_FAILED:
                raise AuthenticationError(f"the peer rejected our proof: {reason}")
            raise PeerError(code, reason)
        elif t is FrameType.HELLO:
            self._on_hello(bytes(payload))
        elif t is FrameType.AUTH:
            self._on_auth(bytes(payload))

    # --- handshake

    def _on_preface(self) -> None:
        lo, hi = fr.parse_preface(self._peer_preface)
        mine = self._versions
        version = min(mine[1], hi)
        if lo > hi or version < max(mine[0], lo) or not (
                SUPPORTED_VERSIONS[0] <= version <= SUPPORTED_VERSIONS[1]):
            raise VersionMismatch(mine, (lo, hi))
        self.version = version
        self.state = ConnectionState.HELLO
        hello = dict(self.settings.advertised(), role=self.role.value, nonce=self._nonce)
        self._hello = msgpack.packb(hello, use_bin_type=True)
        self._emit(FrameType.HELLO, 0, 0, self._hello)
        self._hello_sent_at = self._now

    def _on_hello(self, payload: bytes) -> None:
        try:
            hello = msgpack.unpackb(payload, raw=False, max_bin_len=NONCE_SIZE,
                                    max_str_len=64, max_map_len=32, max_array_len=0)
        except Exception as exc:  # msgpack raises many types on garbage
            raise HandshakeError(f"HELLO is not a msgpack map: {exc}") from None
        if not isinstance(hello, dict):
            raise HandshakeError("HELLO is not a msgpack map")
        _check_advertised(hello, HandshakeError)
        nonce = hello.get("nonce")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise HandshakeError("HELLO nonce must be 32 bytes")
        peer_role = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        if hello.get("role") != peer_role.value:
            raise HandshakeError(f"peer claims role {hello.get('role')!r}, "
                                 f"expected {peer_role.value!r}")
        if nonce == self._nonce:
            raise HandshakeError("peer echoed our nonce")
        self._peer_hello = payload
        self._peer_nonce = nonce
        self.peer_settings = {k: hello[k] for k in _ADVERTISED}
        self._conn_credit = self.peer_settings["connection_window"]
        self.state = ConnectionState.AUTH
        self._emit(FrameType.AUTH, 0, 0, self._proof(self.role))
        self._auth_sent = True

    def _proof(self, prover: Role) -> bytes:
        if self.role is Role.CLIENT:
            cp, sp, ch, sh = self._preface, self._peer_preface, self._hello, self._peer_hello
        else:
            cp, sp, ch, sh = self._peer_preface, self._preface, self._peer_hello, self._hello
        transcript = hashlib.sha256()
        for part in (cp, sp, ch, sh):
            transcript.update(len(part).to_bytes(4, "big"))
            transcript.update(part)
        msg = (_AUTH_LABEL + b"/%d/" % (self.version or 0) + prover.value.encode()
               + b"/" + transcript.digest())
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def _on_auth(self, payload: bytes) -> None:
        peer_role = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        if not hmac.compare_digest(payload, self._proof(peer_role)):
            raise AuthenticationError("the peer's proof is wrong: the two sides hold "
                                      "different secrets")
        self.state = ConnectionState.OPEN
        if self._tuner is not None:
            # The peer sends AUTH on our HELLO: one round trip, before any
            # data queues up (later samples include queueing delay).
            self._tuner.seed_rtt(self._now - self._hello_sent_at)
        self._last_recv = self._last_ping = self._now
        self._events.append(HandshakeComplete(self.version or 0, dict(self.peer_settings)))

    # --- streams

    def _on_open(self, sid: int, payload: Buffer) -> None:
        if sid <= self._last_peer_stream:
            raise MalformedFrame(f"OPEN reuses stream id {sid} (last was {self._last_peer_stream})")
        if self.goaway_sent:
            # We announced GOAWAY: refuse quietly, the peer may retry elsewhere.
            self._last_peer_stream = sid
            self._emit(FrameType.CANCEL, 0, sid,
                       fr.encode_code_reason(ErrorCode.REFUSED, "connection is closing"))
            st = _Stream(sid, _R, self._now)
            st.state = StreamState.CANCEL_SENT
            self._streams[sid] = st
            self._recv_streams += 1
            return
        if self._recv_streams >= self.settings.max_streams:
            raise FlowControlError(f"peer opened more than max_streams="
                                   f"{self.settings.max_streams} streams")
        offset, raw = fr.parse_open(payload)
        self._last_peer_stream = sid
        st = _Stream(sid, _R, self._now)
        self._transition(st, StreamEvent.RECV_OPEN)
        st.window = st.target = self.settings.stream_window
        self._streams[sid] = st
        self._recv_streams += 1
        if len(raw) > self.settings.max_header_size:
            err: Exception = StreamCancelled(sid, ErrorCode.HEADER_TOO_LARGE,
                                             "stream header too large", remote=False)
            self._cancel_recv(st, ErrorCode.HEADER_TOO_LARGE,
                              f"stream header of {len(raw)} bytes exceeds "
                              f"{self.settings.max_header_size}")
            self._events.append(StreamFailed(sid, err))
            return
        try:
            header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # garbage header: fail the stream only
            header = exc
        if not isinstance(header, dict):
            self._cancel_recv(st, ErrorCode.PROTOCOL_ERROR, "stream header is not a msgpack map")
            self._events.append(StreamFailed(sid, StreamClosedError(
                sid, "stream header is not a msgpack map")))
            return
        self._events.append(StreamOpened(sid, header, offset))

    def _on_data(self, sid: int, payload: Buffer, checksum: int,
                 posted: _Stream | None = None) -> None:
        n = len(payload)
        self._conn_window -= n
        st = self._streams.get(sid)
        if st is None or st.side is not _R:
            # Closed stream: return the connection credit, report, carry on.
            self._conn_unacked += n
            self._maybe_grant_connection()
            self._events.append(StreamFailed(sid, StreamClosedError(
                sid, "DATA on a closed stream")))
            return
        self._transition(st, StreamEvent.RECV_DATA)
        if st.state is StreamState.CANCEL_SENT:
            self._conn_unacked += n
            self._maybe_grant_connection()
            return
        st.window -= n
        st.length += n
        st.progress_at = self._now
        if self._tuner is not None:
            if self._tuner.wants_sample():
                self._start_window_sample()
            elif self._now >= self._tuner.check_at:
                self._judge_window_sample_early()
        st.hasher.update(fr.digest_record(n, checksum))
        if posted is not None:
            assert posted is st and st.posted is not None
            rest = st.posted[n:]
            if len(rest):
                st.posted = rest
            else:
                self._unpost(st)
            if n:
                self._events.append(DataReceived(sid, memoryview(payload), True))
            return
        if st.posted is not None:
            # Frames are delivered in order: a frame that did not land in the
            # posted buffer ends the posting (the consumer copies it, then
            # may post again).
            self._unpost(st)
        if n:
            self._events.append(DataReceived(sid, memoryview(payload)))

    def _maybe_grant_connection(self) -> None:
        if self._conn_unacked >= _grant_threshold(self._conn_target,
                                                  self.settings.connection_window):
            self._grant_connection()

    def _on_end(self, sid: int, payload: Buffer) -> None:
        length, digest = fr.parse_end(payload)
        st = self._streams.get(sid)
        if st is None or st.side is not _R:
            self._events.append(StreamFailed(sid, StreamClosedError(sid, "END on a closed stream")))
            return
        was = st.state
        self._transition(st, StreamEvent.RECV_END)
        self._forget(st)
        if was is StreamState.CANCEL_SENT:
            return
        actual = st.hasher.digest()
        if length != st.length or not hmac.compare_digest(digest, actual):
            self._events.append(StreamFailed(sid, IntegrityError(
                sid, f"{length} bytes/{digest.hex()}", f"{st.length} bytes/{actual.hex()}")))
        else:
            self._events.append(StreamEnded(sid, length, digest))

    def _on_cancel(self, sid: int, payload: Buffer) -> None:
        code, reason = fr.parse_code_reason(payload)
        st = self._streams.get(sid)
        if st is None:
            return  # crossed with our END or CANCEL: nothing to do
        was = st.state
        self._transition(st, StreamEvent.RECV_CANCEL)
        self._forget(st)
        if st.side is _S:
            # The receiver refused the rest; acknowledge so it can forget the id.
            self._emit(FrameType.CANCEL, 0, sid, fr.encode_code_reason(ErrorCode.CANCEL, "ack"))
        elif was is StreamState.CANCEL_SENT:
            return
        self._events.append(StreamFailed(sid, StreamCancelled(sid, code, reason, remote=True)))

    def _on_credit(self, sid: int, inc: int) -> None:
        if sid == 0:
            if self._conn_credit + inc > MAX_WINDOW:
                raise FlowControlError("connection credit overflows 2**31-1")
            self._conn_credit += inc
        else:
            if self._is_ours(sid) is False:
                raise MalformedFrame(f"CREDIT on stream {sid}, which we receive on")
            st = self._streams.get(sid)
            if st is None:
                return  # stream over: late credit is harmless
            if st.credit + inc > MAX_WINDOW:
                raise FlowControlError(f"credit on stream {sid} overflows 2**31-1")
            st.credit += inc
        self._events.append(CreditAvailable(sid, inc))
