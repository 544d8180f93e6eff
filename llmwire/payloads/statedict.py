"""Container streaming: a state dict travels entry by entry, slice by slice.

The sender announces a :class:`~llmwire.payloads.manifest.Manifest`, then
sends each entry's encoded slices. Slices are encoded on the quantization
thread pool a few ahead of the one being sent, into a small pool of reused
buffers, so quantizing overlaps sending and memory stays at a few slices
whatever the model size. Raw entries of contiguous tensors are sent straight
from the tensor's memory, without a copy.

The receiver reads the manifest, lets the sink validate it, then reads each
slice into a reused staging buffer and restores it on the thread pool (into
the sink's target tensor, or through ``sink.write``) while it reads the
next. Raw slices go straight into the target tensor.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from ..errors import LlmwireError, ManifestError, NonFiniteError, PayloadError
from ..quant import codec
from ..quant.codec import MIN_ELEMENTS, TensorSpec, make_spec
from ..quant.formats import get_format
from ..tensors import DTYPES, TensorView, view_tensor
from ..transport.base import RecvStream, Transport
from .manifest import LENGTH_PREFIX, MAX_MANIFEST_BYTES, MAX_SLICE_ELEMENTS, Entry, Manifest
from .reader import ChunkReader
from .sinks import InPlaceSink, MemorySink, SafetensorsSink, StateDictSink

__all__ = ["send_state_dict", "receive_state_dict", "iter_state_dict", "plan_state_dict",
           "TransferResult", "DEFAULT_SLICE_BYTES", "STREAM_KIND"]

STREAM_KIND = "state_dict"
#: Source bytes per slice (before alignment): the unit of encoding and memory.
DEFAULT_SLICE_BYTES = 4 * 1024 * 1024
#: Slices encoded ahead of (or restored behind) the one on the wire.
PIPELINE_DEPTH = 3

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TransferResult:
    """What a state-dict transfer moved."""

    entries: int
    tensor_bytes: int  # the tensors' own size (in their original dtypes)
    wire_bytes: int  # stream body: manifest and encoded entries
    seconds: float
    formats: dict[str, int] = field(default_factory=dict)  # entries per format
    nonfinite: int = 0


def _format_for(name: str, numel: int, fmt: str, overrides: Mapping[str, str],
                min_elements: int) -> str:
    for pattern, chosen in overrides.items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return chosen
    return "raw" if numel < min_elements else fmt


def _storage_key(tensor: Any, view: TensorView) -> tuple[Any, ...]:
    """Two tensors with equal keys are the same values in the same memory."""
    if view.container == "torch":
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), str(tensor.dtype))
    array = view.array
    return (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)


def plan_state_dict(state_dict: Mapping[str, Any], fmt: str = "raw", *,
                    overrides: Mapping[str, str] | None = None,
                    min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                    nested: bool = False, slice_bytes: int = DEFAULT_SLICE_BYTES,
                    metadata: Mapping[str, Any] | None = None
                    ) -> tuple[Manifest, dict[str, TensorView]]:
    """Decide each entry's encoding (see :func:`send_state_dict`) and build
    the manifest; no data is touched."""
    if not isinstance(slice_bytes, int) or not 4096 <= slice_bytes <= MAX_SLICE_ELEMENTS * 4:
        raise PayloadError(f"slice_bytes must be in [4096, {MAX_SLICE_ELEMENTS * 4}]")
    overrides = dict(overrides or {})
    entries: list[Entry] = []
    views: dict[str, TensorView] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise PayloadError(f"state dict keys must be strings, got {name!r}")
        view = view_tensor(tensor)
        key = _storage_key(tensor, view)
        if view.numel and key in first_of:
            entries.append(Entry(name, None, first_of[key]))
            continue
        first_of[key] = name
        chosen = _format_for(name, view.numel, fmt, overrides, min_elements)
        chosen = "raw" if chosen in ("fp32", "none") else chosen
        is_block = get_format(chosen).is_block
        spec = make_spec(view.dtype, view.shape, chosen,
                         block_size=block_size if is_block else None,
                         nested=nested if is_block else False)
        entries.append(Entry(name, spec))
        views[name] = view
    manifest = Manifest(tuple(entries), max(1, slice_bytes // 4), dict(metadata or {}))
    return manifest, views


class _BufferPool:
    """A few reused byte buffers, each big enough for one slice."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.free = [np.empty(size, dtype=np.uint8) for _ in range(count)] if size else []

    def take(self) -> np.ndarray:
        return self.free.pop()

    def give(self, buffer: np.ndarray) -> None:
        self.free.append(buffer)


