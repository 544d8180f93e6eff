"""Exact-size reads over a stream's chunks.

A :class:`~llmwire.RecvStream` hands out chunks of whatever size the frames
had; payload decoders need "the next N bytes, here". :class:`ChunkReader`
reads them with :meth:`RecvStream.readinto`, which llmwire's transport
serves by receiving the frames straight into the caller's buffer (chunks
that arrived before the read are copied, once).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ManifestError
from ..transport.base import RecvStream
from .landing import pwrite_all

__all__ = ["ChunkReader", "SpooledStream", "TeeStream"]


class ChunkReader:
    """Reads exact byte counts from a :class:`RecvStream`."""

    def __init__(self, stream: RecvStream) -> None:
        self.stream = stream
        self.consumed = 0  # bytes handed to the caller so far

    async def readinto(self, target: Any) -> None:
        """Fill ``target`` (any writable buffer) completely."""
        out = memoryview(target).cast("B")
        got = await self.stream.readinto(out) if len(out) else 0
        self.consumed += got
        if got < len(out):
            raise ManifestError(f"stream {self.stream.stream_id} ended "
                                f"after {self.consumed} bytes, before its payload did")

    async def read_exact(self, count: int) -> bytearray:
        buffer = bytearray(count)
        await self.readinto(buffer)
        return buffer

    async def expect_end(self) -> None:
        """The payload is complete: the stream must end here, and its digest
        must verify (the transport raises IntegrityError otherwise)."""
        if await self.stream.readinto(bytearray(1)):
            raise ManifestError(f"stream {self.stream.stream_id} carries more bytes than "
                                "its payload declared")


class SpooledStream(RecvStream):
    """The body of a stream that was spooled to a file, read back as a stream
    (``fd`` from offset 0 to ``size``), to be decoded again as if it arrived:
    e.g. ``receive_state_dict(SpooledStream(...), sink)``. Its ``header`` is
    the original stream's; there is no peer to answer."""

    def __init__(self, fd: int, size: int, header: dict[Any, Any], stream_id: int = 0) -> None:
        self.fd, self.size = fd, size
        self.header = {k: v for k, v in header.items() if k != "id"}  # no verdict to send
        self.stream_id, self.offset = stream_id, 0
        self._pos = 0

    async def read(self) -> bytes:
        n = min(4 << 20, self.size - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self._pos)
        if not data:
            raise ManifestError(f"the spooled stream ends at byte {self._pos} of {self.size}")
        self._pos += len(data)
        return data

    async def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        want = min(len(out), self.size - self._pos)
        got = 0
        while got < want:
            n = os.preadv(self.fd, [out[got:want]], self._pos + got)
            if n <= 0:
                raise ManifestError(f"the spooled stream ends at byte {self._pos + got} of "
                                    f"{self.size}")
            got += n
        self._pos += got
        return got

    async def cancel(self, code: int = 10, reason: str = "") -> None:
        self._pos = self.size


class TeeStream(RecvStream):
    """A stream that also writes every byte read from it to ``fd`` (from offset
    0), e.g. to keep what was received in case it must be undone."""

    def __init__(self, inner: RecvStream, fd: int) -> None:
        self.inner, self.fd = inner, fd
        self.header, self.stream_id, self.offset = inner.header, inner.stream_id, inner.offset
        self.transport = inner.transport
        self.written = 0

    def _keep(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        pwrite_all(self.fd, view, self.written)
        self.written += len(view)

    async def read(self) -> Any:
        chunk = await self.inner.read()
        self._keep(chunk)
        return chunk

    async def readinto(self, buffer: Any) -> int:
        got = await self.inner.readinto(buffer)
        self._keep(memoryview(buffer).cast("B")[:got])
        return got

    async def cancel(self, code: int = 10, reason: str = "") -> None:
        await self.inner.cancel(code, reason)
