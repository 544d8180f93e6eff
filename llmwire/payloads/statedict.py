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

A resumable stream (``resumable=True``) waits after the manifest for the
receiver's resume point, skips the slices it already holds (encoding them
only into the body digest's chain, :mod:`llmwire.payloads.resume`) and ends
with the chain over the whole body.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from ..errors import (
    ConnectionClosed, FileWriteError, IntegrityError, LlmwireError, LocalProtocolError,
    ManifestError, PayloadError, PayloadRefused, QuantizationError, ResumeMismatch,
    SourceChanged, StreamCancelled, StreamError, TransferInterrupted,
)
from ..frames import ErrorCode
from ..quant import codec
from ..quant.codec import FLOAT_DTYPES, MIN_ELEMENTS, TensorSpec, make_spec
from ..quant.formats import get_format
from ..tensors import DTYPES, TensorView, view_tensor
from ..transport.base import RecvStream, Transport
from .manifest import (
    LENGTH_PREFIX, MAX_MANIFEST_BYTES, MAX_NAME_LENGTH, MAX_SLICE_ELEMENTS, Entry, Manifest,
)
from .reader import ChunkReader
from .resume import (
    CHECKPOINT_BYTES, CHECKPOINT_SECONDS, RESUME_REPLY, TRAILER_BYTES, Chain, ResumePoint,
)
from .filesinks import SafetensorsSink
from .sinks import InPlaceSink, MemorySink, StateDictSink
from .slices import (
    PIPELINE_DEPTH, BufferPool, SliceEncoder, carve, largest_slice, slice_wire_bytes,
)
from .verdict import (
    FAILED_REPLY, QUEUED_REPLY_WAIT, failure_fields, raise_failure, receive_control,
    refuse_stream, reply_quietly, send_control,
)

__all__ = ["send_state_dict", "receive_state_dict", "iter_state_dict", "refuse_state_dict",
           "plan_state_dict", "TransferResult", "DEFAULT_SLICE_BYTES", "STREAM_KIND"]

STREAM_KIND = "state_dict"
#: the receiver's answer once a state dict landed, or failed to
VERDICT_OK, VERDICT_FAILED = "state_dict-ok", FAILED_REPLY[STREAM_KIND]
#: Source bytes per slice (before alignment): the unit of encoding and memory.
DEFAULT_SLICE_BYTES = 4 * 1024 * 1024

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TransferResult:
    """What a state-dict transfer moved."""

    entries: int
    tensor_bytes: int  # the tensors' own size (in their original dtypes)
    wire_bytes: int  # stream body: manifest and encoded entries
    seconds: float
    formats: dict[str, int] = field(default_factory=dict)  # entries per format
    nonfinite: int = 0  # NaN/inf values the block formats mapped (docs/quantization.md)
    #: float tensors the format cannot take (e.g. float64 under nf4), sent as they are
    kept_raw: tuple[str, ...] = ()
    #: the receiver's receipt once it committed (a file sink: its path, bytes, digest)
    receipt: dict[str, Any] = field(default_factory=dict)
    #: body bytes a resumed transfer did not send again (0: sent from the start)
    resumed_from: int = 0


def _format_for(name: str, numel: int, fmt: str, overrides: Mapping[str, str],
                min_elements: int) -> tuple[str, bool]:
    """The format for one tensor, and whether an override chose it by name."""
    for pattern, chosen in overrides.items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return chosen, True
    return ("raw" if numel < min_elements else fmt), False


def _storage_key(tensor: Any, view: TensorView) -> tuple[Any, ...]:
    """Two tensors with equal keys are the same values in the same memory (or file)."""
    own = getattr(view, "storage_key", None)
    if own is not None:
        return own
    if view.container == "torch":
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), str(tensor.dtype))
    array = view.array
    return (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)


def check_entry_name(name: Any) -> None:
    """A name a receiver will take: a non-empty string of at most
    MAX_NAME_LENGTH characters, not ``__metadata__`` (safetensors reserves it)."""
    if not isinstance(name, str):
        raise PayloadError(f"state dict keys must be strings, got {name!r:.100}")
    if not 0 < len(name) <= MAX_NAME_LENGTH:
        raise PayloadError(f"state dict key {name!r:.100} must be 1 to {MAX_NAME_LENGTH} "
                           "characters long")
    if name == "__metadata__":
        raise PayloadError("a tensor named '__metadata__' cannot travel: safetensors "
                           "reserves the name")