def _carve(buffer: np.ndarray, spec: TensorSpec, count: int) -> tuple[list[np.ndarray], int]:
    """Part arrays laid end to end in ``buffer`` (the wire layout of a slice)."""
    parts, offset = [], 0
    for _, dtype, length in spec.part_layout(count):
        nbytes = length * dtype.itemsize
        parts.append(buffer[offset:offset + nbytes].view(dtype))
        offset += nbytes
    return parts, offset


def _slice_wire_bytes(spec: TensorSpec, count: int) -> int:
    return sum(length * dtype.itemsize for _, dtype, length in spec.part_layout(count))


def _largest_slice(manifest: Manifest) -> tuple[int, int]:
    """The most wire bytes and the most restored bytes any one slice has."""
    wire = restored = 0
    for entry in manifest.entries:
        if entry.spec is None:
            continue
        for start, stop in entry.slices(manifest.slice_elements):
            wire = max(wire, _slice_wire_bytes(entry.spec, stop - start))
            restored = max(restored, (stop - start) * DTYPES[entry.spec.dtype].itemsize)
            break  # the first slice is the largest
    return wire, restored


async def send_state_dict(transport: Transport, state_dict: Mapping[str, Any],
                          fmt: str = "raw", *, overrides: Mapping[str, str] | None = None,
                          min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                          nested: bool = False, nonfinite: str = "saturate",
                          metadata: Mapping[str, Any] | None = None,
                          slice_bytes: int = DEFAULT_SLICE_BYTES,
                          header: Mapping[str, Any] | None = None,
                          progress: Progress | None = None) -> TransferResult:
    """Stream ``state_dict`` (torch tensors or NumPy arrays) over one stream.

    ``fmt`` is applied to every float tensor (``raw``/``fp32`` sends them as
    they are); ``overrides`` maps names or glob patterns to formats (first
    match wins, e.g. ``{"*.norm.weight": "raw", "lm_head.*": "bf16"}``);
    tensors with fewer than ``min_elements`` elements go raw unless an
    override names them; integer and bool tensors always go raw. Tensors that
    share storage (tied weights) are sent once. ``metadata`` travels in the
    manifest; ``header`` extends the stream header. Returns a
    :class:`TransferResult` once the stream ended.
    """
    if nonfinite not in codec.NONFINITE_POLICIES:
        raise PayloadError(f"nonfinite must be one of {codec.NONFINITE_POLICIES}")
    manifest, views = plan_state_dict(state_dict, fmt, overrides=overrides,
                                      min_elements=min_elements, block_size=block_size,
                                      nested=nested, slice_bytes=slice_bytes,
                                      metadata=metadata)
    started = time.perf_counter()
    stream = await transport.open_stream({**(header or {}), "kind": STREAM_KIND})
    found = 0
    try:
        prefix = manifest.to_bytes()
        await stream.send(prefix)
        found = await _send_entries(stream, manifest, views, nonfinite, progress)
        await stream.end()
    except BaseException as exc:
        await _cancel_quietly(stream, exc)
        raise
    formats = collections.Counter(e.spec.format for e in manifest.entries if e.spec)
    return TransferResult(
        entries=len(manifest.entries),
        tensor_bytes=sum(v.numel * DTYPES[v.dtype].itemsize for v in views.values()),
        wire_bytes=len(prefix) + manifest.body_nbytes,
        seconds=time.perf_counter() - started, formats=dict(formats), nonfinite=found)


async def _cancel_quietly(stream: Any, exc: BaseException) -> None:
    try:
        await asyncio.shield(stream.cancel(reason=f"{type(exc).__name__}: {exc}"[:200]))
    except (LlmwireError, asyncio.CancelledError):
        pass


def _encode_job(spec: TensorSpec, view: TensorView, start: int, stop: int,
                parts: list[np.ndarray]) -> int:
    return codec.encode_slice_into(spec, view.slice(start, stop), parts)


