"""The abstract interface FL code programs against (docs/transport.md).

A :class:`Transport` is one authenticated connection to one peer. It carries
many concurrent one-way streams; each stream has a small header (a dict) and
a body of bytes delivered in chunks under flow control.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Union

__all__ = ["Transport", "SendStream", "RecvStream", "Message", "BufferLike"]

#: Anything exporting the buffer protocol: bytes, bytearray, memoryview,
#: a C-contiguous NumPy array, an mmap slice...
BufferLike = Union[bytes, bytearray, memoryview, Any]


@dataclass(frozen=True, slots=True)
class Message:
    """A whole small message: the stream header and its body."""

    header: dict[Any, Any]
    payload: bytes
    offset: int = 0
    stream_id: int = field(default=0, compare=False)


class SendStream(abc.ABC):
    """The sending end of one stream."""

    stream_id: int

    @abc.abstractmethod
    async def send(self, data: BufferLike) -> None:
        """Send ``data`` (any buffer; not copied). Returns when the transport no
        longer references it, waiting for flow-control credit as needed.
        Raises the stream's StreamError if the peer cancelled it, or
        ConnectionClosed."""

    @abc.abstractmethod
    async def end(self) -> bytes:
        """End the stream; the peer checks its length and digest (xxh3-128 over
        the frames' checksums, docs/protocol.md). Returns the digest."""

    @abc.abstractmethod
    async def cancel(self, code: int = 10, reason: str = "") -> None:
        """Abort the stream; the receiver gets StreamCancelled. Idempotent."""

    async def __aenter__(self) -> "SendStream":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self.end()
        else:
            await self.cancel(reason=f"sender failed: {exc_type.__name__}")


class RecvStream(abc.ABC):
    """The receiving end of one stream. Iterate it for chunks.

    ``transport`` is the :class:`Transport` the stream arrived on when the
    implementation knows it (llmwire's own do): payload protocols answer the
    sender on it. ``None`` otherwise.
    """

    stream_id: int
    header: dict[Any, Any]
    offset: int
    transport: "Transport | None" = None

    @abc.abstractmethod
    async def read(self) -> memoryview | bytes:
        """Return the next chunk, or ``b""`` once the stream ended and its digest
        matched. Credit goes back to the sender as chunks are taken. Raises
        IntegrityError (digest mismatch), StreamCancelled, StreamTimeout or
        ConnectionClosed."""

    @abc.abstractmethod
    async def cancel(self, code: int = 10, reason: str = "") -> None:
        """Refuse the rest of the stream; buffered chunks are dropped."""

    async def readinto(self, buffer: BufferLike) -> int:
        """Fill ``buffer`` (any writable C-contiguous buffer) with the next
        bytes of the stream; return how many were written: ``len(buffer)``
        in bytes, fewer only if the stream ended (verified) first.

        Credit goes back as for :meth:`read`; failures raise as :meth:`read`
        does. llmwire's own transport receives the frames straight into
        ``buffer`` (no copy) once the chunks already queued are used up; this
        default copies chunks from :meth:`read` and keeps the rest of the
        last one for the next ``readinto``.
        """
        out = memoryview(buffer).cast("B")
        filled = 0
        rest = getattr(self, "_readinto_rest", b"")
        while filled < len(out):
            if not rest:
                rest = memoryview(await self.read()).cast("B")
                if not rest:
                    break
            n = min(len(rest), len(out) - filled)
            out[filled:filled + n] = rest[:n]
            rest = rest[n:]
            filled += n
        self._readinto_rest = rest
        return filled

    async def read_all(self, max_size: int | None = None) -> bytes:
        """Read the whole body into bytes (for small messages).

        Raises LocalProtocolError (after cancelling the stream) if the body
        would exceed ``max_size``.
        """
        from ..errors import LocalProtocolError

        parts = bytearray()
        while True:
            chunk = await self.read()
            if not chunk:
                return bytes(parts)
            if max_size is not None and len(parts) + len(chunk) > max_size:
                await self.cancel(reason="message too large")
                raise LocalProtocolError(f"stream {self.stream_id} is larger than "
                                         f"max_size={max_size}")
            parts += chunk

    def __aiter__(self) -> AsyncIterator[memoryview | bytes]:
        return self._iter_chunks()

    async def _iter_chunks(self) -> AsyncIterator[memoryview | bytes]:
        while True:
            chunk = await self.read()
            if not chunk:
                return
            yield chunk


class Transport(abc.ABC):
    """One authenticated connection: open and accept streams, exchange messages.

    Implementations: llmwire's asyncio transport (TCP, TLS, Unix socket,
    in-memory pair). Custom FL systems may implement it over their own wire.
    """

    @abc.abstractmethod
    async def open_stream(self, header: Mapping[Any, Any] | None = None, *,
                          offset: int = 0) -> SendStream:
        """Open a stream to the peer with a small msgpack-able ``header`` dict;
        ``offset`` tells the receiver where this stream resumes."""

    @abc.abstractmethod
    async def accept_stream(self) -> RecvStream:
        """Wait for the next stream the peer opens. Raises ConnectionClosed once
        the connection is over (or the peer said GOAWAY and none are left)."""

    @abc.abstractmethod
    async def close(self, reason: str = "") -> None:
        """Say GOAWAY and close. Streams not yet over fail with ConnectionClosed."""

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the connection is over, cleanly or not."""

    async def send_message(self, header: Mapping[Any, Any] | None = None,
                           payload: Any = b"") -> None:
        """Send one small message: a stream with ``header`` and body ``payload``."""
        stream = await self.open_stream(header)
        try:
            await stream.send(payload)
        except BaseException:
            await stream.cancel(reason="send_message failed")
            raise
        await stream.end()

    async def receive_message(self, max_size: int | None = 64 * 1024 * 1024) -> Message:
        """Accept the next stream and read it whole (at most ``max_size`` bytes)."""
        stream = await self.accept_stream()
        body = await stream.read_all(max_size)
        return Message(stream.header, body, stream.offset, stream.stream_id)

    def __aiter__(self) -> AsyncIterator[RecvStream]:
        return self._iter_incoming()

    async def _iter_incoming(self) -> AsyncIterator[RecvStream]:
        from ..errors import ConnectionClosed

        while True:
            try:
                stream = await self.accept_stream()
            except ConnectionClosed as exc:
                if exc.cause is None:
                    return
                raise
            yield stream

    async def __aenter__(self) -> "Transport":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()