def plan_state_dict(state_dict: Mapping[str, Any], fmt: str = "raw", *,
                    overrides: Mapping[str, str] | None = None,
                    min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                    nested: bool = False, slice_bytes: int = DEFAULT_SLICE_BYTES,
                    metadata: Mapping[str, Any] | None = None
                    ) -> tuple[Manifest, dict[str, TensorView]]:
    """Decide each entry's encoding (see :func:`send_state_dict`) and build
    the manifest; no data is touched.

    A float tensor the default format cannot take (``float64`` under any
    quantized format: they take float32, float16 and bfloat16) goes as it is;
    :func:`send_state_dict` lists such names in ``TransferResult.kept_raw``.
    An override that names a format for such a tensor is an error.
    """
    if not isinstance(slice_bytes, int) or not 4096 <= slice_bytes <= MAX_SLICE_ELEMENTS * 4:
        raise PayloadError(f"slice_bytes must be in [4096, {MAX_SLICE_ELEMENTS * 4}]")
    overrides = dict(overrides or {})
    entries: list[Entry] = []
    views: dict[str, TensorView] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for name, tensor in state_dict.items():
        check_entry_name(name)
        view = view_tensor(tensor)
        key = _storage_key(tensor, view)
        if view.numel and key in first_of:
            entries.append(Entry(name, None, first_of[key]))
            continue
        first_of[key] = name
        chosen, named = _format_for(name, view.numel, fmt, overrides, min_elements)
        chosen = "raw" if chosen in ("fp32", "none") else chosen
        if not named and view.dtype not in FLOAT_DTYPES and DTYPES[view.dtype].is_float:
            get_format(chosen)  # a bad format name is still an error
            chosen = "raw"
        if named and chosen != "raw" and not DTYPES[view.dtype].is_float:
            raise QuantizationError(f"{name!r}: an override asks {chosen} for a {view.dtype} "
                                    "tensor; only float tensors are quantized")
        is_block = get_format(chosen).is_block
        try:
            spec = make_spec(view.dtype, view.shape, chosen,
                             block_size=block_size if is_block else None,
                             nested=nested if is_block else False)
        except QuantizationError as exc:
            raise QuantizationError(f"{name!r}: {exc}") from None
        entries.append(Entry(name, spec))
        views[name] = view
    manifest = Manifest(tuple(entries), max(1, slice_bytes // 4), dict(metadata or {}))
    return manifest, views


async def send_state_dict(transport: Transport, state_dict: Mapping[str, Any],
                          fmt: str = "raw", *, overrides: Mapping[str, str] | None = None,
                          min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                          nested: bool = False, nonfinite: str = "saturate",
                          metadata: Mapping[str, Any] | None = None,
                          slice_bytes: int = DEFAULT_SLICE_BYTES,
                          header: Mapping[str, Any] | None = None,
                          progress: Progress | None = None, resumable: bool = False,
                          source: str | None = None, restart: bool = False
                          ) -> TransferResult:
    """Stream ``state_dict`` (torch tensors, NumPy arrays, or the lazily read
    tensors of :func:`~llmwire.open_checkpoint`) over one stream, and wait for
    the receiver's verdict.

    ``fmt`` is applied to every float tensor it can take (``raw``/``fp32``
    sends them as they are; float64 tensors go raw under quantized formats and
    are listed in ``TransferResult.kept_raw``); ``overrides`` maps names or
    glob patterns to formats (first match wins, e.g. ``{"*.norm.weight":
    "raw", "lm_head.*": "bf16"}``); tensors with fewer than ``min_elements``
    elements go raw unless an override names them; integer and bool tensors
    always go raw. Tensors that share storage (tied weights) are sent once.
    ``metadata`` travels in the manifest; ``header`` extends the stream header.

    Returns a :class:`TransferResult` only once the receiver said the state
    dict landed (verified and committed: returned, filled in place, or renamed
    into place), with the receiver's ``receipt``. Raises, with the receiver's
    reason: :class:`~llmwire.PayloadRefused` (it refused the state dict: names,
    shapes or dtypes that do not fit, a target that exists or is busy, a size
    over its limit), ``IntegrityError``, ``FileWriteError`` (its disk failed),
    ``StreamCancelled`` (it stopped reading), ``PayloadError``; a source
    checkpoint that changed while it was read raises ``SourceChanged`` and the
    receiver keeps nothing.

    ``resumable``: if the receiver holds the landed part of an interrupted
    transfer of the same manifest (a resumable sink: a ``.safetensors`` file or
    sharded directory as ``.part``, or the same :class:`InPlaceSink`), continue
    from its last verified slice instead of from zero; ``resumed_from`` in the
    result says where. The slices skipped are encoded again but not sent, and
    the body digest over all of them is checked at the boundary and at the
    end (docs/streaming.md, "Resume"). ``source`` fingerprints the source (an
    opened checkpoint's own :meth:`~llmwire.Checkpoint.fingerprint` by
    default); a source that differs from the interrupted transfer's, or
    whose skipped slices encode differently, raises
    :class:`~llmwire.ResumeMismatch` (a ``SourceChanged``) and the
    receiver keeps what it holds; ``restart`` discards that and starts over.
    """
    if nonfinite not in codec.NONFINITE_POLICIES:
        raise PayloadError(f"nonfinite must be one of {codec.NONFINITE_POLICIES}")
    manifest, views = plan_state_dict(state_dict, fmt, overrides=overrides,
                                      min_elements=min_elements, block_size=block_size,
                                      nested=nested, slice_bytes=slice_bytes,
                                      metadata=metadata)
    started = time.perf_counter()
    if resumable and source is None:
        fingerprint = getattr(state_dict, "fingerprint", None)
        source = fingerprint() if callable(fingerprint) else None
    resume = {"source": source, "restart": bool(restart)} if resumable else None
    wire_bytes, found, receipt = await send_planned(transport, manifest, views, nonfinite,
                                                    header=header, progress=progress,
                                                    resume=resume)
    formats = collections.Counter(e.spec.format for e in manifest.entries if e.spec)
    kept_raw = _kept_raw(manifest, fmt, overrides or {}, min_elements)
    return TransferResult(
        entries=len(manifest.entries),
        tensor_bytes=sum(v.numel * DTYPES[v.dtype].itemsize for v in views.values()),
        wire_bytes=wire_bytes, seconds=time.perf_counter() - started, formats=dict(formats),
        nonfinite=found, kept_raw=kept_raw, receipt=receipt,
        resumed_from=receipt.pop("_resumed_from", 0))


async def send_planned(transport: Transport, manifest: Manifest, views: Mapping[str, Any],
                       nonfinite: str = "saturate", *, header: Mapping[str, Any] | None = None,
                       progress: Progress | None = None,
                       resume: Mapping[str, Any] | None = None
                       ) -> tuple[int, int, dict[str, Any]]:
    """Send a planned state dict (``manifest`` and the views its slices are
    encoded from: :func:`plan_state_dict`, or an update's plan) on one stream
    and wait for the receiver's verdict, as :func:`send_state_dict` does.
    ``resume`` (``{"source", "restart"}``) makes the stream resumable.
    Returns ``(wire bytes, non-finite values mapped, the receiver's receipt)``;
    a resumed transfer's receipt holds ``_resumed_from``."""
    key = uuid.uuid4().hex
    name = header.get("name") if header else None
    extra = {"resume": dict(resume)} if resume is not None else {}
    stream = await transport.open_stream({**(header or {}), **extra, "kind": STREAM_KIND,
                                          "id": key})
    found = 0
    point = ResumePoint()
    try:
        prefix = manifest.to_bytes()
        await stream.send(prefix)
        chain = None
        if resume is not None:
            chain = Chain.start(prefix)
            point = await _resume_point(transport, key, manifest, name, stream.stream_id)
            if point.slices and resume.get("source") is not None \
                    and point.source != resume.get("source"):
                raise ResumeMismatch(name, "the source is not the version the interrupted "
                                           f"transfer sent ({point.offset} bytes of that "
                                           "landed); send with restart (--restart) to start "
                                           "over")
        found = await _send_body(stream, manifest, views, nonfinite, progress, point, chain,
                                 name)
        _check_sources(views)  # before the end makes the stream complete
        if chain is not None:
            await stream.send(chain.value)
        await stream.end()
    except StreamCancelled as exc:
        if not exc.remote:
            raise
        # The receiver stopped us; it sent its verdict first, saying why (a
        # receiver of another kind of stream sends none).
        try:
            verdict = await asyncio.wait_for(_receive_verdict(transport, key),
                                             QUEUED_REPLY_WAIT)
        except (asyncio.TimeoutError, ConnectionClosed, PayloadError):
            raise exc from None
        _raise_verdict(verdict, name, stream.stream_id, exc)
    except BaseException as exc:
        await _cancel_quietly(stream, exc)
        raise
    verdict = await _receive_verdict(transport, key)
    if verdict["kind"] != VERDICT_OK:
        _raise_verdict(verdict, name, stream.stream_id, None)
    receipt = verdict.get("receipt")
    receipt = dict(receipt) if isinstance(receipt, dict) else {}
    if point.offset:
        receipt["_resumed_from"] = point.offset
    wire = len(prefix) + manifest.body_nbytes - point.offset
    return wire + (TRAILER_BYTES if resume is not None else 0), found, receipt


async def _resume_point(transport: Transport, key: str, manifest: Manifest, name: Any,
                        stream_id: int) -> ResumePoint:
    """The receiver's answer to a resumable stream: where to continue."""
    reply = await receive_control(transport, (RESUME_REPLY, VERDICT_FAILED), key,
                                  what="state dict", error=PayloadError)
    if reply["kind"] == VERDICT_FAILED:
        _raise_verdict(reply, name, stream_id, None)
    point = ResumePoint.from_wire(reply)
    if point is None or point.offset != _body_offset(manifest, point.slices):
        raise PayloadError(f"the receiver asked to resume at {reply.get('slices')!r} slices, "
                           f"{reply.get('offset')!r} bytes, which is no slice boundary of "
                           "this state dict")
    return point


def _body_offset(manifest: Manifest, slices: int) -> int | None:
    """Body bytes before slice number ``slices`` (None: there are fewer)."""
    offset = count = 0
    for entry in manifest.entries:
        if entry.spec is None or entry.mode == "zero":
            continue
        for start, stop in entry.slices(manifest.slice_elements):
            if count == slices:
                return offset
            offset += slice_wire_bytes(entry.spec, stop - start)
            count += 1
    return offset if count == slices else None


def _kept_raw(manifest: Manifest, fmt: str, overrides: Mapping[str, str],
              min_elements: int) -> tuple[str, ...]:
    """Float tensors that went raw only because ``fmt`` cannot take their dtype."""
    if fmt in ("raw", "fp32", "none"):
        return ()
    return tuple(
        e.name for e in manifest.entries
        if e.spec is not None and e.spec.format == "raw" and DTYPES[e.spec.dtype].is_float
        and e.spec.dtype not in FLOAT_DTYPES
        and _format_for(e.name, e.spec.numel, fmt, overrides, min_elements) == (fmt, False))


def _check_sources(views: Mapping[str, TensorView]) -> None:
    """Every file a lazily read tensor came from is still the version we read."""
    checked: set[int] = set()
    for view in views.values():
        check = getattr(view, "check_unchanged", None)
        if check is not None and id(view.owner) not in checked:
            checked.add(id(view.owner))
            check()


async def _receive_verdict(transport: Transport, key: str) -> dict[Any, Any]:
    return await receive_control(transport, (VERDICT_OK, VERDICT_FAILED), key,
                                 what="state dict", error=PayloadError)


def _raise_verdict(verdict: dict[Any, Any], name: Any, stream_id: int,
                   cause: BaseException | None) -> None:
    raise_failure(verdict, name=name if isinstance(name, str) else None,
                  stream_id=stream_id, file=False, cause=cause)


async def _cancel_quietly(stream: Any, exc: BaseException) -> None:
    # Only an interruption (the sender stopped or cancelled, a refused resume)
    # leaves what landed good for a resumed transfer, and says so with CANCEL.
    # A source that changed while it was read sent a mix of two versions
    # (INTEGRITY_ERROR), and a sender that refused its own data (NaN under
    # --nonfinite raise...) is no interruption (INTERNAL_ERROR): discard both.
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, ConnectionClosed,
                        ResumeMismatch)):
        code = ErrorCode.CANCEL
    elif isinstance(exc, SourceChanged):
        code = ErrorCode.INTEGRITY_ERROR
    else:
        code = ErrorCode.INTERNAL_ERROR
    try:
        await asyncio.shield(stream.cancel(code, reason=f"{type(exc).__name__}: {exc}"[:200]))
    except (LlmwireError, asyncio.CancelledError):
        pass


