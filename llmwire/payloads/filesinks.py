"""State dicts received into ``.safetensors`` files: one file, or a Hugging
Face sharded directory with an index; resumable.

Every file is laid out from the manifest before the first slice arrives (the
header is known), so each slice lands at its final offset with
``os.pwrite``: memory stays at one slice whatever the model size. A file is
``<name>.part`` until the stream's digest verified, owned by this transfer
alone (an exclusive lock: a second transfer to the same name is refused with
TargetBusy meanwhile) and opened without following a link. At commit every
byte is read back and checked against the digests of what was written (the
ledger), then each file is fsynced and renamed into place. Tied entries are
written twice (safetensors does not alias tensors).

A resumable transfer (docs/streaming.md, "Resume") keeps its ``.part``
files and a :class:`~llmwire.payloads.resume.ResumeStore` (the point reached
and the ledger up to it) when it is interrupted, and the next transfer of the
same manifest to the same target continues from that point.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xxhash

from ..errors import (
    FileIntegrityError, FileWriteError, PayloadError, TargetExists, TransferRefused,
    UnsafeFileName,
)
from ..sharding import (
    DEFAULT_MAX_SHARD_SIZE, SAFETENSORS_INDEX, index_bytes, plan_shards, shard_name,
)
from ..tensors import DTYPES
from .landing import (
    PART_SUFFIX, READ_BLOCK, PartFile, TargetDir, check_free_space, pwrite_all, replace_file,
)
from .manifest import Entry, Manifest
from .resume import ResumePoint, ResumeStore
from .sinks import StateDictSink, safetensors_header
from .source import pread_exact

__all__ = ["SafetensorsSink", "ShardedSink"]

_COPY_CHUNK = 8 * 1024 * 1024


class _Ledger:
    """What was written where in one file: (offset, length, xxh3-64 of the
    bytes), so the file can be read back and checked before it is declared
    complete."""

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
        # a resumed transfer may have rewritten a range: the last write of it counts
        latest: dict[tuple[int, int], int] = {}
        for offset, length, expected in self.records:
            latest[(offset, length)] = expected
        for (offset, length), expected in sorted(latest.items()):
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


class _SafetensorsPart:
    """One ``.safetensors`` file being written: its layout, ``.part``, ledger."""

    def __init__(self, directory: TargetDir, name: str, shown: str,
                 tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str]) -> None:
        self.head, self.offsets, self.size = safetensors_header(tensors, metadata)
        self.data_start = len(self.head)
        self.name, self.shown = name, shown
        self.file = PartFile(directory, name, shown)
        self.ledger = _Ledger()
        self.recorded = 0  # ledger records already in the resume record
        self.digest = ""

    @property
    def fd(self) -> int:
        return self.file.fd

    def initialize(self) -> None:
        """An empty file of the final size with its header written."""
        self.file.truncate(0)
        self.file.write(self.head, 0)
        self.ledger.records = []
        self.recorded = 0
        self.ledger.add(0, self.head)
        self.file.truncate(self.size)

    def at(self, name: str, byte: int = 0) -> int:
        return self.data_start + self.offsets[name] + byte

    def write(self, offset: int, values: Any) -> None:
        try:
            pwrite_all(self.fd, values, offset)
        except OSError as exc:
            raise FileWriteError(str(self.file.path), exc) from exc
        self.ledger.add(offset, values)

    def verify_and_place(self, overwrite: bool) -> None:
        self.digest = self.ledger.verify(self.fd, self.size, self.file.path)
        self.file.place(overwrite)


class _FilesSink(StateDictSink):
    """What :class:`SafetensorsSink` and :class:`ShardedSink` share: entries
    laid out over one or more :class:`_SafetensorsPart` files in one
    directory, their ledgers, and the resume record."""

    resumable = True

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self._dir: TargetDir | None = None
        self._parts: list[_SafetensorsPart] = []
        self._where: dict[str, _SafetensorsPart] = {}
        self._store: ResumeStore | None = None
        self._loaded: tuple[ResumePoint, list[tuple[int, int, int, int]]] | None = None
        self._manifest = ""
        self._resuming = False
        self._source: str | None = None  # the resumable sender's source fingerprint
        self._receipt: dict[str, Any] = {}

    # -- layout, by the subclass
    def _layout(self, manifest: Manifest) -> tuple[TargetDir, list[_SafetensorsPart], str]:
        """Open the directory and lay the files out; return them and the name
        the resume record is kept under."""
        raise NotImplementedError

    @property
    def _total(self) -> int:
        return sum(part.size for part in self._parts)

    def prepare(self, manifest: Manifest) -> None:
        from .resume import manifest_digest

        try:
            self._dir, self._parts, record = self._layout(manifest)
            for part in self._parts:
                for name in part.offsets:
                    self._where[name] = part
            for part in self._parts:
                part.file.acquire()
            self._store = ResumeStore(self._dir, record)
            self._manifest = manifest_digest(manifest.to_bytes())
            self._loaded = self._store.load(self._manifest, self._total)
            if self._loaded is not None and (
                    any(part.file.size() != part.size for part in self._parts)
                    or any(r[0] >= len(self._parts) for r in self._loaded[1])):
                self._loaded = None  # a .part that is not the one recorded
            held = sum(part.file.allocated() for part in self._parts) if self._loaded else 0
            check_free_space(self._dir.fd, self._total - held, self._shown)
            if self._loaded is None:
                self._initialize()
        except (PayloadError, TransferRefused):
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise FileWriteError(self._shown, exc) from exc

    @property
    def _shown(self) -> str:
        raise NotImplementedError

    def _initialize(self) -> None:
        for part in self._parts:
            part.initialize()

    def start(self, offer: Mapping[str, Any] | None) -> ResumePoint:
        """Where this transfer begins: the recorded point if the sender asks
        to resume (``offer``) the same manifest, else from the start."""
        assert self._store is not None
        try:
            if offer is None:
                self._resuming = False
                if self._loaded is not None:
                    self._initialize()
                self._store.remove()
                return ResumePoint()
            self._resuming = True
            source = offer.get("source")
            if self._loaded is None or offer.get("restart"):
                if self._loaded is not None:
                    self._initialize()
                self._loaded = None
                point = ResumePoint(source=source if isinstance(source, str) else None)
                self._store.reset()
                self._store.save(point, self._manifest, self._total, durable=False)
                self._source = point.source
                return point
            point, records = self._loaded
            for part in self._parts:
                part.ledger.records = []
            for number, offset, length, digest in records:
                self._parts[number].ledger.records.append((offset, length, digest))
            for part in self._parts:
                part.recorded = len(part.ledger.records)
            self._store.reset(records)
            self._source = point.source
            return point
        except OSError as exc:
            raise FileWriteError(self._shown, exc) from exc

    def checkpoint(self, point: ResumePoint, durable: bool = False) -> None:
        """Everything up to ``point`` landed: record it."""
        if not self._resuming or self._store is None:
            return
        records = []
        for number, part in enumerate(self._parts):
            # records are only ever appended: the new ones follow those recorded
            records += [(number, *r) for r in part.ledger.records[part.recorded:]]
            part.recorded = len(part.ledger.records)
        try:
            self._store.append(records)
            if durable:
                for part in self._parts:
                    part.file.sync()
            point = ResumePoint(point.slices, point.offset, point.chain, self._source)
            self._store.save(point, self._manifest, self._total, durable)
        except OSError as exc:
            raise FileWriteError(self._shown, exc) from exc

    def suspend(self, point: ResumePoint | None) -> bool:
        """The transfer was interrupted: keep the files and the record for the
        next one (at ``point`` if given, else at the last checkpoint)."""
        if not self._resuming or self._store is None:
            self.abort()
            return False
        try:
            if point is not None:
                self.checkpoint(point, durable=True)
        except (OSError, PayloadError):
            self.abort()
            return False
        self._close()
        return True

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        assert entry.spec is not None
        part = self._where[entry.name]
        part.write(part.at(entry.name, start * DTYPES[entry.spec.dtype].itemsize), values)

    def tie(self, entry: Entry, source: Entry) -> None:
        assert source.spec is not None
        size = source.spec.numel * DTYPES[source.spec.dtype].itemsize
        src, dst = self._where[source.name], self._where[entry.name]
        at, to = src.at(source.name), dst.at(entry.name)
        try:
            for done in range(0, size, _COPY_CHUNK):
                data = os.pread(src.fd, min(_COPY_CHUNK, size - done), at + done)
                dst.write(to + done, data)
        except OSError as exc:
            raise FileWriteError(dst.file.path, exc) from exc

    def _close(self) -> None:
        for part in self._parts:
            part.file.close()
        if self._store is not None:
            self._store.close()
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def _discard(self) -> None:
        for part in self._parts:
            part.file.discard()
        if self._store is not None:
            self._store.remove()

    def abort(self) -> None:
        if self._dir is not None:
            self._discard()
        self._close()

    def receipt(self) -> dict[str, Any]:
        return dict(self._receipt)


class SafetensorsSink(_FilesSink):
    """Writes a ``.safetensors`` file at offsets as entries arrive (see the
    module's docstring); :meth:`receipt` gives its path, size and whole-file
    xxh3-128 once committed.

    ``root``: the path lies below this trusted directory, and each directory
    between them is opened without following links (made if missing), as
    ``llmwire recv`` does for ``--out``; without it, the parent directory is
    taken as it is.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False, *,
                 root: str | os.PathLike[str] | None = None) -> None:
        super().__init__(overwrite)
        self.path = Path(path)
        self.root = None if root is None else os.fspath(root)
        self.part = self.path.with_name(self.path.name + PART_SUFFIX)

    @property
    def _shown(self) -> str:
        return str(self.path)

    def _layout(self, manifest: Manifest) -> tuple[TargetDir, list[_SafetensorsPart], str]:
        directory = _open_below(self.path.parent, self.root, str(self.path))
        try:
            _refuse_existing(directory, self.path.name, str(self.path), self.overwrite)
            part = _SafetensorsPart(directory, self.path.name, str(self.path),
                                    _tensors(manifest.entries), _metadata(manifest))
        except BaseException:
            directory.close()
            raise
        return directory, [part], self.path.name

    def commit(self) -> Path:
        assert self._parts
        try:
            self._parts[0].verify_and_place(self.overwrite)
        except OSError as exc:
            self.abort()
            if isinstance(exc, TransferRefused):  # TargetExists is an OSError too
                raise
            raise FileWriteError(str(self.path), exc) from exc
        except BaseException:
            self.abort()
            raise
        if self._store is not None:
            self._store.remove()
        self._close()
        self._receipt = {"path": str(self.path), "bytes": self._parts[0].size,
                         "digest": self._parts[0].digest}
        return self.path


