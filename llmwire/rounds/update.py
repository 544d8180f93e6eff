"""Updates on the wire: planning one, the view the encoder reads it through,
and the one piece of arithmetic that applies restored values.

An update is sent as a version-2 state-dict manifest (payloads/manifest.py):

- a float tensor that changed is a ``delta`` entry: its float32 values
  ``source - base`` (plus the error-feedback residual) are quantized in the
  asked format and restored by the receiver, which adds them to its own
  tensor with :func:`add_into`;
- a tensor whose update is exactly zero (bit for bit equal to the base, no
  residual) is a ``zero`` entry: a manifest line and no data;
- an integer or bool tensor that changed travels whole (``value``); one that
  did not is ``zero``;
- tensors that share storage travel once (``tied_to``).

``source`` is either a state to be sent as ``state - base``
(:func:`plan_delta`: a client's update, local - global) or an update already
computed (:func:`plan_increment`: the server's averaged update).
``apply_to`` lets the sender apply exactly what the receivers will restore
to its own copy, as they do, so that both hold the same bits afterwards
(the server's global, llmwire.rounds.broadcast).
"""

from __future__ import annotations

import fnmatch
import threading
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import PayloadError, QuantizationError
from ..payloads.manifest import Entry, Manifest
from ..payloads.statedict import DEFAULT_SLICE_BYTES, _storage_key
from ..quant import _kernels, codec
from ..quant.codec import MIN_ELEMENTS, TensorSpec, make_spec
from ..quant.formats import get_format
from ..tensors import DTYPES, TensorView, view_tensor
from .feedback import ErrorFeedback
from .reference import Reference

__all__ = ["plan_delta", "plan_increment", "add_into", "DeltaView"]

_BLOCK = 1 << 22
_local = threading.local()


