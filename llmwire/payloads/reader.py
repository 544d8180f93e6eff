"""Exact-size reads over a stream's chunks.

A :class:`~llmwire.RecvStream` hands out chunks of whatever size the frames
had; payload decoders need "the next N bytes, here". :class:`ChunkReader`
copies from the chunks straight into the caller's buffer (one copy, no
intermediate bytes) and keeps the unread rest of a chunk for the next read.
"""

from __future__ import annotations

from typing import Any

from ..errors import ManifestError
from ..transport.base import RecvStream

__all__ = ["ChunkReader"]

_EMPTY = memoryview(b"")


class ChunkReader:
    """Reads exact byte counts from a :class:`RecvStream`."""

    def __init__(self, stream: RecvStream) -> None:
        self.stream = stream
        self._rest = _EMPTY
        self.consumed = 0  # bytes handed to the caller so far

    async def _next_chunk(self) -> memoryview:
        chunk = await self.stream.read()
        if not chunk:
            raise ManifestError(f"stream {self.stream.stream_id} ended "
                                f"after {self.consumed} bytes, before its payload did")
        return memoryview(chunk).cast("B")

    async def readinto(self, target: Any) -> None:
        """Fill ``target`` (any writable buffer) completely."""
        out = memoryview(target).cast("B")
        filled = 0
        while filled < len(out):
            if not self._rest:
                self._rest = await self._next_chunk()
            n = min(len(self._rest), len(out) - filled)
            out[filled:filled + n] = self._rest[:n]
            # drop the view once used up: the transport reuses a receive
            # buffer only when no view of it remains
            self._rest = self._rest[n:] if n < len(self._rest) else _EMPTY
            filled += n
        self.consumed += filled

    async def read_exact(self, count: int) -> bytearray:
        buffer = bytearray(count)
        await self.readinto(buffer)
        return buffer

    async def expect_end(self) -> None:
        """The payload is complete: the stream must end here, and its digest
        must verify (the transport raises IntegrityError otherwise)."""
        if self._rest or await self.stream.read():
            raise ManifestError(f"stream {self.stream.stream_id} carries more bytes than "
                                "its payload declared")