class ShardedSink(_FilesSink):
    """Writes a state dict as a Hugging Face model directory's weights:
    ``model-0000N-of-0000M.safetensors`` shards of at most
    ``max_shard_size`` bytes (a larger tensor alone in its shard; a tied
    entry in its source's shard) and ``model.safetensors.index.json``, or
    one ``model.safetensors`` when it all fits in one shard, loadable by
    ``safetensors`` and ``transformers``' ``from_pretrained``.

    With ``stage`` (the default) everything is written into
    ``<directory>.part/`` and that directory is renamed to ``directory`` only
    once every shard verified and the index is written, so nothing in it
    looks complete before all of it is; ``overwrite`` replaces an existing
    directory then. Without ``stage`` the files land in ``directory`` itself
    (a caller that stages the directory, as ``llmwire recv`` does), each
    shard a ``.part`` until verified. ``root`` as for :class:`SafetensorsSink`.
    :meth:`receipt` gives the directory, the bytes of all shards, the index's
    digest over the shards' digests, and ``files`` (name -> digest).
    """

    def __init__(self, directory: str | os.PathLike[str], max_shard_size: int =
                 DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False, *,
                 root: str | os.PathLike[str] | None = None, stage: bool = True) -> None:
        super().__init__(overwrite)
        if not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got "
                             f"{max_shard_size!r}")
        self.path = Path(directory)
        self.max_shard_size = max_shard_size
        self.root = None if root is None else os.fspath(root)
        self.stage = stage
        self.work = self.path.with_name(self.path.name + PART_SUFFIX) if stage else self.path
        self._parent: TargetDir | None = None
        self._shards: list[tuple[str, list[str]]] = []

    @property
    def _shown(self) -> str:
        return str(self.path)

    def _layout(self, manifest: Manifest) -> tuple[TargetDir, list[_SafetensorsPart], str]:
        tensors = {name: (name, dtype, shape) for name, dtype, shape in
                   _tensors(manifest.entries)}
        specs = {e.name: e.spec for e in manifest.entries if e.spec is not None}
        tied: dict[str, list[str]] = {}
        for entry in manifest.entries:
            if entry.tied_to is not None:
                tied.setdefault(entry.tied_to, []).append(entry.name)
        sizes = [(e.name, specs[e.name].numel * DTYPES[specs[e.name].dtype].itemsize
                  * (1 + len(tied.get(e.name, ()))))
                 for e in manifest.entries if e.spec is not None]
        groups = plan_shards(sizes, self.max_shard_size)
        metadata = {"format": "pt", **_metadata(manifest)}
        if self.stage:
            self._parent = _open_below(self.path.parent, self.root, str(self.path))
            _refuse_existing(self._parent, self.path.name, str(self.path), self.overwrite,
                             directory=True)
            directory = self._parent.child(self.work.name, str(self.path))
        else:
            directory = _open_below(self.path, self.root, str(self.path))
        try:
            parts = []
            for number, names in enumerate(groups, 1):
                names = [n for name in names for n in (name, *tied.get(name, ()))]
                file = shard_name(number, len(groups))
                _refuse_existing(directory, file, str(self.path / file), self.overwrite)
                self._shards.append((file, names))
                parts.append(_SafetensorsPart(directory, file, str(self.path / file),
                                              [tensors[n] for n in names], metadata))
        except BaseException:
            directory.close()
            raise
        return directory, parts, SAFETENSORS_INDEX

    def commit(self) -> Path:
        assert self._dir is not None
        try:
            for part in self._parts:
                part.verify_and_place(self.overwrite)
            total = sum(part.size - part.data_start for part in self._parts)
            if len(self._parts) > 1:
                replace_file(self._dir, SAFETENSORS_INDEX, index_bytes(self._shards, total),
                             durable=True)
            if self._store is not None:
                self._store.remove()
            self._dir.fsync()
            if self.stage:
                assert self._parent is not None
                self._parent.replace_directory(self.work.name, self.path.name, self.overwrite,
                                               str(self.path))
        except OSError as exc:
            self.abort()
            if isinstance(exc, TransferRefused):
                raise
            raise FileWriteError(str(self.path), exc) from exc
        except BaseException:
            self.abort()
            raise
        files = {part.name: part.digest for part in self._parts}
        self._close()
        self._receipt = {"path": str(self.path), "bytes": sum(p.size for p in self._parts),
                         "digest": xxhash.xxh3_128_hexdigest(
                             "".join(f"{k}:{v}\n" for k, v in files.items()).encode()),
                         "files": files}
        return self.path

    def _close(self) -> None:
        super()._close()
        if self._parent is not None:
            self._parent.close()
            self._parent = None

    def abort(self) -> None:
        if self._dir is not None:
            self._discard()
            if self.stage and self._parent is not None:
                self._parent.rmdir_quiet(self.work.name)
        self._close()


