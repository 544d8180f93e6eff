"""Where the entries of a received state dict land.

A sink is told the manifest first (:meth:`StateDictSink.prepare`, which
validates and may refuse it), then receives each entry's restored elements,
slice by slice, either straight into a flat view it hands out
(:meth:`~StateDictSink.target`) or through :meth:`~StateDictSink.write`.
Nothing is presented as complete before :meth:`~StateDictSink.commit`,
which runs only after the stream's digest verified; any failure calls
:meth:`~StateDictSink.abort`. What :meth:`~StateDictSink.receipt` returns
after the commit goes back to the sender with the verdict.

``write`` and the slices of ``target`` may be filled from worker threads, at
once for different slices.
"""

from __future__ import annotations

import abc
import json
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import PayloadError, TargetMismatch
from ..tensors import DTYPES, empty_like_spec, view_tensor
from .manifest import Entry, Manifest
from .resume import ResumePoint

__all__ = ["StateDictSink", "MemorySink", "InPlaceSink", "SAFETENSORS_DTYPES",
           "safetensors_header"]


class StateDictSink(abc.ABC):
    """The receiving end of a state dict.

    ``accepts_updates``: whether the sink takes version-2 manifests (deltas
    against a reference, unchanged entries: llmwire.rounds); the others are
    refused before :meth:`prepare`. Such a sink gets a delta entry's restored
    float32 values through :meth:`write` (its :meth:`target` returns None for
    them) and is told of an unchanged entry by :meth:`unchanged`.
    """

    accepts_updates = False

    def prepare(self, manifest: Manifest) -> None:
        """Validate the manifest against this target; raise before any write."""

    def target(self, entry: Entry) -> np.ndarray | None:
        """A flat, contiguous, writable view (held as the entry's dtype) to
        restore ``entry`` into, or ``None`` to be handed slices via
        :meth:`write`."""
        return None

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        """Elements ``[start, start + len(values))`` of ``entry``, restored."""
        raise NotImplementedError

    @abc.abstractmethod
    def tie(self, entry: Entry, source: Entry) -> None:
        """``entry`` shares storage with the already complete ``source``."""

    def unchanged(self, entry: Entry) -> None:
        """An update's ``entry`` is unchanged: it carries no data."""

    def entry_done(self, entry: Entry) -> Any:
        """``entry`` is complete; return what an entry iterator yields for it."""
        return None

    @abc.abstractmethod
    def commit(self) -> Any:
        """The whole stream verified: make the result visible and return it."""

    def receipt(self) -> dict[str, Any]:
        """After :meth:`commit`: a small msgpack-able map the sender gets back
        in the verdict (``TransferResult.receipt``), e.g. where a file landed."""
        return {}

    def abort(self) -> None:
        """The transfer failed: leave nothing that looks complete."""

    #: whether :meth:`start` can continue an interrupted transfer
    resumable = False

    def start(self, offer: Mapping[str, Any] | None) -> "ResumePoint":
        """After :meth:`prepare`: where this transfer begins. ``offer`` is the
        resumable sender's ``{"source": fingerprint or None, "restart": bool}``
        (None: the sender does not resume; start from zero). A resumable sink
        returns the point an interrupted transfer of the same manifest
        recorded (docs/streaming.md, "Resume")."""
        return ResumePoint(source=offer.get("source") if offer else None)

    def checkpoint(self, point: "ResumePoint", durable: bool = False) -> None:
        """Every slice before ``point`` landed (its restore jobs are done)."""

    def suspend(self, point: "ResumePoint | None") -> bool:
        """The transfer was interrupted (connection lost, sender cancelled):
        keep what landed for the next transfer, at ``point`` (None: the last
        checkpoint) and return True, or :meth:`abort` and return False."""
        self.abort()
        return False


class MemorySink(StateDictSink):
    """Allocates each tensor as its entry starts (torch or NumPy)."""

    def __init__(self, container: str = "torch") -> None:
        if container not in ("torch", "numpy"):
            raise ValueError(f"container must be 'torch' or 'numpy', got {container!r}")
        self.container = container
        self.result: dict[str, Any] = {}
        self._flat: dict[str, np.ndarray] = {}

    def prepare(self, manifest: Manifest) -> None:
        self._order = [entry.name for entry in manifest.entries]

    def target(self, entry: Entry) -> np.ndarray:
        assert entry.spec is not None
        try:
            tensor, flat = empty_like_spec(entry.spec.shape, entry.spec.dtype, self.container)
        except (MemoryError, RuntimeError) as exc:
            raise PayloadError(f"cannot allocate {entry.name!r} "
                               f"({entry.spec.dtype} {entry.spec.shape}): {exc}") from None
        self.result[entry.name] = tensor
        self._flat[entry.name] = flat
        return flat

    def tie(self, entry: Entry, source: Entry) -> None:
        self.result[entry.name] = self.result[source.name]

    def entry_done(self, entry: Entry) -> Any:
        return self.result[entry.name]

    def commit(self) -> dict[str, Any]:
        return {name: self.result[name] for name in self._order}

    def abort(self) -> None:
        self.result.clear()
        self._flat.clear()