async def _send_body(stream: Any, manifest: Manifest, views: Mapping[str, TensorView],
                     nonfinite: str, progress: Progress | None,
                     point: ResumePoint = ResumePoint(), chain: Chain | None = None,
                     name: Any = None) -> int:
    """Send the manifest's slices on ``stream`` from slice ``point.slices``
    (those before it are encoded into ``chain`` only, which must then equal
    the receiver's); return the non-finite count."""
    encoder = SliceEncoder(manifest, views, nonfinite)
    total, sent, index = manifest.body_nbytes, point.offset, 0

    def check_boundary() -> None:
        assert chain is not None
        if chain.value.hex() != point.chain:
            raise ResumeMismatch(name, f"its first {point.offset} bytes as encoded now differ "
                                       "from those the interrupted transfer landed (the "
                                       "source changed); send with restart (--restart) to "
                                       "start over")

    async with contextlib.aclosing(encoder.slices()) as slices:
        async for item in slices:
            if chain is not None:
                if index == point.slices and index:
                    check_boundary()
                chain.add(item.data)
            index += 1
            if index <= point.slices:
                encoder.release(item)
                continue
            await stream.send(item.data)
            encoder.release(item)
            sent += len(item.data)
            if progress is not None:
                progress(sent, total)
    if chain is not None and point.slices and index == point.slices:
        check_boundary()  # every slice had landed: the boundary is the end
    return encoder.found


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
        error = ManifestError(f"stream {stream.stream_id} carries {kind!r}, not a state dict")
        await refuse_stream(stream, error)
        raise error
    return stream


