"""llmwire encodings inside Flower's own records (the in-message way in).

An encoded tensor is a ``flwr.app.Array`` whose ``stype`` names llmwire, the
layout version and the format, ``"llmwire/1/<format>"`` (``nf4``, ``bf16``,
``raw``, ...). Its ``dtype`` and ``shape`` are those of the tensor it
restores into; its ``data`` is::

    u32 little-endian n | n bytes of msgpack {"spec": ..., "mode": ...} | parts

``spec`` is the :class:`~llmwire.quant.codec.TensorSpec` header, the parts
follow in wire order (docs/quantization.md). ``mode`` is ``"value"`` (the
tensor's values) or ``"delta"`` (float32 values to add to the tensor: an
update). ``"llmwire/1/zero"`` is a tensor an update leaves unchanged: no
data. Flower never looks inside ``data``; its own ``Array.numpy()`` refuses
an stype it does not know, so a stock strategy fails loudly on these.

A record of such arrays travels with a ``ConfigRecord`` named
:data:`META` in the same ``RecordDict``: ``{"layout": 1, "kind": "weights"
| "update", "round": r, "digest": hex}``. ``digest`` names the weights
record an update applies to (:func:`record_digest`: xxh3-128 of the encoded
bytes, so both sides compute it without decoding), so an update is never
applied to, or averaged into, another round's global.

Everything here works tensor by tensor and slice by slice: encoding builds
each ``data`` with one copy of its encoded bytes (never Flower's ``np.save``
of an fp32 copy), decoding writes straight into the caller's tensors.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Array, ArrayRecord

from .. import _encoding
from .._encoding import (
    LAYOUT, STYPE_PREFIX, ZERO_STYPE, Folder, Packed, decode_state, is_encoded, record_digest,
    wire_bytes,
)

__all__ = ["LAYOUT", "STYPE_PREFIX", "ZERO_STYPE", "META", "encode_array", "encode_state",
           "decode_state", "encode_update", "record_digest", "is_encoded", "Folder",
           "wire_bytes"]

#: the ConfigRecord that says what an encoded ArrayRecord is
META = "llmwire"


def _array(entry: Packed) -> Array:
    return Array(entry.dtype, tuple(entry.shape), entry.stype, entry.data)


def _record(entries: Mapping[str, Packed]) -> ArrayRecord:
    record = ArrayRecord()
    for name, entry in entries.items():
        record[name] = _array(entry)
    return record


def encode_array(tensor: Any, fmt: str = "nf4", **options: Any) -> Array:
    """One tensor's values as an llmwire Array in ``fmt`` (integer and bool
    tensors go as they are). :class:`~llmwire.NonFiniteError` for NaN/inf in a
    block format. ``options``: ``name``, ``block_size``, ``nested``."""
    return _array(_encoding.encode_array(tensor, fmt, **options))


def encode_state(state: Mapping[str, Any], fmt: str = "bf16", **options: Any) -> ArrayRecord:
    """A state dict's values as an ArrayRecord of llmwire arrays, tensor by
    tensor (``options``: ``min_elements``, under which tensors go as they
    are; ``block_size``; ``nested``)."""
    return _record(_encoding.encode_state(state, fmt, **options))


def encode_update(local: Mapping[str, Any], base: ArrayRecord, fmt: str = "nf4",
                  **options: Any) -> ArrayRecord:
    """``local - base`` as an update record: ``base`` is the weights record
    the client received (restored slice by slice, never held whole), ``local``
    the trained state. Float tensors go as float32 deltas in ``fmt``; a
    tensor bit for bit unchanged is a zero entry (no data); an integer tensor
    that changed goes as its values. ``options`` as for :func:`encode_state`."""
    return _record(_encoding.encode_update(local, base, fmt, **options))