async def _send_entries(stream: Any, manifest: Manifest, views: Mapping[str, TensorView],
                        nonfinite: str, progress: Progress | None) -> int:
    loop = asyncio.get_running_loop()
    executor = codec._executor()
    pool = _BufferPool(_largest_slice(manifest)[0], PIPELINE_DEPTH)
    total, sent, found = manifest.body_nbytes, 0, 0
    work = ((entry, start, stop) for entry in manifest.entries if entry.spec is not None
            for start, stop in entry.slices(manifest.slice_elements))
    in_flight: collections.deque[tuple[Entry, Any, np.ndarray | None, Any]] = collections.deque()

    def submit(entry: Entry, start: int, stop: int) -> None:
        spec, view = entry.spec, views[entry.name]
        assert spec is not None
        if spec.format == "raw" and view.flat is not None:
            data = view.flat[start:stop].view(np.uint8)  # the tensor's own memory
            in_flight.append((entry, None, None, data))
            return
        buffer = pool.take()
        parts, nbytes = _carve(buffer, spec, stop - start)
        future = loop.run_in_executor(executor, _encode_job, spec, view, start, stop, parts)
        in_flight.append((entry, future, buffer, buffer[:nbytes]))

    try:
        for job in work:
            submit(*job)
            if len(in_flight) < PIPELINE_DEPTH:
                continue
            sent, found = await _send_oldest(stream, in_flight, pool, nonfinite, found, sent)
            if progress is not None:
                progress(sent, total)
        while in_flight:
            sent, found = await _send_oldest(stream, in_flight, pool, nonfinite, found, sent)
            if progress is not None:
                progress(sent, total)
    finally:
        # encoders still running write into pool buffers: let them finish
        pending = [f for _, f, _, _ in in_flight if f is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return found


async def _send_oldest(stream: Any, in_flight: collections.deque, pool: _BufferPool,
                       nonfinite: str, found: int, sent: int) -> tuple[int, int]:
    entry, future, buffer, data = in_flight[0]
    if future is not None:
        count = await future
        if count and nonfinite == "raise":
            raise NonFiniteError(count, entry.name)
        found += count
    await stream.send(data)
    in_flight.popleft()
    if buffer is not None:
        pool.give(buffer)
    return sent + len(data), found


def _make_sink(into: Any, container: str, strict: bool, overwrite: bool) -> StateDictSink:
    if into is None:
        return MemorySink(container)
    if isinstance(into, StateDictSink):
        return into
    if isinstance(into, (str, os.PathLike)):
        return SafetensorsSink(into, overwrite=overwrite)
    if isinstance(into, Mapping):
        return InPlaceSink(into, strict=strict)
    raise PayloadError(f"cannot receive into {type(into).__name__}: pass None (memory), "
                       "a mapping of tensors (in place) or a .safetensors path")


async def _accept(source: Transport | RecvStream) -> RecvStream:
    stream = source if isinstance(source, RecvStream) else await source.accept_stream()
    kind = stream.header.get("kind") if isinstance(stream.header, dict) else None
    if kind != STREAM_KIND:
        await stream.cancel(reason="expected a state dict")
        raise ManifestError(f"stream {stream.stream_id} carries {kind!r}, not a state dict")
    return stream


async def iter_state_dict(source: Transport | RecvStream, into: Any = None, *,
                          container: str = "torch", strict: bool = True,
                          overwrite: bool = False, max_bytes: int | None = None,
                          progress: Progress | None = None) -> AsyncIterator[tuple[str, Any]]:
    """Receive a state dict, yielding ``(name, value)`` as each entry is
    restored: the tensor (memory or in place) or the file path.

    Every byte of a yielded entry passed its frame checksum; the stream's
    digest is checked after the last entry, and only then is the result
    committed (a file renamed into place). If that check fails the iterator
    raises :class:`~llmwire.IntegrityError` after the last entry: discard
    what you aggregated. ``into`` as for :func:`receive_state_dict`.
    """
    stream = await _accept(source)
    sink = _make_sink(into, container, strict, overwrite)
    async for item in _receive(stream, sink, max_bytes, progress):
        yield item


async def receive_state_dict(source: Transport | RecvStream, into: Any = None, *,
                             container: str = "torch", strict: bool = True,
                             overwrite: bool = False, max_bytes: int | None = None,
                             progress: Progress | None = None) -> Any:
    """Receive one state dict from ``source`` (a transport: its next stream;
    or a stream already accepted).

    ``into``: ``None`` returns a new dict of tensors (``container`` "torch" or
    "numpy"); a mapping of existing tensors (``model.state_dict()``) is
    filled in place and returned (``strict=False`` accepts a subset); a path
    ending in ``.safetensors`` receives into that file, written at offsets,
    renamed into place once verified, and returns its :class:`~pathlib.Path`
    (``overwrite`` to replace an existing file). ``max_bytes`` refuses
    state dicts whose restored size is larger.
    """
    stream = await _accept(source)
    sink = _make_sink(into, container, strict, overwrite)
    outcome: dict[str, Any] = {}
    async for _ in _receive(stream, sink, max_bytes, progress, outcome):
        pass
    return outcome["result"]


async def _receive(stream: RecvStream, sink: StateDictSink, max_bytes: int | None,
                   progress: Progress | None, outcome: dict[str, Any] | None = None
                   ) -> AsyncIterator[tuple[str, Any]]:
    reader = ChunkReader(stream)
    finished = False
    pending: collections.deque[tuple[Any, np.ndarray, np.ndarray | None]] = collections.deque()
    try:
        (length,) = LENGTH_PREFIX.unpack(await reader.read_exact(LENGTH_PREFIX.size))
        if length > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {length} bytes exceeds {MAX_MANIFEST_BYTES}")
        manifest = Manifest.from_bytes(await reader.read_exact(length))
        restored = sum(e.spec.numel * DTYPES[e.spec.dtype].itemsize
                       for e in manifest.entries if e.spec is not None)
        if max_bytes is not None and restored > max_bytes:
            raise PayloadError(f"the state dict restores to {restored} bytes, over "
                               f"max_bytes={max_bytes}")
        sink.prepare(manifest)
        # np.empty costs no memory until a buffer is first written
        wire_size, restored_size = _largest_slice(manifest)
        staging = _BufferPool(wire_size, PIPELINE_DEPTH)
        outputs = [np.empty(restored_size, np.uint8) for _ in range(PIPELINE_DEPTH)]
        done, total = 0, manifest.body_nbytes
        entries = {e.name: e for e in manifest.entries}
        for entry in manifest.entries:
            if entry.spec is None:
                assert entry.tied_to is not None
                sink.tie(entry, entries[entry.tied_to])
                yield entry.name, sink.entry_done(entry)
                continue
            target = sink.target(entry)
            for start, stop in entry.slices(manifest.slice_elements):
                done += await _receive_slice(reader, entry, start, stop, target, sink,
                                             staging, outputs, pending)
                if progress is not None:
                    progress(done, total)
            while pending:
                await _finish_oldest(pending, staging, outputs)
            yield entry.name, sink.entry_done(entry)
        await reader.expect_end()
        finished = True
        result = sink.commit()
        if outcome is not None:
            outcome["result"] = result
    except OSError as exc:
        raise PayloadError(f"receiving failed: {exc}") from exc
    finally:
        if pending:
            await asyncio.gather(*(f for f, _, _ in pending), return_exceptions=True)
        if not finished:
            sink.abort()
            exc = sys.exc_info()[1]
            if exc is not None:
                await _cancel_quietly(stream, exc)


async def _receive_slice(reader: ChunkReader, entry: Entry, start: int, stop: int,
                         target: np.ndarray | None, sink: StateDictSink, staging: _BufferPool,
                         outputs: list[np.ndarray], pending: collections.deque) -> int:
    spec = entry.spec
    assert spec is not None
    count = stop - start
    if spec.format == "raw" and target is not None:
        await reader.readinto(target[start:stop].view(np.uint8))
        return count * DTYPES[spec.dtype].itemsize
    if not staging.free:
        await _finish_oldest(pending, staging, outputs)
    buffer = staging.take()
    output = outputs.pop() if target is None else None
    parts, nbytes = _carve(buffer, spec, count)
    await reader.readinto(buffer[:nbytes])
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(codec._executor(), _restore_job, spec, parts, target,
                                  output, sink, entry, start, stop)
    pending.append((future, buffer, output))
    return nbytes


def _restore_job(spec: TensorSpec, parts: list[np.ndarray], target: np.ndarray | None,
                 output: np.ndarray | None, sink: StateDictSink, entry: Entry,
                 start: int, stop: int) -> None:
    if target is not None:
        codec.decode_slice(spec, parts, target[start:stop])
        return
    info = DTYPES[spec.dtype]
    if spec.format == "raw":  # the wire bytes are the values
        sink.write(entry, start, parts[0].view(info.numpy))
        return
    assert output is not None
    values = output[:(stop - start) * info.itemsize].view(info.numpy)
    codec.decode_slice(spec, parts, values)
    sink.write(entry, start, values)


async def _finish_oldest(pending: collections.deque, staging: _BufferPool,
                         outputs: list[np.ndarray]) -> None:
    future, buffer, output = pending[0]
    try:
        await future
    finally:
        pending.popleft()
        staging.give(buffer)
        if output is not None:
            outputs.append(output)