def _answer_on(source: Transport | RecvStream, stream: RecvStream,
               transport: Transport | None) -> Transport | None:
    """The transport to send the verdict on (None: the sender expects none)."""
    if not isinstance(stream.header.get("id"), str):
        return None  # a sender that waits for no verdict
    answer = transport or (source if isinstance(source, Transport) else stream.transport)
    if answer is None:
        raise LocalProtocolError("this stream came from a transport llmwire cannot answer "
                                 "on: pass transport= so the sender gets its verdict")
    return answer


async def refuse_state_dict(stream: RecvStream, error: BaseException, *,
                            transport: Transport | None = None) -> None:
    """Refuse a state-dict stream a dispatcher accepted without reading it:
    tell the sender why (its ``send_state_dict`` raises the matching error,
    e.g. :class:`~llmwire.PayloadRefused`) and cancel the stream."""
    _answer_on(stream, stream, transport)  # LocalProtocolError if there is no way to answer
    await refuse_stream(stream, error, transport=transport)


async def iter_state_dict(source: Transport | RecvStream, into: Any = None, *,
                          container: str = "torch", strict: bool = True,
                          overwrite: bool = False, max_bytes: int | None = None,
                          progress: Progress | None = None,
                          transport: Transport | None = None
                          ) -> AsyncIterator[tuple[str, Any]]:
    """Receive a state dict, yielding ``(name, value)`` as each entry is
    restored: the tensor (memory or in place) or the file path.

    Every byte of a yielded entry passed its frame checksum; the stream's
    digest is checked after the last entry, and only then is the result
    committed (a file renamed into place) and the sender told it landed. If
    that check fails the iterator raises :class:`~llmwire.IntegrityError`
    after the last entry: discard what you aggregated. To leave the loop
    early, iterate inside ``contextlib.aclosing(iter_state_dict(...))``: closing
    the iterator cancels the stream and tells the sender at once (it raises
    ``StreamCancelled``); an iterator merely dropped is closed only when it is
    garbage-collected. ``into`` as for :func:`receive_state_dict`.
    """
    stream = await _accept(source)
    answer = _answer_on(source, stream, transport)
    sink = _make_sink(into, container, strict, overwrite)
    inner = _receive(stream, sink, max_bytes, progress, answer)
    try:
        async for item in inner:
            yield item
    finally:  # leaving early closes it now: the stream is cancelled, the sender told
        await inner.aclose()


