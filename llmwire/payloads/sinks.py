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
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import xxhash

from ..errors import (
    FileIntegrityError, FileWriteError, PayloadError, TargetExists, TargetMismatch,
    TransferRefused, UnsafeFileName,
)
from ..tensors import DTYPES, empty_like_spec, view_tensor
from .landing import PART_SUFFIX, READ_BLOCK, PartFile, TargetDir, check_free_space, pwrite_all
from .manifest import Entry, Manifest
from .source import pread_exact

__all__ = ["StateDictSink", "MemorySink", "InPlaceSink", "SafetensorsSink", "SAFETENSORS_DTYPES",
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


class _Ledger:
    """What a sink wrote where: (offset, length, xxh3-64 of the bytes), so the
    file can be read back and checked before it is declared complete."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, int]] = []

    def add(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        self.records.append((offset, len(view), xxhash.xxh3_64_intdigest(view)))

    def verify(self, fd: int, size: int, name: str) -> str:
        """Read the file back: every range must hash as written and together
        they must cover ``[0, size)``; return the whole file's xxh3-128 (hex)."""
        whole = xxhash.xxh3_128()
        buf = bytearray(min(READ_BLOCK, max(size, 1)))
        view = memoryview(buf)
        pos = 0
        for offset, length, expected in sorted(self.records):
            if offset != pos:
                raise PayloadError(f"{name}: bytes [{pos}, {offset}) were never written")
            part = xxhash.xxh3_64()
            done = 0
            while done < length:
                n = pread_exact(fd, view[:min(len(view), length - done)], offset + done)
                if n == 0:
                    raise FileIntegrityError(0, name, "a complete file",
                                             f"a file that ends at byte {offset + done}")
                part.update(view[:n])
                whole.update(view[:n])
                done += n
            if part.intdigest() != expected:
                error = FileIntegrityError(0, name, f"{expected:016x}", part.hexdigest())
                error.args = (f"{name}: the bytes at [{offset}, {offset + length}) read back "
                              "from the file differ from what was written (another writer?)",)
                raise error
            pos += length
        if pos != size:
            raise PayloadError(f"{name}: bytes [{pos}, {size}) were never written")
        held = os.fstat(fd).st_size
        if held != size:  # someone appended (or cut) the file
            error = FileIntegrityError(0, name, f"{size} bytes", f"{held} bytes")
            error.args = (f"{name}: the file holds {held} bytes, {size} were written "
                          "(another writer?)",)
            raise error
        return whole.hexdigest()


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


class SafetensorsSink(StateDictSink):
    """Writes a ``.safetensors`` file at offsets as entries arrive.

    The header is known from the manifest, so it is written first and every
    slice lands at its final offset with ``os.pwrite``: memory stays at one
    slice whatever the model size. The file is ``<path>.part`` until the
    stream's digest verified, owned by this transfer alone (an exclusive lock:
    a second transfer to the same path is refused with TargetBusy meanwhile)
    and opened without following a link. At :meth:`commit` every byte is read
    back and checked against the digests of what was written, then the file
    is fsynced and renamed into place; :meth:`receipt` then gives its path,
    size and whole-file xxh3-128. Tied entries are written twice (safetensors
    does not alias tensors).

    ``root``: the path lies below this trusted directory, and each directory
    between them is opened without following links (made if missing), as
    ``llmwire recv`` does for ``--out``; without it, the parent directory is
    taken as it is.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False, *,
                 root: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.root = None if root is None else os.fspath(root)
        self.part = self.path.with_name(self.path.name + PART_SUFFIX)
        self._dir: TargetDir | None = None
        self._file: PartFile | None = None
        self._offsets: dict[str, int] = {}
        self._ledger = _Ledger()
        self._size = 0
        self._receipt: dict[str, Any] = {}

    def _open_directory(self) -> TargetDir:
        if self.root is None:
            return TargetDir.at(self.path.parent)
        relative = os.path.relpath(self.path.parent, self.root)
        parts = () if relative == "." else tuple(relative.split(os.sep))
        if ".." in parts:
            raise UnsafeFileName(self.path.name, f"{self.path} is not below {self.root}")
        return TargetDir.walk(self.root, parts, create=True, name=str(self.path))

    def prepare(self, manifest: Manifest) -> None:
        specs = {e.name: e.spec for e in manifest.entries if e.spec is not None}
        metadata = {k: v for k, v in manifest.metadata.items()
                    if isinstance(k, str) and isinstance(v, str)}
        tensors = []
        for entry in manifest.entries:
            spec = specs[entry.tied_to] if entry.tied_to else entry.spec
            assert spec is not None
            tensors.append((entry.name, spec.dtype, spec.shape))
        head, self._offsets, self._size = safetensors_header(tensors, metadata)
        self._data_start = len(head)
        name = self.path.name
        try:
            self._dir = self._open_directory()
            existing = self._dir.lstat(name)
            if existing is not None and (stat.S_ISDIR(existing.st_mode) or not self.overwrite):
                raise TargetExists(str(self.path), "a directory is there" if
                                   stat.S_ISDIR(existing.st_mode) else
                                   "the file exists and overwrite is off")
            self._file = PartFile(self._dir, name, str(self.path))
            self._file.acquire()
            self._file.truncate(0)
            check_free_space(self._dir.fd, self._size, str(self.path))
            self._file.write(head, 0)
            self._ledger.add(0, head)
            self._file.truncate(self._size)
        except (PayloadError, TransferRefused):
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise FileWriteError(str(self.part), exc) from exc

    def _fd(self) -> int:
        assert self._file is not None
        return self._file.fd

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        assert entry.spec is not None
        itemsize = DTYPES[entry.spec.dtype].itemsize
        offset = self._data_start + self._offsets[entry.name] + start * itemsize
        try:
            pwrite_all(self._fd(), values, offset)
        except OSError as exc:
            raise FileWriteError(str(self.part), exc) from exc
        self._ledger.add(offset, values)

    def tie(self, entry: Entry, source: Entry) -> None:
        assert source.spec is not None
        size = source.spec.numel * DTYPES[source.spec.dtype].itemsize
        src = self._data_start + self._offsets[source.name]
        dst = self._data_start + self._offsets[entry.name]
        try:
            for done in range(0, size, _COPY_CHUNK):
                data = os.pread(self._fd(), min(_COPY_CHUNK, size - done), src + done)
                pwrite_all(self._fd(), data, dst + done)
                self._ledger.add(dst + done, data)
        except OSError as exc:
            raise FileWriteError(str(self.part), exc) from exc

    def entry_done(self, entry: Entry) -> Path:
        return self.path

    def commit(self) -> Path:
        assert self._file is not None
        try:
            digest = self._ledger.verify(self._file.fd, self._size, str(self.part))
            self._file.place(self.overwrite)
        except OSError as exc:
            self.abort()
            if isinstance(exc, TransferRefused):  # TargetExists is an OSError too
                raise
            raise FileWriteError(str(self.path), exc) from exc
        except BaseException:
            self.abort()
            raise
        self._close()
        self._receipt = {"path": str(self.path), "bytes": self._size, "digest": digest}
        return self.path

    def receipt(self) -> dict[str, Any]:
        return dict(self._receipt)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()
        self._close()