class InPlaceSink(StateDictSink):
    """Restores into existing tensors (e.g. ``model.state_dict()``): no
    second copy of the model. ``strict`` demands that the sender covers every
    tensor of the target; without it the sender may send a subset.

    Entries are written as they arrive, so a transfer that fails midway
    leaves the target holding a mix of old and new values (the error says
    so); receive into memory or a file where that matters.

    Resumable within one process: receive again into the same sink after an
    interrupted transfer (a dropped connection, a killed sender) and a
    resumable sender continues where the target's values stop.
    """

    resumable = True

    def __init__(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        self.state_dict = state_dict
        self.strict = strict
        self._views: dict[str, Any] = {}
        self._manifest = ""
        self._point: tuple[str, ResumePoint] | None = None  # (manifest, the point it reached)
        self._source: str | None = None

    def start(self, offer: Mapping[str, Any] | None) -> ResumePoint:
        source = offer.get("source") if offer else None
        self._source = source if isinstance(source, str) else None
        held = self._point
        self._point = None
        if offer is None or offer.get("restart") or held is None or held[0] != self._manifest:
            return ResumePoint(source=self._source)
        return held[1]

    def checkpoint(self, point: ResumePoint, durable: bool = False) -> None:
        self._point = (self._manifest, ResumePoint(point.slices, point.offset, point.chain,
                                                   self._source))

    def suspend(self, point: ResumePoint | None) -> bool:
        if point is not None:
            self.checkpoint(point)
        return self._point is not None

    def prepare(self, manifest: Manifest) -> None:
        from .resume import manifest_digest

        self._manifest = manifest_digest(manifest.to_bytes())
        names = {entry.name for entry in manifest.entries}
        missing = [e.name for e in manifest.entries if e.name not in self.state_dict]
        if missing:
            raise TargetMismatch(f"the target has no tensor for {missing[:5]}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if self.strict:
            uncovered = [name for name in self.state_dict if name not in names]
            if uncovered:
                raise TargetMismatch(f"the sender sends no value for {uncovered[:5]}"
                                     " (pass strict=False to receive a subset)")
        specs = {e.name: e.spec for e in manifest.entries if e.spec is not None}
        for entry in manifest.entries:
            spec = specs[entry.tied_to] if entry.tied_to else entry.spec
            assert spec is not None
            view = view_tensor(self.state_dict[entry.name])
            if view.shape != spec.shape or view.dtype != spec.dtype:
                raise TargetMismatch(f"{entry.name!r}: sender has {spec.dtype} {spec.shape}, "
                                     f"target is {view.dtype} {view.shape}")
            if view.flat is None or not view.array.flags.writeable:
                raise TargetMismatch(f"{entry.name!r}: the target tensor is not a writable "
                                     "contiguous tensor")
            self._views[entry.name] = view

    def target(self, entry: Entry) -> np.ndarray:
        flat = self._views[entry.name].flat
        assert flat is not None
        return flat

    def tie(self, entry: Entry, source: Entry) -> None:
        dst, src = self.target(entry), self.target(source)
        if not np.shares_memory(dst, src):
            dst[...] = src

    def entry_done(self, entry: Entry) -> Any:
        return self.state_dict[entry.name]

    def commit(self) -> Mapping[str, Any]:
        return self.state_dict


#: llmwire dtype name -> safetensors dtype tag
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}

def safetensors_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]],
                       metadata: Mapping[str, str] | None = None
                       ) -> tuple[bytes, dict[str, int], int]:
    """The head of a ``.safetensors`` file holding ``tensors`` (name, dtype,
    shape), laid out in that order: the 8-byte length and the JSON header,
    padded so that the data starts 8-byte aligned. Returns the head, each
    tensor's offset in the data region, and the whole file's size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    position = 0
    for name, dtype, shape in tensors:
        if name == "__metadata__":
            raise TargetMismatch("a tensor named '__metadata__' cannot be written to "
                                 "a .safetensors file (the format reserves the name)")
        size = DTYPES[dtype].itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        offsets[name] = position
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    head = len(encoded).to_bytes(8, "little") + encoded
    return head, offsets, len(head) + position