async def receive_state_dict(source: Transport | RecvStream, into: Any = None, *,
                             container: str = "torch", strict: bool = True,
                             overwrite: bool = False, max_bytes: int | None = None,
                             progress: Progress | None = None,
                             transport: Transport | None = None) -> Any:
    """Receive one state dict from ``source`` (a transport: its next stream;
    or a stream already accepted).

    ``into``: ``None`` returns a new dict of tensors (``container`` "torch" or
    "numpy"); a mapping of existing tensors (``model.state_dict()``) is
    filled in place and returned (``strict=False`` accepts a subset); a path
    ending in ``.safetensors`` receives into that file, written at offsets,
    read back and checked, renamed into place once verified, and returns its
    :class:`~pathlib.Path` (``overwrite`` to replace an existing file); a
    :class:`StateDictSink` decides itself. ``max_bytes`` refuses state dicts
    whose restored size is larger.

    The sender is told the outcome (landed, or the error and why) before this
    returns or raises. ``transport`` is where to tell it, needed only for a
    ``source`` stream of a custom :class:`~llmwire.Transport` implementation
    (llmwire's own streams know their transport).
    """
    stream = await _accept(source)
    answer = _answer_on(source, stream, transport)
    sink = _make_sink(into, container, strict, overwrite)
    outcome: dict[str, Any] = {}
    async for _ in _receive(stream, sink, max_bytes, progress, answer, outcome):
        pass
    return outcome["result"]


