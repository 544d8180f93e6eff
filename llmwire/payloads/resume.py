"""Resuming a state dict: where a receiver stands, and how both sides prove
that what it holds is what the sender would send.

A resumable state-dict stream (docs/streaming.md, "Resume") is cut at slice
boundaries. A :class:`ResumePoint` says how many of the body's slices the
receiver holds (``slices``), how many body bytes they are (``offset``) and
the body digest up to there (``chain``): a hash chain over the manifest and
each slice's wire bytes, ``c0 = xxh3_128(manifest)``, ``c(i+1) =
xxh3_128(c(i) || xxh3_128(slice i))``. Both sides extend the chain slice by
slice, so the receiver can store it in a few bytes and continue it after a
restart, and the sender, which re-encodes the slices it skips (quantization
is deterministic) without sending them, checks it at the boundary: a source
that encodes differently is refused there. The chain over the whole body
travels as the stream's 16-byte trailer and is checked before anything is
committed, so the digest covers the resumed boundary.

:class:`ResumeStore` is a file receiver's crash-safe record: a sidecar
``<name>.part.json`` (the point, the manifest digest, the sender's source
fingerprint) and ``<name>.part.ledger`` (the write ledger up to the point:
file, offset, length and xxh3-64 of each write, 28 bytes each), both next to the
``.part`` and written through the directory's descriptor.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from .landing import TargetDir, pwrite_all, replace_file

__all__ = ["ResumePoint", "Chain", "ResumeStore", "manifest_digest", "TRAILER_BYTES",
           "CHECKPOINT_BYTES", "CHECKPOINT_SECONDS", "RESUME_REPLY"]

#: bytes of the whole-body chain digest that ends a resumable stream
TRAILER_BYTES = 16
#: a receiver records its point after this many body bytes, or this many
#: seconds (a slow link loses little to a killed receiver), whichever comes first
CHECKPOINT_BYTES = 64 << 20
CHECKPOINT_SECONDS = 1.0
#: the receiver's answer to a resumable stream's manifest
RESUME_REPLY = "state_dict-resume"
_SIDECAR_VERSION = 1
_RECORD = struct.Struct("<IQQQ")  # file number, offset, length, xxh3-64
_MAX_SIDECAR = 64 * 1024


def manifest_digest(manifest_bytes: bytes) -> str:
    """The id of one state dict as it travels (its manifest, prefix included)."""
    return xxhash.xxh3_128_hexdigest(manifest_bytes)


class Chain:
    """The running body digest (see the module's docstring)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    @classmethod
    def start(cls, manifest_bytes: bytes) -> "Chain":
        return cls(xxhash.xxh3_128_digest(manifest_bytes))

    def add(self, data: Any) -> None:
        self.value = xxhash.xxh3_128_digest(self.value + xxhash.xxh3_128_digest(data))


@dataclass(frozen=True)
class ResumePoint:
    """``slices`` body slices (``offset`` bytes) landed; ``chain`` the digest
    up to there (hex); ``source`` the sender's fingerprint then (or None)."""

    slices: int = 0
    offset: int = 0
    chain: str = ""
    source: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"slices": self.slices, "offset": self.offset, "chain": self.chain,
                "source": self.source}

    @classmethod
    def from_wire(cls, fields: Any) -> "ResumePoint | None":
        """The point a peer sent, or None if malformed."""
        if not isinstance(fields, dict):
            return None
        slices, offset, chain, source = (fields.get(k) for k in
                                         ("slices", "offset", "chain", "source"))
        if type(slices) is not int or type(offset) is not int or slices < 0 or offset < 0 \
                or not isinstance(chain, str) or len(chain) > 64 \
                or not (source is None or isinstance(source, str) and len(source) <= 256):
            return None
        return cls(slices, offset, chain, source)


class ResumeStore:
    """``<name>.part.json`` and ``<name>.part.ledger`` in ``directory``."""

    def __init__(self, directory: TargetDir, name: str) -> None:
        self.dir = directory
        self.sidecar = name + ".part.json"
        self.ledger = name + ".part.ledger"
        self._tmp = name + ".part.json.tmp"
        self._ledger_fd = -1
        self.persisted = 0  # ledger records on disk

    def load(self, manifest: str, size: int
             ) -> tuple[ResumePoint, list[tuple[int, int, int, int]]] | None:
        """The recorded point and ledger for this manifest, or None (no record,
        another manifest, a target of another size, anything unreadable)."""
        record = self._read(self.sidecar, _MAX_SIDECAR)
        try:
            fields = json.loads(record) if record is not None else None
        except ValueError:
            return None
        if not isinstance(fields, dict) or fields.get("version") != _SIDECAR_VERSION \
                or fields.get("manifest") != manifest or fields.get("size") != size:
            return None
        point = ResumePoint.from_wire(fields)
        count = fields.get("records")
        if point is None or type(count) is not int or count < 0:
            return None
        raw = self._read(self.ledger, count * _RECORD.size)
        if raw is None or len(raw) < count * _RECORD.size:
            return None
        records = [_RECORD.unpack_from(raw, i * _RECORD.size) for i in range(count)]
        return point, records

    def _read(self, name: str, limit: int) -> bytes | None:
        try:  # never blocks (a FIFO planted there would hang the receiver)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.dir.fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks, got = [], 0
            while got < limit:
                data = os.read(fd, min(limit - got, 1 << 20))
                if not data:
                    break
                chunks.append(data)
                got += len(data)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def reset(self, records: list[tuple[int, int, int, int]] | None = None) -> None:
        """Start a fresh record (or continue one whose first records are kept)."""
        self.remove()
        self._ledger_fd = os.open(self.ledger, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o644, dir_fd=self.dir.fd)
        self.persisted = 0
        if records:
            self.append(records)

    def append(self, records: list[tuple[int, int, int, int]]) -> None:
        """Add ledger records (after the ``persisted`` ones)."""
        if records:
            data = b"".join(_RECORD.pack(*r) for r in records)
            pwrite_all(self._ledger_fd, data, self.persisted * _RECORD.size)
            self.persisted += len(records)

    def save(self, point: ResumePoint, manifest: str, size: int, durable: bool) -> None:
        """Record ``point`` (its ledger records already appended): a temporary
        name, then rename. Durable: fsync the data (the caller's), the ledger,
        the sidecar and the directory, so the record never claims bytes that
        are not on disk; otherwise it survives a killed receiver (the page
        cache does), and after a power loss the commit's read-back catches
        lost bytes (the transfer fails), never a wrong file presented as done."""
        if durable:
            os.fsync(self._ledger_fd)
        record = {"version": _SIDECAR_VERSION, "manifest": manifest, "size": size,
                  "records": self.persisted, **point.to_wire()}
        replace_file(self.dir, self.sidecar, json.dumps(record).encode(), durable)

    def close(self) -> None:
        if self._ledger_fd >= 0:
            fd, self._ledger_fd = self._ledger_fd, -1
            os.close(fd)

    def remove(self) -> None:
        """Remove the record (the ``.part`` it describes is gone or complete)."""
        self.close()
        for name in (self.sidecar, self._tmp, self.ledger):
            try:
                self.dir.unlink_quiet(name)
            except OSError:
                pass
