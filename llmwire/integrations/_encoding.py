"""Tensors in llmwire's encodings, one self-contained entry each, for engine
adapters that carry them inside their own messages (Flower's records,
NVFlare's DXOs).

An entry (:class:`Packed`) has a ``stype`` naming llmwire, the layout
version and the format, ``"llmwire/1/<format>"`` (``nf4``, ``bf16``,
``raw``, ...); the ``dtype`` and ``shape`` of the tensor it restores into;
and ``data``::

    u32 little-endian n | n bytes of msgpack {"spec": ..., "mode": ...} | parts

``spec`` is the :class:`~llmwire.quant.codec.TensorSpec` header, the parts
follow in wire order (docs/quantization.md). ``mode`` is ``"value"`` (the
tensor's values) or ``"delta"`` (float32 values to add to the tensor: an
update). ``"llmwire/1/zero"`` is a tensor an update leaves unchanged: no
data. Flower's ``Array`` has exactly these four fields; NVFlare carries an
entry as one uint8 array (:func:`to_blob`).

Everything here works tensor by tensor and slice by slice: encoding builds
each ``data`` with one copy of its encoded bytes, decoding writes straight
into the caller's tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import msgpack
import numpy as np
import xxhash

from ..errors import NonFiniteError, PayloadError, TargetMismatch
from ..quant.codec import MIN_ELEMENTS, TensorSpec, decode_slice, encode_slice_into, make_spec
from ..quant.codec import iter_slices
from ..rounds.sinks import MAX_TERM
from ..rounds.update import _format_for, _to_float32, add_into
from ..tensors import DTYPES, TensorView, view_tensor

__all__ = ["LAYOUT", "STYPE_PREFIX", "ZERO_STYPE", "Packed", "encode_array", "encode_state",
           "encode_delta", "apply_update",
           "decode_state", "decode_into", "encode_update", "record_digest", "is_encoded", "Folder",
           "wire_bytes", "to_blob", "from_blob", "is_blob", "tied_names"]

LAYOUT = 1
STYPE_PREFIX = f"llmwire/{LAYOUT}/"
ZERO_STYPE = STYPE_PREFIX + "zero"

_SLICE = 1 << 20  # elements decoded or encoded at once
_MAX_HEADER = 64 * 1024
_BLOB_MAGIC = b"LLMW\x01"


class Packed(NamedTuple):
    """One encoded tensor (the fields of a Flower ``Array``)."""

    dtype: str
    shape: tuple[int, ...]
    stype: str
    data: bytes


Record = Mapping[str, Any]  # names to Packed-like entries (a Flower ArrayRecord, a dict)


def to_blob(entry: Any) -> np.ndarray:
    """An entry as one self-describing uint8 array (for messages that carry
    arrays, not bytes: NVFlare's DXOs)."""
    head = msgpack.packb([entry.stype, entry.dtype, list(entry.shape)])
    return np.frombuffer(b"".join([_BLOB_MAGIC, len(head).to_bytes(4, "little"), head,
                                   entry.data]), np.uint8)


def is_blob(value: Any) -> bool:
    """Whether ``value`` is an entry made by :func:`to_blob` (judged from its bytes)."""
    return (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1
            and value.size >= 9 and value[:5].tobytes() == _BLOB_MAGIC)


def from_blob(value: Any, name: str = "tensor") -> Packed:
    """The entry :func:`to_blob` made (a clear error for anything else)."""
    if not is_blob(value):
        raise PayloadError(f"{name!r}: not an llmwire entry")
    raw = memoryview(np.ascontiguousarray(value)).cast("B")
    n = int.from_bytes(raw[5:9], "little")
    if n > min(_MAX_HEADER, len(raw) - 9):
        raise PayloadError(f"{name!r}: bad llmwire entry header length {n}")
    try:
        stype, dtype, shape = msgpack.unpackb(raw[9:9 + n])
        shape = tuple(int(d) for d in shape)
    except Exception as exc:
        raise PayloadError(f"{name!r}: undecodable llmwire entry header: {exc}") from None
    if not isinstance(stype, str) or not isinstance(dtype, str):
        raise PayloadError(f"{name!r}: bad llmwire entry header")
    return Packed(dtype, shape, stype, bytes(raw[9 + n:]))


def is_encoded(record: Record) -> bool:
    """Whether ``record`` holds llmwire entries (judged from the arrays
    themselves, never from a flag that could be stale)."""
    return any(a.stype.startswith(STYPE_PREFIX) for a in record.values())


def wire_bytes(record: Record) -> int:
    """Bytes of the arrays' data: what the record costs on Flower's wire."""
    return sum(len(a.data) for a in record.values())


def record_digest(record: Record) -> str:
    """xxh3-128 (hex) of every array's name, stype, dtype, shape and data, in
    the record's order."""
    hasher = xxhash.xxh3_128()
    for name, array in record.items():
        hasher.update(msgpack.packb([name, array.stype, array.dtype, list(array.shape)]))
        hasher.update(array.data)
    return hasher.hexdigest()


# -- one array ----------------------------------------------------------------

def _pack(spec: TensorSpec, mode: str, dtype: str, shape: tuple[int, ...],
          source: Callable[[int, int], np.ndarray], name: str) -> Packed:
    """Encode ``source(start, stop)`` (elements held as ``spec.dtype``) into one Array."""
    header = msgpack.packb({"spec": spec.to_header(), "mode": mode})
    layout = spec.part_layout(spec.numel)
    if spec.format == "raw" and mode == "value" and spec.numel:
        whole = source(0, spec.numel)  # a view of the tensor when it is contiguous
        pieces: list[Any] = [memoryview(np.ascontiguousarray(whole)).cast("B")]
    else:
        parts = [np.empty(length, dtype) for _, dtype, length in layout]
        nonfinite = 0
        for start, stop in _slices(spec):
            views = [part[a:b] for part, (a, b) in zip(parts, spec.part_ranges(start, stop))]
            nonfinite += encode_slice_into(spec, source(start, stop), views)
        if nonfinite:
            raise NonFiniteError(nonfinite, name)
        pieces = [memoryview(part).cast("B") for part in parts]
    data = b"".join([len(header).to_bytes(4, "little"), header, *pieces])
    return Packed(dtype, tuple(shape), STYPE_PREFIX + spec.format, data)


def _unpack(array: Any, name: str) -> tuple[TensorSpec, str, list[np.ndarray]]:
    """Validate an llmwire entry; return its spec, mode and part views."""
    if not isinstance(getattr(array, "stype", None), str) \
            or not array.stype.startswith(STYPE_PREFIX):
        raise PayloadError(f"{name!r}: not an llmwire array (stype {getattr(array, 'stype', None)!r})")
    data = memoryview(array.data)
    if len(data) < 4:
        raise PayloadError(f"{name!r}: truncated llmwire array")
    n = int.from_bytes(data[:4], "little")
    if n > min(_MAX_HEADER, len(data) - 4):
        raise PayloadError(f"{name!r}: bad llmwire array header length {n}")
    try:
        header = msgpack.unpackb(data[4:4 + n])
    except Exception as exc:
        raise PayloadError(f"{name!r}: undecodable llmwire array header: {exc}") from None
    if not isinstance(header, dict) or header.get("mode") not in ("value", "delta"):
        raise PayloadError(f"{name!r}: bad llmwire array header {header!r:.200}")
    spec = TensorSpec.from_header(header.get("spec"))
    mode = header["mode"]
    if STYPE_PREFIX + spec.format != array.stype or spec.shape != tuple(array.shape):
        raise PayloadError(f"{name!r}: the array says {array.stype} {tuple(array.shape)}, its "
                           f"header {spec.format} {spec.shape}")
    if array.dtype not in DTYPES:
        raise PayloadError(f"{name!r}: unknown dtype {array.dtype!r}")
    if mode == "value" and spec.dtype != array.dtype:
        raise PayloadError(f"{name!r}: values encoded as {spec.dtype} for a {array.dtype} tensor")
    if mode == "delta" and (spec.dtype != "float32" or not DTYPES[array.dtype].is_float):
        raise PayloadError(f"{name!r}: a delta must be float32 for a float tensor")
    parts, offset = [], 4 + n
    for part_name, dtype, length in spec.part_layout(spec.numel):
        size = dtype.itemsize * length
        if offset + size > len(data):
            raise PayloadError(f"{name!r}: truncated llmwire array (part {part_name!r})")
        parts.append(np.frombuffer(data[offset:offset + size], np.uint8).view(dtype))
        offset += size
    if offset != len(data):
        raise PayloadError(f"{name!r}: {len(data) - offset} bytes after the last part")
    return spec, mode, parts


def _restored(spec: TensorSpec, parts: list[np.ndarray], start: int, stop: int,
              out: np.ndarray) -> np.ndarray:
    """Decode elements ``[start, stop)`` (``start`` aligned) into ``out``
    (``spec.dtype``, bfloat16 as uint16 bits)."""
    views = [part[a:b] for part, (a, b) in zip(parts, spec.part_ranges(start, stop))]
    decode_slice(spec, views, out)
    return out


def _slices(spec: TensorSpec) -> Iterator[tuple[int, int]]:
    """Slices of ``_SLICE`` elements: every alignment (a power of two, at most
    ``_SLICE``) divides it, so these start aligned for any spec of the tensor."""
    return iter_slices(spec.numel, spec.alignment, _SLICE)


def encode_array(tensor: Any, fmt: str = "nf4", *, name: str = "tensor",
                 block_size: int | None = None, nested: bool = False) -> Packed:
    """One tensor's values as an llmwire entry in ``fmt`` (integer and bool
    tensors go as they are). :class:`~llmwire.NonFiniteError` for NaN/inf in a
    block format."""
    view = view_tensor(tensor)
    spec = make_spec(view.dtype, view.shape, _format_for(name, view.numel, fmt, {}, 0),
                     block_size=block_size, nested=nested)
    return _pack(spec, "value", view.dtype, view.shape, view.slice, name)


# -- records ------------------------------------------------------------------

def encode_state(state: Mapping[str, Any], fmt: str = "bf16", *,
                 min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                 nested: bool = False) -> dict[str, Packed]:
    """A state dict's values as llmwire entries by name, tensor by tensor
    (tensors under ``min_elements`` as they are)."""
    record: dict[str, Packed] = {}
    for name, tensor in state.items():
        view = view_tensor(tensor)
        chosen = _format_for(name, view.numel, fmt, {}, min_elements)
        block = _block(chosen, block_size)
        spec = make_spec(view.dtype, view.shape, chosen, block_size=block,
                         nested=nested and block is not None)
        record[name] = _pack(spec, "value", view.dtype, view.shape, view.slice, name)
    return record


def _block(fmt: str, block_size: int | None) -> int | None:
    from ..quant.formats import get_format

    return block_size if get_format(fmt).is_block else None


def _check_names(record: Record, state: Mapping[str, Any]) -> None:
    if set(record) != set(state):
        extra, missing = sorted(set(record) - set(state)), sorted(set(state) - set(record))
        raise TargetMismatch(f"the record does not hold the state's tensors exactly "
                             f"(unknown {extra[:5]}, missing {missing[:5]})")


def decode_state(record: Record, state: Mapping[str, Any]) -> None:
    """Restore a weights record into ``state``'s own tensors, in place (each
    tensor's dtype and shape must match; nothing is allocated per tensor)."""
    _check_names(record, state)
    for name, array in record.items():
        if array.stype.startswith(STYPE_PREFIX) and _unpack(array, name)[1] != "value":
            raise PayloadError(f"{name!r}: an update, not weights")
        decode_into(array, state[name], name)


def decode_into(entry: Any, tensor: Any, name: str = "tensor") -> None:
    """Restore one entry into ``tensor``, in place: its values (``tensor``
    of the entry's dtype) or, for a delta, the float32 deltas themselves
    (``tensor`` float32)."""
    spec, mode, parts = _unpack(entry, name)
    view = view_tensor(tensor)
    if view.shape != spec.shape or view.dtype != spec.dtype:
        raise TargetMismatch(f"{name!r}: the entry holds {spec.dtype} {spec.shape}"
                             f"{' deltas' if mode == 'delta' else ''}, the tensor is "
                             f"{view.dtype} {view.shape}")
    flat = view.flat
    if flat is None or not view.array.flags.writeable:
        raise TargetMismatch(f"{name!r}: not a writable contiguous tensor")
    for start, stop in _slices(spec):
        _restored(spec, parts, start, stop, flat[start:stop])


def encode_update(local: Mapping[str, Any], base: Record, fmt: str = "nf4", *,
                  min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                  nested: bool = False) -> dict[str, Packed]:
    """``local - base`` as an update record: ``base`` is the weights record
    the client received (its values are restored slice by slice, never held
    whole), ``local`` the trained state. Float tensors go as float32 deltas in
    ``fmt``; a tensor bit for bit unchanged is a zero entry (no data); an
    integer tensor that changed goes as its values."""
    _check_names(base, local)
    record: dict[str, Packed] = {}
    for name, array in base.items():
        spec, mode, parts = _unpack(array, name)
        if mode != "value":
            raise PayloadError(f"{name!r}: the base must be weights")
        view = view_tensor(local[name])
        if view.shape != spec.shape or view.dtype != spec.dtype:
            raise TargetMismatch(f"{name!r}: local {view.dtype} {view.shape}, the base "
                                 f"{spec.dtype} {spec.shape}")

        def restored(start: int, stop: int, out: np.ndarray, spec: TensorSpec = spec,
                     parts: list[np.ndarray] = parts) -> np.ndarray:
            return _restored(spec, parts, start, stop, out)

        record[name] = _update_array(name, view, spec, restored, fmt, min_elements,
                                     block_size, nested)
    return record


def encode_delta(local: Mapping[str, Any], base: Mapping[str, Any], fmt: str = "nf4", *,
                 min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                 nested: bool = False) -> dict[str, Packed]:
    """:func:`encode_update` against a base held as tensors (a state dict,
    or a lazily read checkpoint: read slice by slice) instead of a record."""
    _check_names(base, local)
    record: dict[str, Packed] = {}
    for name, tensor in base.items():
        held, view = view_tensor(tensor), view_tensor(local[name])
        if view.shape != held.shape or view.dtype != held.dtype:
            raise TargetMismatch(f"{name!r}: local {view.dtype} {view.shape}, the base "
                                 f"{held.dtype} {held.shape}")
        spec = make_spec(held.dtype, held.shape, "raw")

        def restored(start: int, stop: int, out: np.ndarray, held: TensorView = held
                     ) -> np.ndarray:
            return held.slice(start, stop, out)

        record[name] = _update_array(name, view, spec, restored, fmt, min_elements,
                                     block_size, nested)
    return record


def apply_update(record: Record, state: Mapping[str, Any]) -> None:
    """Add an update record (:func:`encode_update`, :func:`encode_delta`) to
    ``state``'s tensors, in place, as every receiver of it does (the same
    bits wherever it runs: :func:`llmwire.rounds.add_into`): float32 deltas
    added, zero entries skipped, integer values replaced."""
    _check_names(record, state)
    for name, array in record.items():
        if array.stype == ZERO_STYPE:
            continue
        spec, mode, parts = _unpack(array, name)
        view = view_tensor(state[name])
        if view.shape != spec.shape or view.dtype != array.dtype:
            raise TargetMismatch(f"{name!r}: the update is for {array.dtype} {spec.shape}, "
                                 f"the tensor is {view.dtype} {view.shape}")
        if mode == "value":
            decode_into(array, state[name], name)
            continue
        flat = view.flat
        if flat is None or not view.array.flags.writeable:
            raise TargetMismatch(f"{name!r}: not a writable contiguous tensor")
        wide = np.empty(min(max(spec.numel, 1), _SLICE), np.float32)
        for start, stop in _slices(spec):
            values = _restored(spec, parts, start, stop, wide[:stop - start])
            add_into(flat[start:stop], view.dtype, values)


def _update_array(name: str, view: TensorView, spec: TensorSpec,
                  restored: Callable[[int, int, np.ndarray], np.ndarray], fmt: str,
                  min_elements: int, block_size: int | None, nested: bool) -> Packed:
    """``view - base`` as one update entry; ``restored(start, stop, out)``
    gives the base's elements ``[start, stop)`` (of ``spec``'s dtype)."""
    info = DTYPES[view.dtype]
    held = np.empty(min(max(spec.numel, 1), _SLICE),
                    np.uint16 if view.dtype == "bfloat16" else info.numpy)
    if not info.is_float:
        same = all(np.array_equal(view.slice(s, e), restored(s, e, held[:e - s]))
                   for s, e in _slices(spec))
        if same:
            return Packed(view.dtype, view.shape, ZERO_STYPE, b"")
        value = make_spec(view.dtype, view.shape, "raw")
        return _pack(value, "value", view.dtype, view.shape, view.slice, name)
    chosen = _format_for(name, view.numel, fmt, {}, min_elements)
    block = _block(chosen, block_size)
    delta = make_spec("float32", view.shape, chosen, block_size=block,
                      nested=nested and block is not None)
    wide = np.empty(held.size, np.float32)
    out = np.empty(held.size, np.float32)
    changed = False

    def source(start: int, stop: int) -> np.ndarray:
        nonlocal changed
        count = stop - start
        base = restored(start, stop, held[:count])
        mine = view.slice(start, stop)
        if view.dtype == "float32":
            np.subtract(mine, base, out=out[:count])
        else:
            _to_float32(mine, view.dtype, out[:count])
            out[:count] -= _to_float32(base, view.dtype, wide[:count])
        if not changed and out[:count].any():
            changed = True
        return out[:count]

    array = _pack(delta, "delta", view.dtype, view.shape, source, name)
    return array if changed else Packed(view.dtype, view.shape, ZERO_STYPE, b"")


# -- the server's fold --------------------------------------------------------

def tied_names(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Pairs of names of ``state`` that share one storage (an embedding tied
    to the LM head): the in-message codec refuses them (each name would be
    averaged, and moved, once)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, tensor in state.items():
        view = view_tensor(tensor)
        if not view.numel or view.flat is None:
            continue
        address = view.flat.__array_interface__["data"][0]
        if address in seen:
            pairs.append((seen[address], name))
        else:
            seen[address] = name
    return pairs


class Folder:
    """Weighted sums of update records, added as each reply is read.

    ``template``: the global state (names, shapes, dtypes; no tied tensors).
    Float tensors get a flat sum in ``dtype`` (float32 or float64); integer
    tensors a float64 one, for the weighted mean of the values the clients
    sent (rounded; exact up to 2**53). An update is checked whole before
    anything of it is added — every entry decoded, its names, shapes and
    dtypes matched, every ``weight × value`` finite and within ±10³⁰ — and
    only then added, so a bad reply never poisons the mean, not even in part
    (:class:`PayloadError` for the first fault found). That costs one more
    decode of each reply; nothing is held beyond a slice.
    """

    def __init__(self, template: Mapping[str, Any], dtype: str = "float32") -> None:
        if dtype not in ("float32", "float64"):
            raise PayloadError(f"sums are float32 or float64, not {dtype!r}")
        tied = tied_names(template)
        if tied:
            raise TargetMismatch(f"{tied[0][0]!r} and {tied[0][1]!r} share one tensor: untie "
                                 "them (clone one) before averaging in-message updates")
        self.template = template
        self.views = {name: view_tensor(t) for name, t in template.items()}
        self.sums: dict[str, np.ndarray] = {}
        for name, view in self.views.items():
            kind = np.dtype(dtype) if DTYPES[view.dtype].is_float else np.dtype(np.float64)
            self.sums[name] = np.empty(view.numel, kind)
            self.sums[name].fill(0)  # touched now, not at the first fold
        self.counts = {name: 0.0 for name in self.views}  # weight that sent values (ints)
        self.total = 0.0
        self.clients = 0

    def reset(self) -> None:
        for array in self.sums.values():
            array.fill(0)
        self.counts = {name: 0.0 for name in self.views}
        self.total, self.clients = 0.0, 0

    def add(self, record: Record, weight: float) -> None:
        """Add ``weight × record`` (an update of the template's state), or
        nothing of it (:class:`PayloadError`, :class:`TargetMismatch`)."""
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                and math.isfinite(weight) and 0 < weight <= 1e15):
            raise PayloadError(f"a FedAvg weight must be a number in (0, 1e15], got {weight!r}")
        _check_names(record, self.template)
        for name, array in record.items():  # first pass: check all of it, add nothing
            self._fold(name, array, float(weight), add=False)
        for name, array in record.items():
            self._fold(name, array, float(weight), add=True)
        self.total += weight
        self.clients += 1

    def _fold(self, name: str, array: Any, weight: float, add: bool) -> None:
        view, sums = self.views[name], self.sums[name]
        if array.stype == ZERO_STYPE:
            if (array.dtype, tuple(array.shape)) != (view.dtype, view.shape) or array.data:
                raise TargetMismatch(f"{name!r}: a zero entry for {array.dtype} "
                                     f"{tuple(array.shape)}, the global is {view.dtype} "
                                     f"{view.shape}")
            if add and not DTYPES[view.dtype].is_float:  # unchanged: its own value counts
                self._add_values(name, view, None, None, weight)
            return
        spec, mode, parts = _unpack(array, name)
        if (array.dtype, spec.shape) != (view.dtype, view.shape):
            raise TargetMismatch(f"{name!r}: the update is for {array.dtype} {spec.shape}, the "
                                 f"global is {view.dtype} {view.shape}")
        if not DTYPES[view.dtype].is_float:
            if mode != "value":
                raise PayloadError(f"{name!r}: an integer tensor's update must be its values")
            if add:
                self._add_values(name, view, spec, parts, weight)
            return
        if mode != "delta":
            raise PayloadError(f"{name!r}: a float tensor's update must be a delta")
        limit = MAX_TERM[sums.dtype.itemsize]
        scratch = np.empty(min(max(spec.numel, 1), _SLICE), np.float32)
        for start, stop in _slices(spec):
            values = _restored(spec, parts, start, stop, scratch[:stop - start])
            scaled = np.multiply(values, weight, dtype=sums.dtype)
            if not add:
                if scaled.size and not (scaled.max() <= limit and scaled.min() >= -limit):
                    bad = int(np.count_nonzero(~(np.abs(scaled) <= limit)))
                    raise PayloadError(f"{name!r}: {bad} value(s) not finite or, times the "
                                       f"weight {weight:g}, beyond +-{limit:g}: the reply is "
                                       "left out")
                continue
            np.add(sums[start:stop], scaled, out=sums[start:stop])

    def _add_values(self, name: str, view: TensorView, spec: TensorSpec | None,
                    parts: list[np.ndarray] | None, weight: float) -> None:
        sums = self.sums[name]
        for start, stop in iter_slices(view.numel, 1, _SLICE):
            if spec is None:
                values = view.slice(start, stop)
            else:
                assert parts is not None
                values = _restored(spec, parts, start, stop,
                                   np.empty(stop - start, DTYPES[view.dtype].numpy))
            sums[start:stop] += weight * values.astype(np.float64)
        self.counts[name] += weight

    def apply_mean(self, state: Mapping[str, Any]) -> None:
        """``state += Σ wᵢ Δᵢ / Σ wᵢ`` for float tensors (computed in the sums'
        dtype, rounded once to each tensor's dtype); integer tensors take the
        weighted mean of the values sent, rounded. Needs one update at least."""
        if not self.total:
            raise PayloadError("no update was added: nothing to average")
        for name, view in self.views.items():
            target = view_tensor(state[name]).flat
            if target is None:
                raise TargetMismatch(f"{name!r}: not a contiguous tensor")
            sums = self.sums[name]
            if DTYPES[view.dtype].is_float:
                for start, stop in iter_slices(view.numel, 1, _SLICE):
                    mean = (sums[start:stop] / self.total).astype(np.float32, copy=False) \
                        if view.dtype != "float64" else sums[start:stop] / self.total
                    add_into(target[start:stop], view.dtype, mean)
            elif self.counts[name]:
                mean = np.rint(sums / self.counts[name])
                target[...] = mean.astype(target.dtype)