async def _receive(stream: RecvStream, sink: StateDictSink, max_bytes: int | None,
                   progress: Progress | None, answer: Transport | None,
                   outcome: dict[str, Any] | None = None
                   ) -> AsyncIterator[tuple[str, Any]]:
    reader = ChunkReader(stream)
    finished = False
    key = stream.header.get("id")
    offer = stream.header.get("resume")
    offer = offer if isinstance(offer, dict) else None
    pending: collections.deque[tuple[Any, np.ndarray, np.ndarray | None]] = collections.deque()
    chain: Chain | None = None
    received = offset = 0  # body slices (bytes) landed, counting those an earlier transfer did
    try:
        (length,) = LENGTH_PREFIX.unpack(await reader.read_exact(LENGTH_PREFIX.size))
        if length > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {length} bytes exceeds {MAX_MANIFEST_BYTES}")
        raw_manifest = await reader.read_exact(length)
        manifest = Manifest.from_bytes(raw_manifest)
        restored = sum(e.spec.numel * DTYPES[e.spec.dtype].itemsize
                       for e in manifest.entries if e.spec is not None)
        if max_bytes is not None and restored > max_bytes:
            raise PayloadRefused(f"the state dict restores to {restored} bytes, over "
                                 f"max_bytes={max_bytes}")
        if manifest.is_update and not sink.accepts_updates:
            raise PayloadRefused("this is an update (deltas against a reference, "
                                 f"llmwire.rounds) and {type(sink).__name__} takes whole "
                                 "state dicts")
        sink.prepare(manifest)
        point = sink.start(offer)
        if offer is not None:
            chain = (Chain(bytes.fromhex(point.chain)) if point.slices else
                     Chain.start(LENGTH_PREFIX.pack(length) + bytes(raw_manifest)))
            if answer is None:
                raise LocalProtocolError("a resumable state dict needs a transport to answer on")
            await send_control(answer, RESUME_REPLY, id=key, **point.to_wire())
        skip, received, offset = point.slices, point.slices, point.offset
        checkpointed, checkpointed_at = offset, time.monotonic()
        # np.empty costs no memory until a buffer is first written
        wire_size, restored_size = largest_slice(manifest)
        staging = BufferPool(wire_size, PIPELINE_DEPTH)
        outputs = [np.empty(restored_size, np.uint8) for _ in range(PIPELINE_DEPTH)]
        total = manifest.body_nbytes
        entries = {e.name: e for e in manifest.entries}
        index = 0  # slices of the body before the current one
        for entry in manifest.entries:
            if entry.spec is None or entry.mode == "zero":
                if index < skip:
                    continue  # an earlier transfer did it
                if entry.spec is None:
                    assert entry.tied_to is not None
                    sink.tie(entry, entries[entry.tied_to])
                else:
                    sink.unchanged(entry)
                yield entry.name, sink.entry_done(entry)
                continue
            slices = list(entry.slices(manifest.slice_elements))
            if index + len(slices) <= skip and slices:
                index += len(slices)
                continue  # landed in an earlier transfer
            target = sink.target(entry)
            for start, stop in slices:
                if index < skip:
                    index += 1
                    continue
                if chain is not None and offset > checkpointed and (
                        offset - checkpointed >= CHECKPOINT_BYTES
                        or time.monotonic() - checkpointed_at >= CHECKPOINT_SECONDS):
                    while pending:
                        await _finish_oldest(pending, staging, outputs)
                    sink.checkpoint(ResumePoint(received, offset, chain.value.hex()))
                    checkpointed, checkpointed_at = offset, time.monotonic()
                offset += await _receive_slice(reader, entry, start, stop, target, sink,
                                               staging, outputs, pending, chain)
                received += 1
                index += 1
                if progress is not None:
                    progress(offset, total)
            while pending:
                await _finish_oldest(pending, staging, outputs)
            yield entry.name, sink.entry_done(entry)
        if chain is not None:
            trailer = bytes(await reader.read_exact(TRAILER_BYTES))
            if trailer != chain.value:
                raise IntegrityError(stream.stream_id, trailer.hex(), chain.value.hex())
        await reader.expect_end()
        finished = True
        result = sink.commit()
    except BaseException as exc:
        cancelled = await _settle([f for f, _, _ in pending])
        if not finished:
            if offer is not None and chain is not None and _interrupted(exc):
                intact = all(not f.cancelled() and f.exception() is None
                             for f, _, _ in pending) if pending else True
                sink.suspend(ResumePoint(received, offset, chain.value.hex())
                             if intact else None)
            else:
                sink.abort()
        # The verdict goes before the cancel: a sender that sees the cancel
        # finds the reason already queued behind it (QUEUED_REPLY_WAIT).
        if answer is not None and not isinstance(exc, ConnectionClosed):
            await reply_quietly(answer, VERDICT_FAILED, id=key, **failure_fields(exc))
        if not finished:
            await _cancel_quietly(stream, exc)
        if cancelled is not None and not isinstance(exc, asyncio.CancelledError):
            raise cancelled from exc
        if isinstance(exc, OSError) and not isinstance(exc, (PayloadError, ConnectionError,
                                                             TimeoutError)):
            raise FileWriteError(stream.header.get("name"), exc) from exc
        raise
    # Landed: tell the sender (if the connection is gone, what landed stays landed).
    await reply_quietly(answer, VERDICT_OK, id=key, receipt=sink.receipt())
    if outcome is not None:
        outcome["result"] = result


