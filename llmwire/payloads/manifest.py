"""The state-dict manifest: what a state-dict stream announces before its data.

Layout of a state-dict stream body (docs/streaming.md)::

    u64 little-endian   manifest length M (at most MAX_MANIFEST_BYTES)
    M bytes             the manifest, a msgpack map (below)
    for each entry that is not tied, in manifest order:
        for each slice of the entry (iter_slices(numel, alignment, slice_elements)):
            the slice's parts, in TensorSpec.part_layout order

Manifest::

    {"version": 1 or 2,
     "slice_elements": int,          # slice size before alignment
     "metadata": {...},              # the sender's, msgpack-able, opaque
     "reference": {"round": int, "digest": str},   # version 2, optional: see below
     "entries": [
        {"name": str, "spec": TensorSpec header, "nbytes": int},
        {"name": str, "tied_to": str},   # same storage as an earlier entry
        # version 2 only:
        {"name", "spec", "nbytes", "mode": "delta", "dtype": str},
        {"name", "spec", "nbytes": 0, "mode": "zero"},
        ...]}

Version 2 (written only when one of its features is used) carries updates:
a ``delta`` entry's values (``spec``, float32 on the wire) are to be added to
the receiver's own tensor of dtype ``dtype``; a ``zero`` entry is unchanged
and carries no data (``spec`` gives its dtype and shape); ``reference`` names
the state the deltas apply to (a round number and the digest both sides
compute, llmwire.rounds). Receivers that take full state dicts refuse a
manifest with deltas.

Every entry's bytes are covered by the transport's per-frame xxh3-64
checksums as they arrive, and the whole stream by its xxh3-128 digest at the
end; receivers commit nothing before that end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from ..errors import ManifestError, QuantizationError
from ..quant.codec import TensorSpec, iter_slices
from ..tensors import DTYPES

__all__ = ["Entry", "Manifest", "MAX_MANIFEST_BYTES", "MAX_ENTRIES", "MAX_NAME_LENGTH",
           "MAX_SLICE_ELEMENTS", "LENGTH_PREFIX", "MODES"]

MANIFEST_VERSION = 1
#: The version that carries deltas, unchanged entries and a reference.
DELTA_MANIFEST_VERSION = 2
#: How an entry's values relate to the receiver's tensor.
MODES = ("value", "delta", "zero")
_MAX_DIGEST = 128
#: A manifest larger than this is refused before it is read.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 1_000_000
MAX_NAME_LENGTH = 4096
#: Largest slice a receiver will stage (8 Mi elements: 64 MiB at 8 bytes each).
MAX_SLICE_ELEMENTS = 1 << 23
#: The manifest's length prefix.
LENGTH_PREFIX = struct.Struct("<Q")


@dataclass(frozen=True)
class Entry:
    """One named tensor of a state dict as it travels.

    ``mode`` says how its values relate to the receiver's tensor: ``value``
    (they are the tensor), ``delta`` (to be added to it; ``dtype`` is the
    tensor's dtype, ``spec`` the float32 delta's encoding) or ``zero``
    (unchanged: no data; ``spec`` gives dtype and shape).
    """

    name: str
    spec: TensorSpec | None = None  # None when tied
    tied_to: str | None = None
    mode: str = "value"
    dtype: str | None = None        # delta: the receiving tensor's dtype

    @property
    def nbytes(self) -> int:
        """Bytes of this entry in the stream body (0 when tied or unchanged)."""
        return 0 if self.spec is None or self.mode == "zero" else self.spec.payload_nbytes()

    @property
    def target_dtype(self) -> str:
        """The dtype of the tensor this entry fills or updates."""
        assert self.spec is not None
        return self.dtype if self.mode == "delta" and self.dtype else self.spec.dtype

    def slices(self, slice_elements: int) -> Iterator[tuple[int, int]]:
        assert self.spec is not None
        if self.mode == "zero":
            return iter(())
        return iter_slices(self.spec.numel, self.spec.alignment, slice_elements)

    def to_wire(self) -> dict[str, Any]:
        if self.spec is None:
            return {"name": self.name, "tied_to": self.tied_to}
        wire = {"name": self.name, "spec": self.spec.to_header(), "nbytes": self.nbytes}
        if self.mode == "delta":
            wire.update(mode="delta", dtype=self.dtype)
        elif self.mode == "zero":
            wire["mode"] = "zero"
        return wire


@dataclass(frozen=True)
class Manifest:
    """The entries of a state dict in stream order, and how it is sliced."""

    entries: tuple[Entry, ...]
    slice_elements: int
    metadata: dict[str, Any] = field(default_factory=dict)
    #: version 2: the state the deltas apply to, ``{"round": int, "digest": str}``
    reference: dict[str, Any] | None = None

    @property
    def body_nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    @property
    def is_update(self) -> bool:
        """Whether this needs version 2: deltas, unchanged entries or a reference."""
        return self.reference is not None or any(e.mode != "value" for e in self.entries)

    def to_bytes(self) -> bytes:
        """The length prefix and the msgpack manifest, as they travel."""
        body: dict[str, Any] = {
            "version": DELTA_MANIFEST_VERSION if self.is_update else MANIFEST_VERSION,
            "slice_elements": self.slice_elements, "metadata": self.metadata,
            "entries": [e.to_wire() for e in self.entries]}
        if self.reference is not None:
            body["reference"] = self.reference
        packed = msgpack.packb(body)
        if len(packed) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(packed)} bytes exceeds "
                                f"{MAX_MANIFEST_BYTES}")
        return LENGTH_PREFIX.pack(len(packed)) + packed

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> "Manifest":
        """Parse and validate a manifest from a peer (without its length
        prefix); :class:`ManifestError` for anything malformed."""
        try:
            raw = msgpack.unpackb(data, max_array_len=MAX_ENTRIES, strict_map_key=True)
        except Exception as exc:
            raise ManifestError(f"undecodable manifest: {exc}") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        if version not in (MANIFEST_VERSION, DELTA_MANIFEST_VERSION):
            raise ManifestError("not a version-1 or version-2 state-dict manifest")
        if not set(raw) <= {"version", "slice_elements", "metadata", "entries", "reference"}:
            raise ManifestError(f"manifest has keys {sorted(map(str, raw))}")
        reference = raw.get("reference")
        if reference is not None and (version == MANIFEST_VERSION or not _is_reference(reference)):
            raise ManifestError(f"bad reference {reference!r:.200}")
        slice_elements = raw.get("slice_elements")
        entries_raw = raw.get("entries")
        metadata = raw.get("metadata", {})
        if (not isinstance(slice_elements, int) or isinstance(slice_elements, bool)
                or not 1 <= slice_elements <= MAX_SLICE_ELEMENTS):
            raise ManifestError(f"bad slice_elements {slice_elements!r}")
        if not isinstance(entries_raw, list) or not isinstance(metadata, dict):
            raise ManifestError("manifest entries must be a list and metadata a map")
        entries: list[Entry] = []
        seen: dict[str, Entry] = {}
        for item in entries_raw:
            entry = _parse_entry(item, seen, version)
            seen[entry.name] = entry
            entries.append(entry)
        return cls(tuple(entries), slice_elements, metadata, reference)


def _is_reference(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"round", "digest"}
            and type(value["round"]) is int and value["round"] >= 0
            and isinstance(value["digest"], str) and 0 < len(value["digest"]) <= _MAX_DIGEST)


def _parse_entry(item: Any, seen: dict[str, Entry], version: int) -> Entry:
    if not isinstance(item, dict):
        raise ManifestError("a manifest entry must be a map")
    name = item.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ManifestError(f"bad entry name {name!r:.100}")
    if name in seen:
        raise ManifestError(f"entry {name!r} appears twice")
    if set(item) == {"name", "tied_to"}:
        target = seen.get(item["tied_to"]) if isinstance(item["tied_to"], str) else None
        if target is None or target.spec is None:
            raise ManifestError(f"entry {name!r} is tied to {item['tied_to']!r:.100}, "
                                "which is not an earlier untied entry")
        return Entry(name, None, target.name)
    mode = item.get("mode", "value")
    keys = {"name", "spec", "nbytes"} | ({"mode"} if "mode" in item else set()) \
        | ({"dtype"} if mode == "delta" else set())
    if set(item) != keys or mode not in MODES or (mode != "value" and version < 2):
        raise ManifestError(f"entry {name!r} has keys {sorted(map(str, item))}")
    try:
        spec = TensorSpec.from_header(item["spec"])
    except QuantizationError as exc:
        raise ManifestError(f"entry {name!r}: {exc}") from None
    dtype = item.get("dtype")
    if mode == "delta" and (spec.dtype != "float32" or dtype not in DTYPES
                            or not DTYPES[dtype].is_float):
        raise ManifestError(f"entry {name!r}: a delta travels as float32 and updates a float "
                            f"tensor, not {spec.dtype} for {dtype!r:.40}")
    if mode == "zero" and spec.format != "raw":
        raise ManifestError(f"entry {name!r}: an unchanged entry has no encoding")
    entry = Entry(name, spec, mode=mode, dtype=dtype if mode == "delta" else None)
    if item["nbytes"] != entry.nbytes:
        raise ManifestError(f"entry {name!r} declares {item['nbytes']!r} bytes, its spec "
                            f"implies {entry.nbytes}")
    return entry
