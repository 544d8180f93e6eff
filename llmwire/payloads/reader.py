"""Exact-size reads over a stream's chunks.

A :class:`~llmwire.RecvStream` hands out chunks of whatever size the frames
had; payload decoders need "the next N bytes, here". :class:`ChunkReader`
reads them with :meth:`RecvStream.readinto`, which llmwire's transport
serves by receiving the frames straight into the caller's buffer (chunks
that arrived before the read are copied, once).
"""

from __future__ import annotations

from typing import Any

from ..errors import ManifestError
from ..transport.base import RecvStream

__all__ = ["ChunkReader"]


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
