"""The state-dict manifest: what a state-dict stream announces before its data.

Layout of a state-dict stream body (docs/streaming.md)::

    u64 little-endian   manifest length M (at most MAX_MANIFEST_BYTES)
    M bytes             the manifest, a msgpack map (below)
    for each entry that is not tied, in manifest order:
        for each slice of the entry (iter_slices(numel, alignment, slice_elements)):
            the slice's parts, in TensorSpec.part_layout order

Manifest::

    {"version": 1,
     "slice_elements": int,          # slice size before alignment
     "metadata": {...},              # the sender's, msgpack-able, opaque
     "entries": [
        {"name": str, "spec": TensorSpec header, "nbytes": int},
        {"name": str, "tied_to": str},   # same storage as an earlier entry
        ...]}

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

__all__ = ["Entry", "Manifest", "MAX_MANIFEST_BYTES", "MAX_ENTRIES", "MAX_NAME_LENGTH",
           "MAX_SLICE_ELEMENTS", "LENGTH_PREFIX"]

MANIFEST_VERSION = 1
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
    """One named tensor of a state dict as it travels."""

    name: str
    spec: TensorSpec | None = None  # None when tied
    tied_to: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of this entry in the stream body (0 when tied)."""
        return 0 if self.spec is None else self.spec.payload_nbytes()

    def slices(self, slice_elements: int) -> Iterator[tuple[int, int]]:
        assert self.spec is not None
        return iter_slices(self.spec.numel, self.spec.alignment, slice_elements)

    def to_wire(self) -> dict[str, Any]:
        if self.spec is None:
            return {"name": self.name, "tied_to": self.tied_to}
        return {"name": self.name, "spec": self.spec.to_header(), "nbytes": self.nbytes}


@dataclass(frozen=True)
class Manifest:
    """The entries of a state dict in stream order, and how it is sliced."""

    entries: tuple[Entry, ...]
    slice_elements: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def body_nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    def to_bytes(self) -> bytes:
        """The length prefix and the msgpack manifest, as they travel."""
        packed = msgpack.packb({"version": MANIFEST_VERSION,
                                "slice_elements": self.slice_elements,
                                "metadata": self.metadata,
                                "entries": [e.to_wire() for e in self.entries]})
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
        if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
            raise ManifestError("not a version-1 state-dict manifest")
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
            entry = _parse_entry(item, seen)
            seen[entry.name] = entry
            entries.append(entry)
        return cls(tuple(entries), slice_elements, metadata)


def _parse_entry(item: Any, seen: dict[str, Entry]) -> Entry:
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
    if set(item) != {"name", "spec", "nbytes"}:
        raise ManifestError(f"entry {name!r} has keys {sorted(map(str, item))}")
    try:
        spec = TensorSpec.from_header(item["spec"])
    except QuantizationError as exc:
        raise ManifestError(f"entry {name!r}: {exc}") from None
    entry = Entry(name, spec)
    if item["nbytes"] != entry.nbytes:
        raise ManifestError(f"entry {name!r} declares {item['nbytes']!r} bytes, its spec "
                            f"implies {entry.nbytes}")
    return entry