def _interrupted(exc: BaseException) -> bool:
    """A failure that leaves what landed good for a resumed transfer: the
    connection or the sender went away or was stopped (it cancels with
    CANCEL), or someone stopped the receiver."""
    if isinstance(exc, IntegrityError) or isinstance(exc, StreamCancelled) \
            and exc.remote and exc.code != ErrorCode.CANCEL:
        return False
    return isinstance(exc, (ConnectionClosed, StreamError, TransferInterrupted,
                            asyncio.CancelledError, GeneratorExit, ConnectionError))


async def _settle(futures: list[Any]) -> asyncio.CancelledError | None:
    """Wait until restore jobs still running in worker threads are done (they
    write into the sink's target, which is about to be aborted), however many
    times the task is cancelled meanwhile; return the last cancellation, for
    the caller to raise once it has cleaned up."""
    cancelled = None
    while futures:
        try:
            await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
            break
        except asyncio.CancelledError as exc:
            cancelled = exc
            futures = [f for f in futures if not f.done()]
    return cancelled


async def _receive_slice(reader: ChunkReader, entry: Entry, start: int, stop: int,
                         target: np.ndarray | None, sink: StateDictSink, staging: BufferPool,
                         outputs: list[np.ndarray], pending: collections.deque,
                         chain: Chain | None = None) -> int:
    spec = entry.spec
    assert spec is not None
    count = stop - start
    if spec.format == "raw" and target is not None:
        into = target[start:stop].view(np.uint8)
        await reader.readinto(into)
        if chain is not None:
            chain.add(into)
        return count * DTYPES[spec.dtype].itemsize
    if not staging.free:
        await _finish_oldest(pending, staging, outputs)
    buffer = staging.take()
    output = outputs.pop() if target is None else None
    parts, nbytes = carve(buffer, spec, count)
    await reader.readinto(buffer[:nbytes])
    if chain is not None:
        chain.add(buffer[:nbytes])
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


async def _finish_oldest(pending: collections.deque, staging: BufferPool,
                         outputs: list[np.ndarray]) -> None:
    future, buffer, output = pending[0]
    try:
        await future
    finally:
        pending.popleft()
        staging.give(buffer)
        if output is not None:
            outputs.append(output)
