"""File payloads: stream one file with memory independent of its size, resumably.

The sender reads the file with ``pread`` into a few reused buffers, a chunk
or two ahead of the wire (on a worker thread), and hands each buffer to
:meth:`SendStream.send`. It never maps the file: a file that shrinks while it
is sent ends the transfer with :class:`~llmwire.SourceChanged`, where a
mapped page past the new end would kill the process with SIGBUS. Before it
declares the file sent it checks that the file did not change (size, mtime,
ctime, inode). The receiver writes each chunk with ``os.pwrite`` at its offset
into ``<name>.part`` (which it owns under an exclusive lock, see
:mod:`llmwire.payloads.landing`), records progress in a sidecar
``<name>.part.json``, and only after the whole-file xxh3-128 of the bytes
read back from ``.part`` matches the sender's fsyncs and renames it into place.

The control messages and the resume rules are in docs/streaming.md ("Files").
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from ..errors import (
    ConnectionClosed,
    FileIntegrityError,
    FileTransferError,
    FileWriteError,
    IntegrityError,
    LlmwireError,
    PayloadRefused,
    SourceChanged,
    StreamCancelled,
    StreamError,
    TargetExists,
    TransferInterrupted,
    TransferRefused,
    UnsafeFileName,
)
from ..transport.base import RecvStream, SendStream, Transport
from .landing import (
    PART_SUFFIX, PartFile, TargetDir, TrailingDigest, check_free_space,
    hash_file, pwrite_all, replace_file,
)
from .source import FileIdentity, check_unchanged, pread_exact
from .verdict import (
    MAX_CONTROL, REPLY_WAIT, failure_fields, raise_failure, receive_control, reply_quietly,
    send_control,
)

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
#: bytes the sender reads ahead of the wire at most (whole chunks, at least two)
DEFAULT_WINDOW = 8 * MiB
#: bytes per read and per ``send()`` call
DEFAULT_CHUNK = 4 * MiB
#: the receiver records its offset in the sidecar this often (not fsynced: see _Part.checkpoint)
CHECKPOINT_BYTES = 64 * MiB
#: suffix of the in-progress file's sidecar (names ending so, or in .part, are refused)
SIDECAR_SUFFIX = ".part.json"
_SIDECAR_TMP_SUFFIX = ".part.json.tmp"

_MAX_NAME_BYTES = 4096
_MAX_PART_BYTES = 255
# the final part must leave room for the in-progress suffixes in a 255-byte name
_MAX_FINAL_BYTES = _MAX_PART_BYTES - len(".part.json.tmp")
_MAX_CONTROL = MAX_CONTROL
_ABORT_WAIT = REPLY_WAIT          # seconds to wait for the peer's file-abort reason
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
    over 4096 bytes, parts over 255 bytes and a final part over 241 (UTF-8:
    its ``.part.json.tmp`` must fit), and final parts ending in
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
    if len(parts[-1].encode("utf-8")) > _MAX_FINAL_BYTES:
        raise UnsafeFileName(shown, f"the file's own name is longer than {_MAX_FINAL_BYTES} "
                                    "bytes (its .part.json.tmp would not fit in 255)")
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


# ------------------------------------------------------------------- control messages


async def _send_control(transport: Transport, kind: str, **fields: Any) -> None:
    await send_control(transport, kind, **fields)


async def _receive_control(transport: Transport, name: str | None, fid: str,
                           kinds: tuple[str, ...], stream: RecvStream | None = None
                           ) -> dict[Any, Any]:
    return await receive_control(transport, kinds, fid, what=f"file {name!r}", stream=stream,
                                 error=FileTransferError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, StreamCancelled):
        return f"{'peer' if exc.remote else 'we'} cancelled the stream: {exc.reason or '-'}"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------- sender


def _hash_prefix(fd: int, length: int, hasher: Any, name: str | None) -> None:
    """Feed bytes [0, length) of ``fd`` to ``hasher``; runs in a worker thread
    and closes ``fd`` (its own dup) when done."""
    try:
        got = hash_file(fd, length, hasher)
    finally:
        os.close(fd)
    if got < length:
        raise SourceChanged(name, f"it ends at byte {got}, before the resumed offset {length}")


async def _hash_prefix_in_thread(fd: int, length: int, hasher: Any, name: str | None) -> None:
    if length:
        # The thread owns a dup: cancelling us never leaves it reading a closed fd.
        await asyncio.to_thread(_hash_prefix, os.dup(fd), length, hasher, name)


class _Progress:
    """Bytes of the data stream handed to the transport so far (for error reports)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


