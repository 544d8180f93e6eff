"""File payloads: stream one file with memory independent of its size, resumably.

The sender reads the file through windowed read-only ``mmap`` views and hands
memoryview slices of the map straight to :meth:`SendStream.send` (no copy into
Python bytes); each window is unmapped before the next is mapped, so mapped
file pages never hold more than one window of RSS. The receiver writes each
chunk with ``os.pwrite`` at its offset into ``<name>.part`` (never an mmap),
records fsynced progress in a sidecar ``<name>.part.json``, and only after the
whole-file xxh3-128 digests match fsyncs and renames the file into place.

The control messages and the resume rules are in docs/streaming.md ("Files").
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import re
import stat
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from ..errors import (
    ConnectionClosed,
    FileIntegrityError,
    FileTransferError,
    FileWriteError,
    IntegrityError,
    SourceChanged,
    StreamCancelled,
    StreamError,
    TargetExists,
    TransferInterrupted,
    TransferRefused,
    UnsafeFileName,
)
from ..transport.base import RecvStream, SendStream, Transport

__all__ = [
    "FileResult",
    "send_file",
    "receive_file",
    "check_file_name",
    "file_id",
    "DEFAULT_WINDOW",
    "DEFAULT_CHUNK",
    "CHECKPOINT_BYTES",
    "PART_SUFFIX",
    "SIDECAR_SUFFIX",
]

MiB = 1 << 20
#: bytes mapped at a time by the sender (rounded up to the allocation granularity)
DEFAULT_WINDOW = 64 * MiB
#: bytes per ``send()`` call: one memoryview slice of the current window
DEFAULT_CHUNK = 4 * MiB
#: the receiver records its offset in the sidecar this often (not fsynced: see _Part.checkpoint)
CHECKPOINT_BYTES = 64 * MiB
#: suffixes of the in-progress file and of its sidecar (names ending so are refused)
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"
_SIDECAR_TMP_SUFFIX = ".part.json.tmp"

_MAX_NAME_BYTES = 4096
_MAX_PART_BYTES = 255
_MAX_CONTROL = 64 * 1024          # control messages carry everything in their header
_ABORT_WAIT = 10.0                # seconds to wait for the peer's file-abort reason
_UNMAP_TRIES = 100                # loop turns to wait for the last views of a map
_HASH_BLOCK = 4 * MiB             # read size when hashing a resumed prefix
_SIDECAR_VERSION = 1
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class FileResult:
    """What one :func:`send_file` or :func:`receive_file` call did.

    ``path`` is the source file (sender) or the final file (receiver);
    ``bytes_transferred`` counts only this call's bytes (``size -
    resumed_from`` when it succeeded); ``digest`` is the whole file's
    xxh3-128, hex.
    """

    path: str
    name: str
    size: int
    digest: str
    bytes_transferred: int
    resumed_from: int
    seconds: float


# ------------------------------------------------------------------- names, ids


def check_file_name(name: object) -> tuple[str, ...]:
    """Return the parts of a safe relative POSIX file name, or raise UnsafeFileName.

    Refused: non-strings, empty names, absolute paths, empty, ``.`` or ``..``
    parts, NUL/control characters, backslashes, a drive prefix (``C:``), names
    over 4096 bytes or parts over 255 bytes (UTF-8), and final parts ending in
    ``.part``, ``.part.json`` or ``.part.json.tmp`` (reserved for transfers in
    progress). Symlinks are checked against a directory by :func:`receive_file`.
    """
    shown = name if isinstance(name, str) else None
    if not isinstance(name, str) or not name:
        raise UnsafeFileName(shown, "the file name must be a non-empty string")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeFileName(shown, "the file name is not valid UTF-8") from None
    if len(encoded) > _MAX_NAME_BYTES:
        raise UnsafeFileName(shown, f"the file name is longer than {_MAX_NAME_BYTES} bytes")
    if _CONTROL_CHARS.search(name):
        raise UnsafeFileName(shown, "the file name contains NUL or control characters")
    if "\\" in name:
        raise UnsafeFileName(shown, "the file name contains a backslash")
    if name.startswith("/"):
        raise UnsafeFileName(shown, "absolute paths are refused")
    if _DRIVE.match(name):
        raise UnsafeFileName(shown, "drive prefixes are refused")
    parts = tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeFileName(shown, f"the file name has a {part or 'empty'!r} part")
        if len(part.encode("utf-8")) > _MAX_PART_BYTES:
            raise UnsafeFileName(shown, f"a part of the file name is longer than "
                                        f"{_MAX_PART_BYTES} bytes")
    if parts[-1].endswith((PART_SUFFIX, SIDECAR_SUFFIX, _SIDECAR_TMP_SUFFIX)):
        raise UnsafeFileName(shown, "names ending in .part, .part.json or .part.json.tmp "
                                    "are reserved for transfers in progress")
    return parts


def file_id(name: str, size: int, mtime_ns: int) -> str:
    """The id of one version of a file: hex xxh3-128 of (name, size, mtime_ns).

    A ``.part`` resumes only for an offer with the same id; a file changed
    without a new mtime still fails the whole-file digest (then starts over).
    """
    return xxhash.xxh3_128_hexdigest(json.dumps([name, size, mtime_ns]).encode())


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve_target(root: str, name: str) -> str:
    """The final path of ``name`` under ``root`` (a realpath), refusing escapes."""
    parts = check_file_name(name)
    final = os.path.join(root, *parts)
    # realpath follows symlinks in the components that exist: a link that
    # leads out of the target directory makes the parent resolve outside it.
    parent = os.path.realpath(os.path.dirname(final))
    if not _inside(root, parent):
        raise UnsafeFileName(name, "the name resolves outside the target directory")
    probe = root
    for part in parts[:-1]:
        probe = os.path.join(probe, part)
        if os.path.lexists(probe) and not os.path.isdir(probe):
            raise UnsafeFileName(name, f"{part!r} exists and is not a directory")
    final = os.path.join(parent, parts[-1])
    if os.path.isdir(final) and not os.path.islink(final):
        raise TargetExists(name, "a directory exists at the final name")
    return final


# ------------------------------------------------------------------- control messages


async def _send_control(transport: Transport, kind: str, **fields: Any) -> None:
    await transport.send_message({"kind": kind, **fields})


async def _receive_control(transport: Transport, name: str | None, fid: str,
                           kinds: tuple[str, ...], stream: RecvStream | None = None
                           ) -> dict[Any, Any]:
    if stream is None:
        msg = await transport.receive_message(_MAX_CONTROL)
        header = msg.header
    else:
        await stream.read_all(_MAX_CONTROL)
        header = stream.header
    if not isinstance(header, dict) or header.get("kind") not in kinds \
            or header.get("id") != fid:
        got = header.get("kind") if isinstance(header, dict) else type(header).__name__
        raise FileTransferError(f"file {name!r}: expected a {' or '.join(kinds)} message "
                                f"for id {fid}, got {got!r}")
    return header


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StreamCancelled):
        return f"{'peer' if exc.remote else 'we'} cancelled the stream: {exc.reason or '-'}"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------- sender


def _hash_prefix(fd: int, length: int, hasher: Any) -> None:
    """Feed bytes [0, length) of ``fd`` to ``hasher`` through one bounded buffer.

    Runs in a worker thread and closes ``fd`` (its own dup) when done.
    """
    try:
        buf = bytearray(min(_HASH_BLOCK, max(length, 1)))
        view = memoryview(buf)
        pos = 0
        while pos < length:
            want = min(len(buf), length - pos)
            n = os.preadv(fd, [view[:want]], pos)
            if n <= 0:
                raise OSError(errno.EIO, "file shorter than the resumed offset")
            hasher.update(view[:n])
            pos += n
    finally:
        os.close(fd)


async def _hash_prefix_in_thread(fd: int, length: int, hasher: Any) -> None:
    if length:
        # The thread owns a dup: cancelling us never leaves it reading a closed fd.
        await asyncio.to_thread(_hash_prefix, os.dup(fd), length, hasher)


async def _unmap(mm: mmap.mmap) -> None:
    """Close ``mm``, giving the event loop a few turns to drop its last views.

    uvloop releases a written buffer in its write-completion callback, which
    can run one loop iteration after ``send()`` returned. If views remain
    after that, the pages are dropped from RSS with MADV_DONTNEED and the map
    is unmapped when the views are collected.
    """
    try:
        for _ in range(_UNMAP_TRIES):
            try:
                mm.close()
                return
            except BufferError:
                await asyncio.sleep(0)
    finally:
        if not mm.closed:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


async def _send_range(stream: SendStream, fd: int, name: str, start: int, size: int,
                      window: int, chunk: int, hasher: Any, progress: Progress | None) -> int:
    """Send bytes [start, size) of ``fd`` as slices of windowed maps; return bytes sent."""
    pos = start
    while pos < size:
        if os.fstat(fd).st_size != size:  # a shrinking mapped file would SIGBUS us
            raise SourceChanged(name, f"size is now {os.fstat(fd).st_size}, was {size}")
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        length = min(window, size - base)
        mm = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base)
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(mm) as view:
                end = base + length
                while pos < end:
                    n = min(chunk, end - pos)
                    with view[pos - base:pos - base + n] as piece:
                        if hasher is not None:
                            hasher.update(piece)
                        await stream.send(piece)
                    pos += n
                    if progress is not None:
                        progress(pos, size)
        except BaseException as exc:
            # The failed send()'s finished frames still hold views of the map
            # (in the traceback); drop their locals so the map can be closed now.
            traceback.clear_frames(exc.__traceback__)
            await _unmap(mm)
            raise
        await _unmap(mm)  # its pages leave our RSS before the next window is mapped
    return pos - start


async def send_file(transport: Transport, path: str | os.PathLike[str], *,
                    name: str | None = None, window: int = DEFAULT_WINDOW,
                    chunk: int = DEFAULT_CHUNK, progress: Progress | None = None) -> FileResult:
    """Send the file at ``path`` to a peer running :func:`receive_file`.

    ``name`` (default: the file's base name) is the relative POSIX path the
    receiver stores it under. The file is read through read-only maps of
    ``window`` bytes, sent ``chunk`` bytes per ``send()``; ``progress(done,
    total)`` is called after each chunk. If the receiver holds a verified
    prefix of this file (same name, size and mtime) the transfer resumes there.

    Raises TransferRefused (bad name, existing file...), TransferInterrupted
    (cancelled by the receiver, connection lost: send again to resume),
    FileIntegrityError (whole-file digests differ), SourceChanged.
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    gran = mmap.ALLOCATIONGRANULARITY
    window = max(gran, -(-window // gran) * gran)
    started = time.perf_counter()
    fspath = os.fspath(path)
    fd = os.open(fspath, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileTransferError(f"{fspath!r} is not a regular file")
        name = os.path.basename(fspath) if name is None else name
        check_file_name(name)  # refuse locally what the receiver would refuse
        size, mtime_ns = st.st_size, st.st_mtime_ns
        fid = file_id(name, size, mtime_ns)
        await _send_control(transport, "file-offer", name=name, size=size,
                            mtime_ns=mtime_ns, id=fid)
        reply = await _receive_control(transport, name, fid, ("file-accept", "file-refuse"))
        if reply["kind"] == "file-refuse":
            raise TransferRefused(name, str(reply.get("reason", "")))
        offset = reply.get("offset")
        if type(offset) is not int or not 0 <= offset <= size:
            raise FileTransferError(f"file {name!r}: the receiver asked to resume at "
                                    f"{offset!r}, outside [0, {size}]")
        # From offset 0 the stream's own xxh3-128 (end() returns it) is the
        # whole file's digest; a resumed transfer hashes the prefix, then the rest.
        hasher = None
        if offset:
            hasher = xxhash.xxh3_128()
            await _hash_prefix_in_thread(fd, offset, hasher)
        stream = await transport.open_stream({"kind": "file", "id": fid}, offset=offset)
        sent = 0
        try:
            sent = await _send_range(stream, fd, name, offset, size, window, chunk,
                                     hasher, progress)
            stream_digest = await stream.end()
        except BaseException as exc:
            await stream.cancel(reason=f"sender failed: {_reason(exc)}")
            if isinstance(exc, StreamCancelled) and exc.remote:
                # The receiver follows its cancel with a file-abort saying why.
                reason = exc.reason
                try:
                    abort = await asyncio.wait_for(_receive_control(
                        transport, name, fid, ("file-abort",)), _ABORT_WAIT)
                    reason = str(abort.get("reason", reason))
                except (asyncio.TimeoutError, ConnectionClosed, FileTransferError):
                    pass
                raise TransferInterrupted(name, offset + sent,
                                          f"the receiver cancelled: {reason}") from exc
            if isinstance(exc, ConnectionClosed):
                raise TransferInterrupted(name, offset + sent, _reason(exc)) from exc
            raise
        digest = (hasher.hexdigest() if hasher is not None else stream_digest.hex())
        await _send_control(transport, "file-done", id=fid, digest=digest)
        try:
            reply = await _receive_control(transport, name, fid,
                                           ("file-ok", "file-failed", "file-abort"))
        except ConnectionClosed as exc:
            raise TransferInterrupted(name, size, "connection lost before the receiver "
                                      f"confirmed the file: {exc}") from exc
        if reply["kind"] == "file-failed":
            raise FileIntegrityError(stream.stream_id, name, digest,
                                     str(reply.get("digest", "?")))
        if reply["kind"] == "file-abort":
            raise TransferInterrupted(name, size, f"the receiver failed: "
                                      f"{reply.get('reason', '-')}")
        return FileResult(fspath, name, size, digest, sent, offset,
                          time.perf_counter() - started)
    finally:
        os.close(fd)


# ------------------------------------------------------------------- receiver


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Part:
    """``<final>.part`` and its sidecar: the receiver's crash-safe state."""

    def __init__(self, final: str, offer: dict[str, Any]) -> None:
        self.final = final
        self.part = final + PART_SUFFIX
        self.sidecar = final + SIDECAR_SUFFIX
        self.offer = offer
        self.fd = -1
        self.checkpointed = -1          # offset the sidecar records

    def resumable_offset(self) -> int:
        """The verified offset a matching sidecar records, or 0."""
        try:
            fd = os.open(self.sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            record = json.loads(os.read(fd, _MAX_CONTROL))
            part = os.lstat(self.part)
        except (OSError, ValueError):
            return 0
        finally:
            os.close(fd)
        if not isinstance(record, dict) or record.get("id") != self.offer["id"] \
                or record.get("version") != _SIDECAR_VERSION or not stat.S_ISREG(part.st_mode):
            return 0
        offset = record.get("offset")
        if type(offset) is not int or not 0 <= offset <= self.offer["size"] \
                or offset > part.st_size:
            return 0
        return offset

    def open(self, offset: int) -> None:
        # O_NOFOLLOW: a planted symlink at <name>.part must not redirect writes.
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o644)
        os.ftruncate(self.fd, offset)  # keep the verified prefix, drop anything past it

    def checkpoint(self, offset: int, durable: bool = True) -> None:
        """Record ``offset`` in the sidecar (temporary name, then rename).

        Durable: fsync ``.part`` first, and the sidecar and directory after,
        so the record never claims bytes that are not on disk. Not durable
        (periodic, while data flows): the record survives a killed receiver
        (the page cache does too); after a power loss it may claim bytes that
        were lost, which the whole-file digest then catches (the transfer
        fails and starts over), never a wrong file presented as complete.
        """
        if durable:
            os.fsync(self.fd)
        record = {"version": _SIDECAR_VERSION, "offset": offset, **{
            k: self.offer[k] for k in ("id", "name", "size", "mtime_ns")}}
        tmp = self.final + _SIDECAR_TMP_SUFFIX
        _unlink_quiet(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            _pwrite_all(fd, json.dumps(record).encode(), 0)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.sidecar)
        if durable:
            _fsync_dir(os.path.dirname(self.final))
        self.checkpointed = offset

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def discard(self) -> None:
        """Remove ``.part`` and its sidecar (their data is bad or unrecorded)."""
        self.close()
        for path in (self.part, self.sidecar, self.final + _SIDECAR_TMP_SUFFIX):
            try:
                _unlink_quiet(path)
            except OSError:
                pass

    def keep_for_resume(self, offset: int) -> bool:
        """Checkpoint at ``offset`` and close; discard everything if that fails."""
        try:
            if self.fd >= 0:
                self.checkpoint(offset)
            self.close()
            return True
        except OSError:
            self.discard()
            return False

    def place(self, overwrite: bool) -> None:
        """fsync, then move ``.part`` to the final name; never replace unless asked."""
        os.fsync(self.fd)
        self.close()
        if overwrite:
            os.replace(self.part, self.final)
        else:
            try:
                os.link(self.part, self.final)  # atomic: fails if the name exists
            except FileExistsError:
                raise TargetExists(self.offer["name"], "the final file appeared during "
                                   "the transfer and overwrite is off") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.lexists(self.final):  # no hard links here: check, then rename
                    raise TargetExists(self.offer["name"], "the final file appeared during "
                                       "the transfer and overwrite is off") from None
                os.replace(self.part, self.final)
            else:
                os.unlink(self.part)
        _fsync_dir(os.path.dirname(self.final))
        _unlink_quiet(self.sidecar)


def _parse_offer(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("kind") != "file-offer":
        kind = header.get("kind") if isinstance(header, dict) else None
        raise FileTransferError(f"expected a file-offer message, got {kind!r}")
    name, size, mtime_ns, fid = (header.get(k) for k in ("name", "size", "mtime_ns", "id"))
    if type(size) is not int or size < 0 or type(mtime_ns) is not int \
            or not isinstance(fid, str) or not isinstance(name, str):
        raise TransferRefused(name if isinstance(name, str) else None,
                              "malformed offer (name, size, mtime_ns, id)")
    if fid != file_id(name, size, mtime_ns):
        raise TransferRefused(name, "the offer's id does not match its name, size and mtime")
    return {"name": name, "size": size, "mtime_ns": mtime_ns, "id": fid}


async def _abort(transport: Transport, fid: str, reason: str) -> None:
    """Tell the sender why we stopped (best effort, bounded)."""
    try:
        await asyncio.wait_for(_send_control(transport, "file-abort", id=fid, reason=reason),
                               _ABORT_WAIT)
    except (asyncio.TimeoutError, ConnectionClosed, StreamError):
        pass


async def receive_file(transport: Transport, directory: str | os.PathLike[str], *,
                       overwrite: bool = False, stream: RecvStream | None = None,
                       progress: Progress | None = None) -> FileResult:
    """Receive one file offered by :func:`send_file` into ``directory``.

    ``stream`` is the offer's stream if the caller already accepted it (a
    dispatcher that looked at ``stream.header["kind"] == "file-offer"``);
    otherwise the next stream is accepted. The file is written into
    ``<name>.part`` with ``pwrite`` and renamed to its final name only after
    the whole-file digest matched; ``progress(done, total)`` follows the
    writes. An existing final file is refused unless ``overwrite``.

    Raises TransferRefused and its kinds (the sender is told why; nothing
    written), TransferInterrupted (``.part`` kept for resume), FileWriteError,
    FileIntegrityError (``.part`` removed).
    """
    started = time.perf_counter()
    root = os.path.realpath(os.fspath(directory))
    if not os.path.isdir(root):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", os.fspath(directory))
    while stream is None:
        stream = await transport.accept_stream()
        if isinstance(stream.header, dict) and stream.header.get("kind") == "file-done":
            # Stale: a sender whose transfer we aborted had already ended it.
            await stream.read_all(_MAX_CONTROL)
            stream = None
    await stream.read_all(_MAX_CONTROL)
    fid = stream.header.get("id") if isinstance(stream.header, dict) else None
    # --- the offer: validate, then accept or refuse
    part: _Part | None = None
    name: str | None = stream.header.get("name") if isinstance(stream.header, dict) else None
    try:
        offer = _parse_offer(stream.header)
        name, size = offer["name"], offer["size"]
        final = _resolve_target(root, name)
        if os.path.lexists(final) and not overwrite:
            raise TargetExists(name, "the file exists and overwrite is off")
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if not _inside(root, os.path.realpath(os.path.dirname(final))):
            raise UnsafeFileName(name, "the name resolves outside the target directory")
        part = _Part(final, offer)
        offset = part.resumable_offset()
        part.open(offset)
        part.checkpoint(offset)
    except TransferRefused as exc:
        if part is not None:
            part.discard()
        await _send_control(transport, "file-refuse", id=fid, reason=exc.reason)
        raise
    except OSError as exc:
        if part is not None:
            part.discard()
        await _send_control(transport, "file-refuse", id=fid,
                            reason=f"receiver cannot create the file: {exc.strerror or exc}")
        raise FileWriteError(name, exc) from exc
    except FileTransferError as exc:
        if isinstance(fid, str):
            await _send_control(transport, "file-refuse", id=fid, reason=str(exc))
        raise
    # --- the data
    pos = offset
    data: RecvStream | None = None
    accepted = False
    try:
        await _send_control(transport, "file-accept", id=fid, offset=offset)
        accepted = True
        hasher = None
        if offset:
            hasher = xxhash.xxh3_128()
            pfd = os.open(part.part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                await _hash_prefix_in_thread(pfd, offset, hasher)
            finally:
                os.close(pfd)
        data = await transport.accept_stream()
        if not isinstance(data.header, dict) or data.header.get("kind") != "file" \
                or data.header.get("id") != fid or data.offset != offset:
            raise FileTransferError(f"file {name!r}: expected the file stream at offset "
                                    f"{offset}, got header {data.header!r} at {data.offset}")
        # From offset 0 the transport's verified stream digest is the file's.
        use_stream_digest = hasher is None and hasattr(data, "digest")
        if hasher is None and not use_stream_digest:
            hasher = xxhash.xxh3_128()
        while True:
            chunk = await data.read()
            if not chunk:
                break
            n = len(chunk)
            if pos + n > size:
                raise FileTransferError(f"file {name!r}: the sender sent more than the "
                                        f"{size} bytes it offered")
            _pwrite_all(part.fd, chunk, pos)
            if hasher is not None:
                hasher.update(chunk)
            del chunk
            pos += n
            if pos - part.checkpointed >= CHECKPOINT_BYTES:
                part.checkpoint(pos, durable=False)
            if progress is not None:
                progress(pos, size)
        if pos != size:
            raise TransferInterrupted(name, pos, f"the stream ended after {pos} of {size} bytes")
        if use_stream_digest:
            digest_bytes = getattr(data, "digest", None)
            if not isinstance(digest_bytes, bytes) or len(digest_bytes) != 16:
                raise FileTransferError(f"file {name!r}: the transport gave no stream digest")
            actual = digest_bytes.hex()
        else:
            assert hasher is not None
            actual = hasher.hexdigest()
        done = await _receive_control(transport, name, fid, ("file-done",))
    except IntegrityError:
        # The transport's stream digest failed: some received bytes are bad.
        part.discard()
        await _finish_failed(transport, name, fid, "stream digest mismatch")
        raise
    except FileTransferError as exc:
        if isinstance(exc, TransferInterrupted):
            part.keep_for_resume(pos)
        else:
            part.discard()
        await _cancel(transport, data, accepted, str(exc))
        await _abort(transport, fid, str(exc))
        raise
    except OSError as exc:
        # Disk full or an I/O error: the bytes before ``pos`` are on disk; keep
        # them for resume if their checkpoint can still be written.
        error = FileWriteError(name, exc)
        await _cancel(transport, data, accepted, str(error))
        part.keep_for_resume(pos)
        await _abort(transport, fid, str(error))
        raise error from exc
    except (StreamError, ConnectionClosed) as exc:
        part.keep_for_resume(pos)
        raise TransferInterrupted(name, pos, _reason(exc)) from exc
    except BaseException as exc:  # cancelled, or a progress callback failed
        await _cancel(transport, data, accepted, f"receiver failed: {_reason(exc)}")
        part.keep_for_resume(pos)
        if not transport.is_closed:
            await _abort(transport, fid, f"receiver failed: {_reason(exc)}")
        raise
    # --- the verdict
    expected = done.get("digest")
    if expected != actual:
        part.discard()
        await _send_control(transport, "file-failed", id=fid, digest=actual)
        raise FileIntegrityError(data.stream_id, name, str(expected), actual)
    try:
        part.place(overwrite)
    except TargetExists as exc:
        part.discard()
        await _send_control(transport, "file-abort", id=fid, reason=exc.reason)
        raise
    except OSError as exc:
        part.discard()
        await _send_control(transport, "file-abort", id=fid, reason=f"cannot place file: {exc}")
        raise FileWriteError(name, exc) from exc
    await _send_control(transport, "file-ok", id=fid, digest=actual)
    return FileResult(part.final, name, size, actual, pos - offset, offset,
                      time.perf_counter() - started)


async def _cancel(transport: Transport, data: RecvStream | None, accepted: bool,
                  reason: str) -> None:
    """Cancel the file stream, accepting it first if the sender opened it already
    (after our file-accept its next stream is the file), so it never sends into
    a stream nobody reads."""
    try:
        if data is None and accepted and not transport.is_closed:
            data = await asyncio.wait_for(transport.accept_stream(), _ABORT_WAIT)
        if data is not None:
            await data.cancel(reason=reason[:200])
    except (asyncio.TimeoutError, ConnectionClosed, StreamError):
        pass


async def _finish_failed(transport: Transport, name: str, fid: str, why: str) -> None:
    """After a failed stream digest: take the sender's file-done, answer file-failed."""
    try:
        await asyncio.wait_for(_receive_control(transport, name, fid, ("file-done",)),
                               _ABORT_WAIT)
        await _send_control(transport, "file-failed", id=fid, digest=why)
    except (asyncio.TimeoutError, ConnectionClosed, StreamError, FileTransferError):
        pass