def _scratch(count: int, slot: int = 0) -> np.ndarray:
    """A float32 buffer of ``count`` elements, reused by this thread."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < count:
        buf = buffers[slot] = np.empty(max(count, 1), np.float32)
    return buf[:count]


def _to_float32(values: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    if dtype == "float32":
        out[...] = values
    elif dtype in ("float16", "bfloat16"):
        _kernels.cast_into(np.ascontiguousarray(values), dtype, out, "float32")
    else:  # float64
        out[...] = values
    return out


def add_into(target: np.ndarray, dtype: str, values: np.ndarray) -> None:
    """``target += values`` for a flat slice of a tensor of ``dtype``
    (bfloat16 held as uint16 bits), computed in float32 (float64 for a
    float64 tensor) and rounded once to the tensor's dtype, round to nearest
    even. The same inputs give the same bits wherever this runs: a sender that
    applies its own update and its receivers end up with equal digests."""
    if dtype in ("float32", "float64"):
        np.add(target, values, out=target)
        return
    wide = _scratch(target.size, slot=1)
    _kernels.cast_into(target, dtype, wide, "float32")
    wide += values
    _kernels.cast_into(wide, "float32", target, dtype)


class DeltaView:
    """The float32 values of one delta entry, produced slice by slice into the
    encoder's scratch buffer: ``source - base + residual``. Told of each
    encoded slice, it restores it as the receiver will and keeps the new
    residual, and applies it to ``apply_to``."""

    container = "delta"
    flat = None
    array = None
    dtype = "float32"

    def __init__(self, name: str, source: TensorView, base: TensorView | None,
                 feedback: ErrorFeedback | None, peer: Any,
                 apply_to: TensorView | None) -> None:
        self.name, self.source, self.base = name, source, base
        self.shape, self.numel = source.shape, source.numel
        self.feedback, self.peer, self.apply_to = feedback, peer, apply_to
        if feedback is None and apply_to is None:
            self.encoded = None  # type: ignore[assignment]

    def slice(self, start: int, stop: int, scratch: np.ndarray | None = None) -> np.ndarray:
        count = stop - start
        out = (scratch[:count * 4].view(np.float32) if scratch is not None
               else np.empty(count, np.float32))
        source = self.source.slice(start, stop)
        base = None
        if self.base is not None:  # a file's base is read into a reused buffer, not a new one
            held = _scratch(-(-count * DTYPES[self.base.dtype].itemsize // 4), slot=3)
            base = self.base.slice(start, stop, held.view(np.uint8))
        if base is not None and self.source.dtype == self.base.dtype == "float32":
            np.subtract(source, base, out=out)  # one pass
        else:
            _to_float32(source, self.source.dtype, out)
            if base is not None:
                out -= _to_float32(base, self.base.dtype, _scratch(count, slot=2))
        if self.feedback is not None:
            self.feedback.add_into(self.peer, self.name, start, out)
        return out

    def encoded(self, spec: TensorSpec, start: int, stop: int, parts: list[np.ndarray],
                values: np.ndarray | None) -> None:
        lossless = spec.format == "raw"  # the receiver restores exactly ``values``
        if lossless:
            restored = parts[0].view(np.float32)
        else:
            restored = _scratch(stop - start)
            codec.decode_slice(spec, parts, restored)
        if self.apply_to is not None:
            flat = self.apply_to.flat
            assert flat is not None
            add_into(flat[start:stop], self.apply_to.dtype, restored)
        if self.feedback is not None and values is not None:
            if lossless:  # nothing dropped: the residual is zero (restored is the wire buffer)
                self.feedback.clear(self.peer, self.name, start, stop - start)
            else:
                self.feedback.store(self.peer, self.name, self.numel, start, values, restored)


def _blocks(view: TensorView) -> Any:
    for start in range(0, view.numel, _BLOCK):
        yield start, min(view.numel, start + _BLOCK)


def _equal(a: TensorView, b: TensorView) -> bool:
    """Bit for bit (``-0.0`` differs from ``0.0``, NaN payloads count). A
    view that reads a file reads into reused buffers, not a new one per block."""
    size = DTYPES[a.dtype].itemsize
    for s, e in _blocks(a):
        count = -(-(e - s) * size // 4)
        left = a.slice(s, e, _scratch(count, slot=4).view(np.uint8))
        right = b.slice(s, e, _scratch(count, slot=5).view(np.uint8))
        if not np.array_equal(left.view(np.uint8), right.view(np.uint8)):
            return False
    return True


def _all_zero(view: TensorView) -> bool:
    return not any(view.slice(s, e).view(np.uint8).any() for s, e in _blocks(view))


def _format_for(name: str, numel: int, fmt: str, overrides: Mapping[str, str],
                min_elements: int) -> str:
    for pattern, chosen in overrides.items():
        if name == pattern or fnmatch.fnmatchcase(name, pattern):
            return "raw" if chosen in ("fp32", "none") else chosen
    return "raw" if numel < min_elements or fmt in ("fp32", "none") else fmt


def _writable(view: TensorView, name: str) -> TensorView:
    if view.flat is None or not view.array.flags.writeable:
        raise PayloadError(f"{name!r}: apply_to needs writable contiguous tensors")
    return view


def _plan(names: list[str], source_of: Callable[[str], TensorView | None],
          base_of: Callable[[str], TensorView | None], template: Mapping[str, Any],
          fmt: str, reference: Reference | None, feedback: ErrorFeedback | None, peer: Any,
          apply_to: Mapping[str, Any] | None, overrides: Mapping[str, str], min_elements: int,
          block_size: int | None, nested: bool, slice_bytes: int,
          metadata: Mapping[str, Any] | None) -> tuple[Manifest, dict[str, Any]]:
    get_format("raw" if fmt in ("fp32", "none") else fmt)
    entries: list[Entry] = []
    views: dict[str, Any] = {}
    first_of: dict[tuple[Any, ...], str] = {}
    for name in names:
        if not isinstance(name, str):
            raise PayloadError(f"state dict keys must be strings, got {name!r}")
        target = view_tensor(template[name])
        key = _storage_key(template[name], target)
        if target.numel and key in first_of:  # tied in the receiver's state: once
            entries.append(Entry(name, None, first_of[key]))
            continue
        first_of[key] = name
        source, base = source_of(name), base_of(name)
        for other in (source, base):
            if other is not None and (other.shape != target.shape
                                      or (other is base and other.dtype != target.dtype)):
                raise PayloadError(f"{name!r}: {other.dtype} {other.shape} does not match the "
                                   f"reference's {target.dtype} {target.shape}")
        unchanged_spec = TensorSpec("raw", target.dtype, target.shape)
        if not DTYPES[target.dtype].is_float:
            if source is None or (base is not None and _equal(source, base)):
                entries.append(Entry(name, unchanged_spec, mode="zero"))
            else:
                entries.append(Entry(name, TensorSpec("raw", target.dtype, target.shape)))
                views[name] = source
            continue
        if source is None:
            entries.append(Entry(name, unchanged_spec, mode="zero"))
            continue
        no_residual = feedback is None or feedback.is_zero(peer, name)
        if no_residual and (_equal(source, base) if base is not None else _all_zero(source)):
            entries.append(Entry(name, unchanged_spec, mode="zero"))
            continue
        chosen = _format_for(name, target.numel, fmt, overrides, min_elements)
        is_block = get_format(chosen).is_block
        try:
            spec = make_spec("float32", target.shape, chosen,
                             block_size=block_size if is_block else None,
                             nested=nested if is_block else False)
        except QuantizationError as exc:
            raise QuantizationError(f"{name!r}: {exc}") from None
        entries.append(Entry(name, spec, mode="delta", dtype=target.dtype))
        applied = None
        if apply_to is not None:
            applied = _writable(view_tensor(apply_to[name]), name)
        views[name] = DeltaView(name, source, base, feedback, peer, applied)
    manifest = Manifest(tuple(entries), max(1, slice_bytes // 4), dict(metadata or {}),
                        reference.to_wire() if reference is not None else None)
    return manifest, views


def plan_delta(state: Mapping[str, Any], base: Mapping[str, Any], fmt: str, *,
               reference: Reference, feedback: ErrorFeedback | None = None,
               peer: Any = "uplink", overrides: Mapping[str, str] | None = None,
               min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
               nested: bool = False, slice_bytes: int = DEFAULT_SLICE_BYTES,
               metadata: Mapping[str, Any] | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Plan ``state - base`` as an update of ``base`` (named ``reference``).

    ``state`` and ``base`` must hold the same names, shapes and dtypes.
    ``fmt`` quantizes the float32 deltas (``raw``/``fp32``: as float32);
    tensors under ``min_elements`` go as float32; ``overrides`` as for
    :func:`~llmwire.send_state_dict`. With ``feedback``, ``peer``'s residual
    is added before quantizing and replaced by what this update drops.
    """
    if set(state) != set(base):
        missing = sorted(set(base) ^ set(state))[:5]
        raise PayloadError(f"state and base do not hold the same tensors: {missing}")
    return _plan(list(base), lambda n: view_tensor(state[n]), lambda n: view_tensor(base[n]),
                 base, fmt, reference, feedback, peer, None, overrides or {}, min_elements,
                 block_size, nested, slice_bytes, metadata)


def plan_increment(update: Mapping[str, Any], template: Mapping[str, Any], fmt: str, *,
                   reference: Reference, feedback: ErrorFeedback | None = None,
                   peer: Any = "broadcast", apply_to: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, str] | None = None, min_elements: int = MIN_ELEMENTS,
                   block_size: int | None = None, nested: bool = False,
                   slice_bytes: int = DEFAULT_SLICE_BYTES,
                   metadata: Mapping[str, Any] | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Plan ``update`` (float arrays by name, e.g. an averaged update) as an
    update of ``template`` (the state the receivers hold, named ``reference``).

    Names of ``template`` missing from ``update``, its integer tensors, and
    all-zero updates go as unchanged entries. ``apply_to`` (usually
    ``template`` itself) receives exactly what the receivers will restore.
    """
    unknown = sorted(set(update) - set(template))
    if unknown:
        raise PayloadError(f"the update holds tensors the reference has not: {unknown[:5]}")

    def source_of(name: str) -> TensorView | None:
        return view_tensor(update[name]) if name in update else None

    return _plan(list(template), source_of, lambda n: None, template, fmt, reference,
                 feedback, peer, apply_to, overrides or {}, min_elements, block_size, nested,
                 slice_bytes, metadata)