async def _send_range(stream: SendStream, fd: int, name: str, start: int, size: int,
                      depth: int, chunk: int, hasher: Any, progress: Progress | None,
                      done: _Progress) -> None:
    """Send bytes [start, size) of ``fd``, read ``depth`` chunks ahead into reused buffers."""
    loop = asyncio.get_running_loop()
    free = [bytearray(min(chunk, size - start)) for _ in range(min(depth, -(-(size - start)
                                                                        // chunk)))]
    reads: collections.deque[tuple[Any, bytearray, int, int]] = collections.deque()
    ahead = start

    def read_next() -> None:
        nonlocal ahead
        buffer = free.pop()
        n = min(chunk, size - ahead)
        future = loop.run_in_executor(None, pread_exact, fd, memoryview(buffer)[:n], ahead)
        reads.append((future, buffer, ahead, n))
        ahead += n

    try:
        while ahead < size and free:
            read_next()
        while reads:
            future, buffer, pos, n = reads[0]
            got = await future
            if got < n:
                raise SourceChanged(name, f"it ends at byte {pos + got}, {size} were announced")
            with memoryview(buffer)[:n] as piece:
                hasher.update(piece)
                await stream.send(piece)
            reads.popleft()
            free.append(buffer)
            done.sent = pos + n - start
            if progress is not None:
                progress(pos + n, size)
            if ahead < size:
                read_next()
    finally:
        # a read still running writes into one of our buffers with our fd: let it end
        if reads:
            await asyncio.gather(*(f for f, _, _, _ in reads), return_exceptions=True)


async def send_file(transport: Transport, path: str | os.PathLike[str], *,
                    name: str | None = None, window: int = DEFAULT_WINDOW,
                    chunk: int = DEFAULT_CHUNK, progress: Progress | None = None) -> FileResult:
    """Send the file at ``path`` to a peer running :func:`receive_file`.

    ``name`` (default: the file's base name) is the relative POSIX path the
    receiver stores it under. The file is read ``chunk`` bytes at a time with
    ``pread``, at most ``window`` bytes (and at least two chunks) ahead of the
    wire, and sent ``chunk`` bytes per ``send()``; ``progress(done, total)`` is
    called after each chunk. If the receiver holds a verified prefix of this
    file (same name, size and mtime) the transfer resumes there. Returns only
    once the receiver has the file in place under its final name.

    Raises TransferRefused and its kinds (bad name, existing file, a name
    another transfer is receiving...), TransferInterrupted (cancelled by the
    receiver, connection lost: send again to resume), FileIntegrityError
    (whole-file digests differ), FileWriteError (the receiver's disk failed,
    with its errno), SourceChanged (the file changed or shrank while it was
    sent; the receiver keeps nothing final).
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    depth = max(2, -(-window // chunk))
    started = time.perf_counter()
    fspath = os.fspath(path)
    fd = os.open(fspath, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileTransferError(f"{fspath!r} is not a regular file")
        identity = FileIdentity.of(fd)
        name = os.path.basename(fspath) if name is None else name
        check_file_name(name)  # refuse locally what the receiver would refuse
        size, mtime_ns = st.st_size, st.st_mtime_ns
        fid = file_id(name, size, mtime_ns)
        await _send_control(transport, "file-offer", name=name, size=size,
                            mtime_ns=mtime_ns, id=fid)
        reply = await _receive_control(transport, name, fid, ("file-accept", "file-refuse"))
        if reply["kind"] == "file-refuse":
            if "category" not in reply:  # a peer that gives only a reason
                raise TransferRefused(name, str(reply.get("reason", "")))
            raise_failure(reply, name=name, stream_id=0, file=True)
        offset = reply.get("offset")
        if type(offset) is not int or not 0 <= offset <= size:
            raise FileTransferError(f"file {name!r}: the receiver asked to resume at "
                                    f"{offset!r}, outside [0, {size}]")
        # The whole file's xxh3-128: a resumed transfer hashes the prefix,
        # then the rest as it goes out. (The stream's own digest is built
        # from frame checksums, protocol version 2: not a digest of the file.)
        hasher = xxhash.xxh3_128()
        if offset:
            await _hash_prefix_in_thread(fd, offset, hasher, name)
        stream = await transport.open_stream({"kind": "file", "id": fid}, offset=offset)
        done = _Progress()
        try:
            await _send_range(stream, fd, name, offset, size, depth, chunk, hasher,
                              progress, done)
            check_unchanged(fd, identity, name)  # before the end makes it complete
            await stream.end()
        except BaseException as exc:
            await stream.cancel(reason=f"sender failed: {_reason(exc)}"[:200])
            at = offset + done.sent
            if isinstance(exc, StreamCancelled) and exc.remote:
                # The receiver follows its cancel with a file-abort saying why.
                try:
                    abort = await asyncio.wait_for(_receive_control(
                        transport, name, fid, ("file-abort",)), _ABORT_WAIT)
                except (asyncio.TimeoutError, ConnectionClosed, FileTransferError):
                    abort = {"reason": exc.reason}
                _raise_abort(abort, name, at, exc)
            if isinstance(exc, ConnectionClosed):
                raise TransferInterrupted(name, at, _reason(exc)) from exc
            raise
        digest = hasher.hexdigest()
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
            _raise_abort(reply, name, size, None)
        return FileResult(fspath, name, size, digest, done.sent, offset,
                          time.perf_counter() - started)
    finally:
        os.close(fd)


def _raise_abort(abort: dict[Any, Any], name: str, offset: int,
                 cause: BaseException | None) -> None:
    """The receiver aborted the file: its disk, a refusal or an integrity failure
    are theirs to say; anything else interrupted a resumable transfer."""
    if abort.get("category") in ("write", "refused", "integrity"):
        raise_failure(abort, name=name, stream_id=0, file=True, cause=cause)
    raise TransferInterrupted(name, offset, f"the receiver cancelled: "
                                            f"{abort.get('reason', '-')}") from cause


# ------------------------------------------------------------------- receiver


class _Part:
    """``<final>.part`` and its sidecar: the receiver's crash-safe state.

    The ``.part`` is a :class:`~llmwire.payloads.landing.PartFile` (one owner,
    no links followed); the sidecar lives beside it in the same directory,
    reached through the directory's descriptor.
    """

    def __init__(self, directory: TargetDir, final: str, offer: dict[str, Any]) -> None:
        self.dir = directory
        self.file = PartFile(directory, final, offer["name"])
        self.final = final
        self.sidecar = final + SIDECAR_SUFFIX
        self.tmp = final + _SIDECAR_TMP_SUFFIX
        self.offer = offer
        self.checkpointed = -1          # offset the sidecar records

    @property
    def fd(self) -> int:
        return self.file.fd

    def acquire(self) -> int:
        """Own the ``.part``; keep the verified prefix a matching sidecar
        records, drop anything past it; return that offset."""
        self.file.acquire()
        offset = self.resumable_offset()
        self.file.truncate(offset)
        return offset

    def resumable_offset(self) -> int:
        """The verified offset a matching sidecar records, or 0."""
        try:  # never blocks (a FIFO planted there would hang the receiver)
            fd = os.open(self.sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=self.dir.fd)
        except OSError:
            return 0
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0
            record = json.loads(os.read(fd, _MAX_CONTROL))
        except (OSError, ValueError):
            return 0
        finally:
            os.close(fd)
        if not isinstance(record, dict) or record.get("id") != self.offer["id"] \
                or record.get("version") != _SIDECAR_VERSION:
            return 0
        offset = record.get("offset")
        if type(offset) is not int or not 0 <= offset <= self.offer["size"] \
                or offset > self.file.size():
            return 0
        return offset

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
            self.file.sync()
        record = {"version": _SIDECAR_VERSION, "offset": offset, **{
            k: self.offer[k] for k in ("id", "name", "size", "mtime_ns")}}
        replace_file(self.dir, self.sidecar, json.dumps(record).encode(), durable)
        self.checkpointed = offset

    def _remove_sidecar(self) -> None:
        for name in (self.sidecar, self.tmp):
            try:
                self.dir.unlink_quiet(name)
            except OSError:
                pass

    def discard(self) -> None:
        """Remove ``.part`` and its sidecar (their data is bad or unrecorded)."""
        owned = self.file.fd >= 0
        self.file.discard()
        if owned:
            self._remove_sidecar()

    def keep_for_resume(self, offset: int) -> bool:
        """Checkpoint at ``offset`` and release; discard everything if that fails."""
        if self.file.fd < 0:
            return False
        try:
            self.checkpoint(offset)
            self.file.close()
            return True
        except OSError:
            self.discard()
            return False

    def place(self, overwrite: bool) -> None:
        """fsync, then move ``.part`` to the final name; never replace unless asked."""
        self.file.place(overwrite)
        self._remove_sidecar()


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


def _open_target(root: str, name: str, overwrite: bool) -> tuple[TargetDir, str]:
    """The directory ``name`` lands in (walked without following links) and its
    final base name; refuses an existing final name unless ``overwrite``."""
    parts = check_file_name(name)
    directory = TargetDir.walk(root, parts[:-1], create=True, name=name)
    try:
        existing = directory.lstat(parts[-1])
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise TargetExists(name, "a directory exists at the final name")
        if existing is not None and not overwrite:
            raise TargetExists(name, "the file exists and overwrite is off")
    except BaseException:
        directory.close()
        raise
    return directory, parts[-1]


async def _abort(transport: Transport, fid: str, exc: BaseException) -> None:
    """Tell the sender why we stopped (best effort, bounded)."""
    await reply_quietly(transport, "file-abort", id=fid, **failure_fields(exc))


async def _digest_part(part: _Part, size: int, readback: TrailingDigest) -> str:
    """The whole-file digest of ``.part`` as read back from the file (by
    ``readback``, mostly while the bytes arrived); a file that is not exactly
    ``size`` bytes (someone appended) cannot match."""
    held = part.file.size()
    if held != size:
        return f"a file of {held} bytes, not {size}"
    return await asyncio.to_thread(readback.digest)


async def receive_file(transport: Transport, directory: str | os.PathLike[str], *,
                       overwrite: bool = False, stream: RecvStream | None = None,
                       progress: Progress | None = None) -> FileResult:
    """Receive one file offered by :func:`send_file` into ``directory``.

    ``stream`` is the offer's stream if the caller already accepted it (a
    dispatcher that looked at ``stream.header["kind"] == "file-offer"``);
    otherwise the next stream is accepted. The file is written into
    ``<name>.part`` with ``pwrite`` (owned by this transfer alone: a second
    transfer of the same name is refused with TargetBusy meanwhile) and
    renamed to its final name only after the whole-file digest of the bytes
    read back from it matched the sender's; ``progress(done, total)`` follows
    the writes. An existing final file is refused unless ``overwrite``, and so
    is an offer larger than the free space. Symlinks below ``directory`` are
    never followed.

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
    # --- the offer: validate, own the .part, then accept or refuse
    part: _Part | None = None
    target: TargetDir | None = None
    name: str | None = stream.header.get("name") if isinstance(stream.header, dict) else None
    try:
        try:
            offer = _parse_offer(stream.header)
            name, size = offer["name"], offer["size"]
            target, final = _open_target(root, name, overwrite)
            part = _Part(target, final, offer)
            offset = part.acquire()
            check_free_space(target.fd, size - offset, name)
            part.checkpoint(offset)
        except OSError as exc:
            if isinstance(exc, FileTransferError):  # TargetExists is an OSError too
                raise
            raise FileWriteError(name, exc) from exc
    except (FileTransferError, PayloadRefused) as exc:
        if part is not None:
            part.discard()
        if target is not None:
            target.close()
        if isinstance(fid, str):
            await _send_control(transport, "file-refuse", id=fid, **failure_fields(exc))
        raise
    try:
        # The verdict reads the file back; a thread does it behind the writes.
        readback = TrailingDigest(part.fd, offer["size"])
        try:
            return await _receive_data(transport, part, offer, offset, overwrite, progress,
                                       started, readback)
        finally:
            readback.close()
    finally:
        part.file.close()
        target.close()


async def _receive_data(transport: Transport, part: _Part, offer: dict[str, Any], offset: int,
                        overwrite: bool, progress: Progress | None,
                        started: float, readback: TrailingDigest) -> FileResult:
    name, size, fid = offer["name"], offer["size"], offer["id"]
    pos = offset
    readback.advance(offset)
    data: RecvStream | None = None
    accepted = False
    try:
        await _send_control(transport, "file-accept", id=fid, offset=offset)
        accepted = True
        data = await transport.accept_stream()
        if not isinstance(data.header, dict) or data.header.get("kind") != "file" \
                or data.header.get("id") != fid or data.offset != offset:
            raise FileTransferError(f"file {name!r}: expected the file stream at offset "
                                    f"{offset}, got header {data.header!r} at {data.offset}")
        while True:
            chunk = await data.read()
            if not chunk:
                break
            n = len(chunk)
            if pos + n > size:
                raise FileTransferError(f"file {name!r}: the sender sent more than the "
                                        f"{size} bytes it offered")
            pwrite_all(part.fd, chunk, pos)
            del chunk
            pos += n
            readback.advance(pos)
            if pos - part.checkpointed >= CHECKPOINT_BYTES:
                part.checkpoint(pos, durable=False)
            if progress is not None:
                progress(pos, size)
        if pos != size:
            raise TransferInterrupted(name, pos, f"the stream ended after {pos} of {size} bytes")
        done = await _receive_control(transport, name, fid, ("file-done",))
        # The verdict is on the bytes in the file, not on those that crossed the wire.
        actual = await _digest_part(part, size, readback)
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
        await _abort(transport, fid, exc)
        raise
    except OSError as exc:
        # Disk full or an I/O error: the bytes before ``pos`` are on disk; keep
        # them for resume if their checkpoint can still be written.
        error = FileWriteError(name, exc)
        await _cancel(transport, data, accepted, str(error))
        part.keep_for_resume(pos)
        await _abort(transport, fid, error)
        raise error from exc
    except (StreamError, ConnectionClosed) as exc:
        part.keep_for_resume(pos)
        raise TransferInterrupted(name, pos, _reason(exc)) from exc
    except BaseException as exc:  # cancelled, or a progress callback failed
        await _cancel(transport, data, accepted, f"receiver failed: {_reason(exc)}")
        part.keep_for_resume(pos)
        await _abort(transport, fid, TransferInterrupted(name, pos,
                                                         f"receiver failed: {_reason(exc)}"))
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
        await _abort(transport, fid, exc)
        raise
    except OSError as exc:
        part.discard()
        error = FileWriteError(name, exc)
        await _abort(transport, fid, error)
        raise error from exc
    await _send_control(transport, "file-ok", id=fid, digest=actual)
    return FileResult(part.file.final_path, name, size, actual, pos - offset, offset,
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
    except (asyncio.TimeoutError, LlmwireError):
        pass


async def _finish_failed(transport: Transport, name: str, fid: str, why: str) -> None:
    """After a failed stream digest: take the sender's file-done, answer file-failed."""
    try:
        await asyncio.wait_for(_receive_control(transport, name, fid, ("file-done",)),
                               _ABORT_WAIT)
        await _send_control(transport, "file-failed", id=fid, digest=why)
    except (asyncio.TimeoutError, LlmwireError):
        pass
