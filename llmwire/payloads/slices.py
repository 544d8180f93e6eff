"""Slices of a state dict on the wire: their layout, the reused buffers they
are encoded into, and the encoder that fills those buffers ahead of the
consumer.

:class:`SliceEncoder` turns a manifest and the views of its tensors into
the stream body's slices, in order, encoding on the quantization thread pool
a few slices ahead of the consumer, into a fixed pool of reused buffers. A
consumer gives each slice's buffer back with :meth:`SliceEncoder.release`
once it no longer needs the bytes: one stream releases right after
sending; a broadcast releases once every peer has sent it, so the pool size
is how far the fastest peer may run ahead of the slowest.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import numpy as np

from ..errors import NonFiniteError
from ..quant import codec
from ..quant.codec import TensorSpec
from ..tensors import DTYPES
from .manifest import Entry, Manifest

__all__ = ["PIPELINE_DEPTH", "BufferPool", "Encoded", "SliceEncoder", "carve",
           "largest_slice", "slice_wire_bytes"]

#: Slices encoded ahead of (or restored behind) the one on the wire.
PIPELINE_DEPTH = 3


class BufferPool:
    """A few reused byte buffers, each big enough for one slice (``np.empty``
    costs no memory until a buffer is first written)."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.free = [np.empty(size, dtype=np.uint8) for _ in range(count)] if size else []

    def take(self) -> np.ndarray:
        return self.free.pop()

    def give(self, buffer: np.ndarray) -> None:
        self.free.append(buffer)


def carve(buffer: np.ndarray, spec: TensorSpec, count: int) -> tuple[list[np.ndarray], int]:
    """Part arrays laid end to end in ``buffer`` (the wire layout of a slice)."""
    parts, offset = [], 0
    for _, dtype, length in spec.part_layout(count):
        nbytes = length * dtype.itemsize
        parts.append(buffer[offset:offset + nbytes].view(dtype))
        offset += nbytes
    return parts, offset


def slice_wire_bytes(spec: TensorSpec, count: int) -> int:
    return sum(length * dtype.itemsize for _, dtype, length in spec.part_layout(count))


def largest_slice(manifest: Manifest) -> tuple[int, int]:
    """The most wire bytes and the most restored (float32 for deltas) bytes
    any one slice has."""
    wire = restored = 0
    for entry in manifest.entries:
        if entry.spec is None:
            continue
        for start, stop in entry.slices(manifest.slice_elements):
            wire = max(wire, slice_wire_bytes(entry.spec, stop - start))
            restored = max(restored, (stop - start) * DTYPES[entry.spec.dtype].itemsize)
            break  # the first slice is the largest
    return wire, restored


@dataclass(slots=True)
class Encoded:
    """One encoded slice: ``data`` are its wire bytes (a view of a pool
    buffer, or of the tensor's own memory for raw contiguous tensors)."""

    entry: Entry
    start: int
    stop: int
    data: Any
    buffer: np.ndarray | None


def _writes_wire(spec: TensorSpec, view: Any) -> bool:
    """Whether the view's values can be produced straight into the wire buffer
    (raw encoding of values that live elsewhere: a file, a delta)."""
    return spec.format == "raw" and getattr(view, "container", None) in ("file", "delta")


def _encode_job(spec: TensorSpec, view: Any, start: int, stop: int,
                parts: list[np.ndarray], scratch: np.ndarray | None) -> int:
    if _writes_wire(spec, view):
        values = view.slice(start, stop, parts[0])  # straight into the wire buffer
        found = 0
    else:
        values = view.slice(start, stop, scratch)
        found = codec.encode_slice_into(spec, values, parts)
    encoded = getattr(view, "encoded", None)
    if encoded is not None:  # e.g. error feedback: what the receiver will restore
        encoded(spec, start, stop, parts, values)
    return found


class SliceEncoder:
    """Encode the slices of ``manifest`` from ``views``, in stream order.

    Iterate :meth:`slices` (inside ``contextlib.aclosing``, so that encoders
    still running are waited for whatever happens) for :class:`Encoded`
    slices, and :meth:`release` each once its bytes are no longer needed. At most ``buffers`` pool buffers are out at
    once (encoding or held by the consumer); the encoder runs up to
    :data:`PIPELINE_DEPTH` slices ahead of the consumer. A view whose values
    live elsewhere (``view.container`` ``"file"`` or ``"delta"``) gets a
    reused scratch buffer to produce them into; a view with an ``encoded``
    method is told each slice's parts once encoded (on the worker thread).
    ``found`` counts the non-finite values the block formats mapped; with
    ``nonfinite="raise"`` the first one raises :class:`NonFiniteError`.
    """

    def __init__(self, manifest: Manifest, views: Mapping[str, Any], nonfinite: str,
                 buffers: int = PIPELINE_DEPTH) -> None:
        self.manifest = manifest
        self.views = views
        self.nonfinite = nonfinite
        wire_size, restored_size = largest_slice(manifest)
        self._pool = BufferPool(wire_size, max(buffers, PIPELINE_DEPTH))
        scratched = any(getattr(v, "container", None) in ("file", "delta")
                        for v in views.values())
        self._scratch = BufferPool(restored_size if scratched else 0, PIPELINE_DEPTH)
        self._freed = asyncio.Event()
        self.found = 0

    def release(self, item: Encoded) -> None:
        """``item``'s bytes are no longer needed: its buffer goes back to the pool."""
        if item.buffer is not None:
            buffer, item.buffer = item.buffer, None
            self._pool.give(buffer)
            self._freed.set()

    async def slices(self) -> AsyncIterator[Encoded]:
        loop = asyncio.get_running_loop()
        executor = codec._executor()
        jobs = collections.deque((entry, start, stop) for entry in self.manifest.entries
                                 if entry.spec is not None
                                 for start, stop in entry.slices(self.manifest.slice_elements))
        running: collections.deque[tuple[Encoded, Any, np.ndarray | None]] = collections.deque()

        def needs_buffer(entry: Entry) -> bool:
            assert entry.spec is not None
            return not (entry.spec.format == "raw" and self.views[entry.name].flat is not None)

        def submit(entry: Entry, start: int, stop: int) -> None:
            spec, view = entry.spec, self.views[entry.name]
            assert spec is not None
            if not needs_buffer(entry):
                data = view.flat[start:stop].view(np.uint8)  # the tensor's own memory
                running.append((Encoded(entry, start, stop, data, None), None, None))
                return
            buffer = self._pool.take()
            parts, nbytes = carve(buffer, spec, stop - start)
            scratch = (self._scratch.take() if view.container in ("file", "delta")
                       and not _writes_wire(spec, view) else None)
            future = loop.run_in_executor(executor, _encode_job, spec, view, start, stop,
                                          parts, scratch)
            running.append((Encoded(entry, start, stop, buffer[:nbytes], buffer), future,
                            scratch))

        try:
            while jobs or running:
                while jobs and len(running) < PIPELINE_DEPTH and (
                        self._pool.free or not needs_buffer(jobs[0][0])):
                    submit(*jobs.popleft())
                if not running:  # every buffer is held by the consumer: wait for one
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                item, future, scratch = running[0]
                if future is not None:
                    count = await future
                    if scratch is not None:  # the encoder is done with the values
                        self._scratch.give(scratch)
                        running[0] = (item, future, None)
                    if count and self.nonfinite == "raise":
                        raise NonFiniteError(count, item.entry.name)
                    self.found += count
                running.popleft()
                yield item
        finally:
            # encoders still running write into pool buffers: let them finish
            pending = [f for _, f, _ in running if f is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