def _tensors(entries: tuple[Entry, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    specs = {e.name: e.spec for e in entries if e.spec is not None}
    out = []
    for entry in entries:
        spec = specs[entry.tied_to] if entry.tied_to else entry.spec
        assert spec is not None
        out.append((entry.name, spec.dtype, spec.shape))
    return out


def _metadata(manifest: Manifest) -> dict[str, str]:
    return {k: v for k, v in manifest.metadata.items()
            if isinstance(k, str) and isinstance(v, str)}


def _open_below(path: Path, root: str | None, shown: str) -> TargetDir:
    """``path``, walked from ``root`` without following links (made if
    missing), or taken as it is without a root (made if missing)."""
    if root is None:
        os.makedirs(path, exist_ok=True)
        return TargetDir.at(path)
    relative = os.path.relpath(path, root)
    parts = () if relative == "." else tuple(relative.split(os.sep))
    if ".." in parts:
        raise UnsafeFileName(shown, f"{path} is not below {root}")
    return TargetDir.walk(root, parts, create=True, name=shown)


def _refuse_existing(where: TargetDir, name: str, shown: str, overwrite: bool, *,
                     directory: bool = False) -> None:
    """Refuse a final ``name`` that exists (unless ``overwrite``) or that is
    of the other kind (a directory where a file lands, or the reverse)."""
    existing = where.lstat(name)
    if existing is None:
        return
    is_dir = stat.S_ISDIR(existing.st_mode)
    if directory and not is_dir:
        raise TargetExists(shown, "a file is there, not a directory")
    if not directory and is_dir:
        raise TargetExists(shown, "a directory is there")
    if not overwrite:
        raise TargetExists(shown, f"the {'directory' if directory else 'file'} exists and "
                                  "overwrite is off")
