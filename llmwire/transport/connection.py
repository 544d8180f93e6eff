"""The asyncio adapter: moves bytes between an asyncio transport and the
sans-I/O :class:`~llmwire.protocol.Connection`, and turns events into wake-ups.

It is the same class over TCP, TLS, Unix sockets and the in-memory pair.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Any, Mapping

from ..errors import (
    ConnectionClosed,
    LlmwireError,
    LocalProtocolError,
    StreamCancelled,
)
from ..events import (
    CreditAvailable,
    DataReceived,
    GoAwayReceived,
    HandshakeComplete,
    StreamEnded,
    StreamFailed,
    StreamOpened,
)
from ..frames import ErrorCode
from ..protocol import Connection, ConnectionState, Role, Settings
from .base import BufferLike, RecvStream, SendStream, Transport

__all__ = ["WireTransport", "WireSendStream", "WireRecvStream"]

log = logging.getLogger("llmwire.transport")


def _as_bytes_view(data: BufferLike) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        if not mv.c_contiguous:
            raise LocalProtocolError("send() needs a C-contiguous buffer "
                                     "(e.g. numpy.ascontiguousarray)")
        mv = mv.cast("B")
    return mv


def _as_writable_view(buffer: BufferLike) -> memoryview:
    mv = memoryview(buffer)
    if mv.readonly:
        raise LocalProtocolError("readinto() needs a writable buffer")
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        if not mv.c_contiguous:
            raise LocalProtocolError("readinto() needs a C-contiguous buffer")
        mv = mv.cast("B")
    return mv


class WireSendStream(SendStream):
    """Sending end of a stream on a :class:`WireTransport`."""

    def __init__(self, owner: "WireTransport", stream_id: int) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._error: BaseException | None = None
        self._done = False

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise LocalProtocolError(f"stream {self.stream_id} is already ended")

    async def send(self, data: BufferLike) -> None:
        owner = self._owner
        conn = owner._conn
        mv = _as_bytes_view(data)
        sid = self.stream_id
        while len(mv):
            self._check()
            owner._check_usable()
            credit = conn.send_credit(sid)
            if credit <= 0:
                await owner._wait_change()
                continue
            # Queue every frame the credit allows, then write them with one
            # writelines (one writev on uvloop) instead of one per frame.
            max_frame = conn.max_send_frame
            while credit > 0 and len(mv):
                n = min(credit, len(mv), max_frame)
                conn.send_data(sid, mv[:n])
                mv = mv[n:]
                credit -= n
            owner._flush()
            if owner._write_paused:
                await owner._drain()
        # Nothing of ``data`` may stay referenced once we return.
        await owner._drain()
        self._check()

    async def end(self) -> bytes:
        self._check()
        self._owner._check_usable()
        digest = self._owner._conn.end_stream(self.stream_id)
        self._done = True
        self._owner._send_streams.pop(self.stream_id, None)
        self._owner._flush()
        self._owner._wake()
        await self._owner._drain()
        return digest

    async def cancel(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        if self._done or self._error is not None:
            return
        self._error = StreamCancelled(self.stream_id, code, reason, remote=False)
        self._owner._send_streams.pop(self.stream_id, None)
        if not self._owner.is_closed:
            self._owner._conn.cancel_stream(self.stream_id, code, reason)
            self._owner._flush()
        self._owner._wake()


class WireRecvStream(RecvStream):
    """Receiving end of a stream on a :class:`WireTransport`."""

    def __init__(self, owner: "WireTransport", stream_id: int, header: dict[Any, Any],
                 offset: int) -> None:
        self._owner = owner
        self.transport = owner
        self.stream_id = stream_id
        self.header = header
        self.offset = offset
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.digest: bytes | None = None
        # readinto(): bytes still expected in the posted buffer, and bytes
        # that landed there since it was posted.
        self._posted_left = 0
        self._posted_got = 0

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> memoryview | bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._waiter = self._owner._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        owner = self._owner
        if not owner.is_closed:
            owner._conn.consumed(self.stream_id, len(chunk))
            owner._flush()
        return chunk

    async def readinto(self, buffer: BufferLike) -> int:
        out = _as_writable_view(buffer)
        owner = self._owner
        conn = owner._conn
        sid = self.stream_id
        size = len(out)
        filled = 0
        while filled < size:
            chunks = self._chunks
            if chunks:
                # Chunks that arrived before we posted: copy them.
                chunk = chunks[0]
                n = min(len(chunk), size - filled)
                if n == len(chunk):
                    chunks.popleft()
                    out[filled:filled + n] = chunk
                else:
                    out[filled:filled + n] = chunk[:n]
                    chunks[0] = chunk[n:]
                del chunk
                filled += n
                if not owner.is_closed:
                    conn.consumed(sid, n)
                    owner._flush()
                continue
            if self._error is not None:
                raise self._error
            if self._ended:
                return filled
            # Nothing queued: frames of this stream now land in ``out``.
            conn.post_buffer(sid, out[filled:])
            self._posted_left = size - filled
            self._posted_got = 0
            self._waiter = owner._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                filled += self._posted_got
                self._posted_left = self._posted_got = 0
                if not owner.is_closed:
                    conn.unpost_buffer(sid)
        return filled

    def _landed(self, nbytes: int) -> None:
        """``nbytes`` landed in the posted buffer (credit is already back)."""
        self._posted_got += nbytes
        if self._posted_got >= self._posted_left:
            self._wake()
            # The reader will most likely post its next buffer as soon as it
            # runs: let it, before the loop reads the next frames into
            # receive buffers (which would cost a copy each).
            self._owner._yield_reading()

    async def cancel(self, code: int = ErrorCode.CANCEL, reason: str = "") -> None:
        if self._ended or self._error is not None:
            return
        self._error = StreamCancelled(self.stream_id, code, reason, remote=False)
        owner = self._owner
        owner._recv_streams.pop(self.stream_id, None)
        if not owner.is_closed:
            owner._conn.cancel_stream(self.stream_id, code, reason)
            dropped = sum(len(c) for c in self._chunks)
            owner._conn.consumed(self.stream_id, dropped)
            owner._flush()
        self._chunks.clear()
        self._wake()


class WireTransport(Transport, asyncio.BufferedProtocol):
    """A :class:`Transport` over any asyncio byte transport (TCP, TLS, Unix, memory).

    It is its own asyncio protocol: the event loop calls ``get_buffer`` /
    ``buffer_updated``, which receive straight into the sans-I/O connection's
    buffers. Create it through :func:`llmwire.connect`, :func:`llmwire.serve`,
    :func:`llmwire.memory_pair` and friends.
    """

    def __init__(self, role: Role, secret: bytes | str, settings: Settings | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._conn = Connection(role, secret, settings=settings, now=self._loop.time())
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._incoming: collections.deque[WireRecvStream] = collections.deque()
        self._send_streams: dict[int, WireSendStream] = {}
        self._recv_streams: dict[int, WireRecvStream] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._error: BaseException | None = None
        self._local_close = False
        self._use_writelines = False
        self._sink: bytearray | None = None  # where bytes go once the connection is over
        self._read_yielded = False
        self.peer_name: Any = None
        # A handshake failure nobody awaited must not be logged as "never retrieved".
        self._handshake.add_done_callback(lambda f: f.cancelled() or f.exception())

    # ------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # Pause as soon as anything is queued in user space: send() then waits
        # until the transport holds no reference to the caller's buffer.
        # (TLS transports pause at size >= high, plain ones at size > high.)
        tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(high=1 if tls else 0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.peer_name = transport.get_extra_info("peername")
        self._use_writelines = type(self._loop).__module__.startswith("uvloop") or \
            getattr(transport, "_llmwire_memory", False)
        self._flush()
        self._schedule_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._conn.state in (ConnectionState.ERROR, ConnectionState.CLOSED):
            if self._sink is None:
                self._sink = bytearray(64 * 1024)
            return memoryview(self._sink)
        return self._conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._conn.state in (ConnectionState.ERROR, ConnectionState.CLOSED):
            return
        try:
            self._conn.buffer_updated(nbytes, self._loop.time())
        except LlmwireError as exc:
            self._process()
            self._fatal(exc)
            return
        if self._conn.has_output:  # most reads land mid-payload: nothing to do
            self._process()

    def eof_received(self) -> bool | None:
        try:
            self._conn.receive_eof()
        except LlmwireError as exc:
            self._process()
            self._fatal(exc)
            return None
        self._process()
        self._finish(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn.state not in (ConnectionState.ERROR, ConnectionState.CLOSED):
            if self._local_close:
                self._conn.close()
            else:
                try:
                    self._conn.receive_eof()
                except LlmwireError as err:
                    if exc is not None:
                        err.__cause__ = exc
                    self._error = self._error or err
        self._process()
        self._finish(self._error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ------------------------------------------------------------ plumbing

    def _flush(self) -> None:
        bufs = self._conn.data_to_send()
        t = self._transport
        if not bufs or t is None or t.is_closing():
            return
        if self._use_writelines:
            t.writelines(bufs)
        else:
            for b in bufs:
                t.write(b)

    def _yield_reading(self) -> None:
        """Stop reading until the tasks woken so far have run (one loop turn)."""
        t = self._transport
        if self._read_yielded or t is None or t.is_closing():
            return
        self._read_yielded = True
        t.pause_reading()
        self._loop.call_soon(self._resume_reading)

    def _resume_reading(self) -> None:
        self._read_yielded = False
        t = self._transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    async def _drain(self) -> None:
        while self._write_paused and self._transport is not None \
                and not self._transport.is_closing():
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w
        if self._error is not None and self._transport is not None \
                and self._transport.is_closing():
            self._check_usable()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait_change(self) -> None:
        """Wait until credit, streams or the connection state change."""
        w = self._loop.create_future()
        self._waiters.append(w)
        try:
            await w
        finally:
            if not w.done():  # cancelled: do not leave it for _wake
                try:
                    self._waiters.remove(w)
                except ValueError:
                    pass

    def _check_usable(self) -> None:
        if self._error is not None:
            raise ConnectionClosed("connection failed", self._error)
        if self._closed.done() or self._conn.state in (ConnectionState.CLOSED,
                                                       ConnectionState.ERROR):
            raise ConnectionClosed("connection closed", self._conn.error)

    def _process(self) -> None:
        for ev in self._conn.events_received():
            t = type(ev)
            if t is DataReceived:
                rs = self._recv_streams.get(ev.stream_id)
                if ev.posted:
                    # Already in the reader's buffer: nothing is held here,
                    # so the credit goes straight back.
                    self._conn.consumed(ev.stream_id, len(ev.data))
                    if rs is not None:
                        rs._landed(len(ev.data))
                elif rs is not None:
                    rs._chunks.append(ev.data)
                    rs._wake()
                else:  # cancelled locally meanwhile: give the credit back
                    self._conn.consumed(ev.stream_id, len(ev.data))
            elif t is CreditAvailable:
                self._wake()
            elif t is StreamOpened:
                rs = WireRecvStream(self, ev.stream_id, ev.header, ev.offset)
                self._recv_streams[ev.stream_id] = rs
                self._incoming.append(rs)
                self._wake()
            elif t is StreamEnded:
                rs = self._recv_streams.pop(ev.stream_id, None)
                if rs is not None:
                    rs._ended = True
                    rs.digest = ev.digest
                    rs._wake()
            elif t is StreamFailed:
                rs = self._recv_streams.pop(ev.stream_id, None)
                if rs is not None:
                    rs._error = ev.error
                    rs._wake()
                ss = self._send_streams.pop(ev.stream_id, None)
                if ss is not None:
                    ss._error = ev.error
                if rs is None and ss is None and not isinstance(ev.error, ConnectionClosed):
                    log.debug("stream %d failed after it was dropped: %s", ev.stream_id, ev.error)
                self._wake()
            elif t is HandshakeComplete:
                if not self._handshake.done():
                    self._handshake.set_result(None)
            elif t is GoAwayReceived:
                self._wake()
        self._flush()
        self._schedule_timer()

    def _schedule_timer(self) -> None:
        at = self._conn.get_timer()
        if at is None:
            return
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= at:
                return  # fires earlier anyway; handle_timer re-checks
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._conn.handle_timer(self._loop.time())
        except LlmwireError as exc:
            self._process()
            self._fatal(exc)
            return
        self._process()

    def _fatal(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._flush()  # the ERROR frame, if any
        if self._transport is not None:
            self._transport.close()
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionClosed("closed during handshake"))
        closed = ConnectionClosed("connection closed", exc)
        for rs in list(self._recv_streams.values()):
            if rs._error is None and not rs._ended:
                rs._error = closed
            rs._wake()
        for ss in list(self._send_streams.values()):
            if ss._error is None:
                ss._error = closed
        self._recv_streams.clear()
        self._send_streams.clear()
        self._wake()
        self.resume_writing()
        if not self._closed.done():
            self._closed.set_result(None)

    # ------------------------------------------------------------ public API

    @property
    def connection(self) -> Connection:
        """The sans-I/O connection underneath (for inspection)."""
        return self._conn

    @property
    def is_closed(self) -> bool:
        return self._closed.done()

    @property
    def error(self) -> BaseException | None:
        """The error that ended the connection, if one did."""
        return self._error

    async def wait_handshake(self) -> None:
        """Wait until both sides are authenticated; raises the handshake error."""
        await self._handshake

    async def open_stream(self, header: Mapping[Any, Any] | None = None, *,
                          offset: int = 0) -> WireSendStream:
        await self._handshake
        while True:
            self._check_usable()
            if self._conn.goaway_received is not None or self._conn.goaway_sent:
                raise ConnectionClosed("connection is closing (GOAWAY): no new streams")
            if self._conn.can_open_stream():
                break
            await self._wait_change()
        sid = self._conn.open_stream(header, offset)
        stream = WireSendStream(self, sid)
        self._send_streams[sid] = stream
        self._flush()
        return stream

    async def accept_stream(self) -> WireRecvStream:
        await self._handshake
        while not self._incoming:
            if self._closed.done() or self._conn.state in (ConnectionState.ERROR,
                                                           ConnectionState.CLOSED):
                raise ConnectionClosed("connection closed", self._error)
            if self._conn.goaway_received is not None:
                raise ConnectionClosed("peer sent GOAWAY; no more streams")
            await self._wait_change()
        return self._incoming.popleft()

    async def close(self, reason: str = "") -> None:
        if self._transport is None:
            return
        if not self._closed.done():
            self._local_close = True
            if self._conn.state in (ConnectionState.OPEN, ConnectionState.CLOSING):
                self._conn.goaway(ErrorCode.NO_ERROR, reason)
            self._flush()
            self._transport.close()
        await self._closed

    async def wait_closed(self) -> None:
        """Wait until the connection is over (closed by either side or failed)."""
        await self._closed

    def ping(self) -> None:
        """Send a keepalive ping now (normally timers do it)."""
        self._check_usable()
        self._conn.ping()
        self._flush()
