"""Where the entries of a received state dict land.

A sink is told the manifest first (:meth:`StateDictSink.prepare`, which
validates and may refuse it), then receives each entry's restored elements,
slice by slice, either straight into a flat view it hands out
(:meth:`~StateDictSink.target`) or through :meth:`~StateDictSink.write`.
Nothing is presented as complete before :meth:`~StateDictSink.commit`,
which runs only after the stream's digest verified; any failure calls
:meth:`~StateDictSink.abort`.

``write`` and the slices of ``target`` may be filled from worker threads, at
once for different slices.
"""

from __future__ import annotations

import abc
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import PayloadError, TargetMismatch
from ..tensors import DTYPES, empty_like_spec, view_tensor
from .manifest import Entry, Manifest

__all__ = ["StateDictSink", "MemorySink", "InPlaceSink", "SafetensorsSink", "SAFETENSORS_DTYPES"]


class StateDictSink(abc.ABC):
    """The receiving end of a state dict."""

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

    def entry_done(self, entry: Entry) -> Any:
        """``entry`` is complete; return what an entry iterator yields for it."""
        return None

    @abc.abstractmethod
    def commit(self) -> Any:
        """The whole stream verified: make the result visible and return it."""

    def abort(self) -> None:
        """The transfer failed: leave nothing that looks complete."""


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
    """

    def __init__(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        self.state_dict = state_dict
        self.strict = strict
        self._views: dict[str, Any] = {}

    def prepare(self, manifest: Manifest) -> None:
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

_COPY_CHUNK = 8 * 1024 * 1024


class SafetensorsSink(StateDictSink):
    """Writes a ``.safetensors`` file at offsets as entries arrive.

    The header is known from the manifest, so it is written first and every
    slice lands at its final offset with ``os.pwrite``: memory stays at one
    slice whatever the model size. The file is ``<path>.part`` until the
    stream's digest verified; then it is fsynced and renamed into place.
    Tied entries are written twice (safetensors does not alias tensors).
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.part = self.path.with_name(self.path.name + ".part")
        self._fd: int | None = None
        self._rfd: int | None = None
        self._offsets: dict[str, int] = {}
        self._lock = threading.Lock()

    def prepare(self, manifest: Manifest) -> None:
        if self.path.exists() and not self.overwrite:
            raise PayloadError(f"{self.path} exists (pass overwrite=True to replace it)")
        specs = {e.name: e.spec for e in manifest.entries if e.spec is not None}
        header: dict[str, Any] = {}
        metadata = {k: v for k, v in manifest.metadata.items()
                    if isinstance(k, str) and isinstance(v, str)}
        if metadata:
            header["__metadata__"] = metadata
        position = 0
        for entry in manifest.entries:
            spec = specs[entry.tied_to] if entry.tied_to else entry.spec
            assert spec is not None
            size = spec.numel * DTYPES[spec.dtype].itemsize
            header[entry.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype],
                                  "shape": list(spec.shape),
                                  "data_offsets": [position, position + size]}
            self._offsets[entry.name] = position
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self._data_start = 8 + len(encoded)
        self.parent = self.path.parent
        try:
            self._fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._pwrite(len(encoded).to_bytes(8, "little") + encoded, 0)
            os.ftruncate(self._fd, self._data_start + position)
        except OSError as exc:
            self.abort()
            raise PayloadError(f"cannot write {self.part}: {exc}") from exc

    def _pwrite(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        assert self._fd is not None
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        assert entry.spec is not None
        itemsize = DTYPES[entry.spec.dtype].itemsize
        offset = self._data_start + self._offsets[entry.name] + start * itemsize
        try:
            self._pwrite(values, offset)
        except OSError as exc:
            raise PayloadError(f"cannot write {self.part}: {exc}") from exc

    def tie(self, entry: Entry, source: Entry) -> None:
        assert self._fd is not None and source.spec is not None
        size = source.spec.numel * DTYPES[source.spec.dtype].itemsize
        src = self._data_start + self._offsets[source.name]
        dst = self._data_start + self._offsets[entry.name]
        try:
            for done in range(0, size, _COPY_CHUNK):
                n = min(_COPY_CHUNK, size - done)
                self._pwrite(os.pread(self._fd_read(), n, src + done), dst + done)
        except OSError as exc:
            raise PayloadError(f"cannot write {self.part}: {exc}") from exc

    def _fd_read(self) -> int:
        with self._lock:
            if self._rfd is None:
                self._rfd = os.open(self.part, os.O_RDONLY)
            return self._rfd

    def entry_done(self, entry: Entry) -> Path:
        return self.path

    def commit(self) -> Path:
        assert self._fd is not None
        try:
            if self.path.exists() and not self.overwrite:
                raise PayloadError(f"{self.path} appeared during the transfer; not replaced")
            os.fsync(self._fd)
            self._close()
            os.replace(self.part, self.path)
            _fsync_dir(self.parent)
        except OSError as exc:
            self.abort()
            raise PayloadError(f"cannot complete {self.path}: {exc}") from exc
        except PayloadError:
            self.abort()
            raise
        return self.path

    def _close(self) -> None:
        for fd in (self._fd, self._rfd):
            if fd is not None:
                os.close(fd)
        self._fd = self._rfd = None

    def abort(self) -> None:
        self._close()
        try:
            os.unlink(self.part)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
