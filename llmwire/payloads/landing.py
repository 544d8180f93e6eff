"""Landing received bytes on disk: one owner per target, no links followed,
nothing final until verified.

Both file transfers and state dicts received into a ``.safetensors`` file
land the same way, through this module:

- :class:`TargetDir` opens the directory a name lands in by walking from a
  trusted root one component at a time with ``O_NOFOLLOW | O_DIRECTORY``
  (creating missing ones), and every later operation (open, link, rename,
  unlink, fsync) is relative to that directory's descriptor. A symlink
  anywhere below the root is refused, and nothing can swap one in between a
  check and the use.
- :class:`PartFile` is ``<name>.part``: opened with ``O_NOFOLLOW`` (a planted
  link is refused, never written through) and held under an exclusive
  ``flock`` for the whole transfer. A second transfer of the same name is
  refused with :class:`~llmwire.TargetBusy` while the first one runs; only
  the holder ever writes, truncates or renames it.
- :meth:`PartFile.place` moves the ``.part`` to its final name only if the
  name still refers to the file this transfer wrote, after an fsync; callers
  decide *whether* to place by digests of the bytes read back from the file
  (:func:`digest_on_disk`), not by what crossed the network.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from typing import Any, Sequence

import xxhash

from ..errors import FileWriteError, TargetBusy, TargetExists, UnsafeFileName

__all__ = ["TargetDir", "PartFile", "TrailingDigest", "replace_file", "digest_on_disk",
           "hash_file", "pwrite_all", "free_bytes",
           "check_free_space", "PART_SUFFIX", "READ_BLOCK"]

PART_SUFFIX = ".part"
#: bytes per read when reading a file back to hash it
READ_BLOCK = 4 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def free_bytes(fd: int) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``fd``."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def check_free_space(fd: int, needed: int, name: str | None) -> None:
    """Raise :class:`FileWriteError` (``ENOSPC``) if ``needed`` bytes do not fit."""
    if needed <= 0:
        return
    free = free_bytes(fd)
    if needed > free:
        raise FileWriteError(name, OSError(
            errno.ENOSPC, f"No space left on device: {needed} bytes needed, {free} free"))


def hash_file(fd: int, length: int, hasher: Any, buffer: bytearray | None = None) -> int:
    """Feed bytes ``[0, length)`` of ``fd`` to ``hasher``, read with ``pread``
    through one reused buffer; return how many there were (fewer than
    ``length`` only if the file ends first)."""
    buf = buffer if buffer is not None else bytearray(min(READ_BLOCK, max(length, 1)))
    view = memoryview(buf)
    pos = 0
    while pos < length:
        n = os.preadv(fd, [view[:min(len(view), length - pos)]], pos)
        if n <= 0:
            break
        hasher.update(view[:n])
        pos += n
    return pos


def digest_on_disk(fd: int, length: int) -> str:
    """xxh3-128 (hex) of bytes ``[0, length)`` of ``fd`` as the file holds them;
    a file shorter than ``length`` raises ``OSError``."""
    hasher = xxhash.xxh3_128()
    got = hash_file(fd, length, hasher)
    if got < length:
        raise OSError(errno.EIO, f"the file ends at byte {got}, before {length}")
    return hasher.hexdigest()


def replace_file(directory: "TargetDir", name: str, data: bytes, durable: bool) -> None:
    """``name`` in ``directory`` holds ``data`` (written to ``<name>.tmp``,
    then renamed over it: a reader sees the old record or the new one, never
    a torn one). Durable: fsynced, and the directory after the rename."""
    tmp = name + ".tmp"
    directory.unlink_quiet(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=directory.fd)
    try:
        pwrite_all(fd, data, 0)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
    if durable:
        directory.fsync()


class TrailingDigest:
    """xxh3-128 (hex) of bytes ``[0, length)`` of ``fd`` *as the file holds
    them*, read back while the file is still being written: a worker thread
    reads and hashes up to the mark the writer has reached
    (:meth:`advance`), so the read-back overlaps the transfer instead of
    following it. :meth:`digest` waits for the rest; :meth:`close` (always)
    stops the thread and closes its own copy of ``fd``."""

    def __init__(self, fd: int, length: int, block: int = READ_BLOCK) -> None:
        self._fd = os.dup(fd)
        self._length = length
        self._block = max(1, min(block, length or 1))
        self._mark = 0
        self._done = 0
        self._stop = False
        self._error: OSError | None = None
        self._hasher = xxhash.xxh3_128()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="llmwire-readback", daemon=True)
        self._thread.start()

    def advance(self, mark: int) -> None:
        """Bytes ``[0, mark)`` are written (``pwrite`` returned)."""
        with self._cond:
            if mark > self._mark:
                self._mark = min(mark, self._length)
                if self._mark - self._done >= self._block or self._mark == self._length:
                    self._cond.notify()

    def _run(self) -> None:
        view = memoryview(bytearray(self._block))
        try:
            while self._done < self._length:
                with self._cond:
                    while not self._stop and self._mark - self._done < self._block \
                            and self._mark < self._length:
                        self._cond.wait()
                    if self._stop:
                        return
                    upto = self._mark
                while self._done < upto:
                    n = os.preadv(self._fd, [view[:min(self._block, upto - self._done)]],
                                  self._done)
                    if n <= 0:
                        raise OSError(errno.EIO, f"the file ends at byte {self._done}, "
                                                 f"before {self._length}")
                    self._hasher.update(view[:n])
                    self._done += n
        except OSError as exc:
            self._error = exc

    def digest(self) -> str:
        """The digest, once every byte up to ``length`` was written and read
        back (blocks: call it in a worker thread)."""
        self.advance(self._length)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        os.close(self._fd)


class TargetDir:
    """A directory below a trusted root, opened without following links.

    ``TargetDir.walk(root, ("a", "b"))`` opens ``root/a/b`` (making missing
    parts with ``create=True``); a part that is a symlink, or exists and is
    not a directory, raises :class:`~llmwire.UnsafeFileName` naming ``name``.
    ``TargetDir.at(path)`` opens a directory the caller trusts as it is.
    """

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> "TargetDir":
        path = os.fspath(path)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    @classmethod
    def walk(cls, root: str, parts: Sequence[str], *, create: bool = True,
             name: str | None = None) -> "TargetDir":
        current = cls.at(root)
        try:
            for part in parts:
                current = current._child(part, create, name)
        except BaseException:
            current.close()
            raise
        return current

    def _child(self, part: str, create: bool, name: str | None) -> "TargetDir":
        path = os.path.join(self.path, part)
        try:
            fd = os.open(part, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(part, 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass  # made meanwhile: opened (and checked) below
            fd = self._open_dir(part, name)
        except OSError as exc:
            self._refuse(exc, part, name)
        self.close()
        return TargetDir(fd, path)

    def _open_dir(self, part: str, name: str | None) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            self._refuse(exc, part, name)

    def _refuse(self, exc: OSError, part: str, name: str | None) -> Any:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            self.close()
            raise UnsafeFileName(name, f"{part!r} is a symlink or not a directory "
                                       "(links below the target directory are not followed)"
                                 ) from None
        raise exc

    def child(self, part: str, name: str | None = None) -> "TargetDir":
        """The directory ``part`` in this one (made if missing, never a link);
        this one stays open."""
        fd = os.dup(self.fd)
        return TargetDir(fd, self.path)._child(part, True, name)

    def replace_directory(self, source: str, final: str, overwrite: bool,
                          name: str | None = None) -> None:
        """Rename the directory ``source`` to ``final`` (both in this one).
        An existing ``final`` is refused (:class:`~llmwire.TargetExists`)
        unless ``overwrite``; then it is moved aside, the new one renamed in,
        and the old one removed."""
        import shutil

        existing = self.lstat(final)
        if existing is not None:
            if not overwrite:
                raise TargetExists(name or final, "the directory exists and overwrite is off")
            if not stat.S_ISDIR(existing.st_mode):
                raise TargetExists(name or final, "a file is there, not a directory")
            aside = f"{final}.replaced{PART_SUFFIX}"
            if self.lstat(aside) is not None:
                shutil.rmtree(os.path.join(self.path, aside))
            os.rename(final, aside, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            os.rename(source, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            self.fsync()
            shutil.rmtree(os.path.join(self.path, aside), ignore_errors=True)
        else:
            # rename(2) replaces an empty directory: the check above refuses one
            # that exists; one made in the instant between is replaced (empty)
            os.rename(source, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.fsync()

    def rmdir_quiet(self, name: str) -> None:
        """Remove the directory ``name`` if it is empty."""
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            pass

    def lstat(self, name: str) -> os.stat_result | None:
        """``lstat`` of ``name`` in this directory, or None if it does not exist."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def unlink_quiet(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "TargetDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PartFile:
    """``<final>.part`` in a :class:`TargetDir`, owned by exactly one transfer.

    :meth:`acquire` opens (creating) the ``.part`` with ``O_NOFOLLOW`` and
    takes an exclusive, non-blocking ``flock`` on it; it does not truncate,
    so a caller can decide what of an earlier ``.part`` to keep only once it
    owns it. An earlier ``.part`` that another name also leads to (a hard
    link) or that another user owns is never written through: it is
    replaced by a new file. Raises :class:`~llmwire.TargetBusy` if another
    transfer holds the lock, :class:`~llmwire.UnsafeFileName` if ``.part`` is
    a symlink or not a regular file. The lock lives as long as the descriptor: :meth:`close`,
    :meth:`place` and :meth:`discard` release it (so does the process's death).
    """

    def __init__(self, directory: TargetDir, final: str, name: str | None = None) -> None:
        self.dir = directory
        self.final = final               # base name in ``directory``
        self.part = final + PART_SUFFIX
        self.name = name if name is not None else final  # as the user knows it
        self.fd = -1

    @property
    def path(self) -> str:
        return os.path.join(self.dir.path, self.part)

    @property
    def final_path(self) -> str:
        return os.path.join(self.dir.path, self.final)

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(8):
            try:
                fd = os.open(self.part, flags, 0o644, dir_fd=self.dir.fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeFileName(self.name, f"{self.part!r} is a symlink "
                                                    "(not followed)") from None
                raise
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeFileName(self.name, f"{self.part!r} is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise TargetBusy(self.name) from None
                # Between our open and our lock the owner may have placed (renamed)
                # or discarded the file: then the name is someone else's now.
                now = self.dir.lstat(self.part)
                if now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                    if st.st_nlink == 1 and st.st_uid == os.geteuid():
                        os.set_blocking(fd, True)
                        self.fd = fd
                        return
                    # Another name leads to this inode (a hard link: planted, or left
                    # by a receiver killed between link and unlink in place()), or it
                    # is not ours: never write through it. Its name goes; a fresh
                    # inode takes it.
                    self.dir.unlink_quiet(self.part)
                    flags |= os.O_EXCL
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise TargetBusy(self.name)

    def owns_name(self) -> bool:
        """Whether ``<final>.part`` still names the file we hold."""
        if self.fd < 0:
            return False
        now, st = self.dir.lstat(self.part), os.fstat(self.fd)
        return now is not None and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated(self) -> int:
        """Bytes the file already occupies on disk (sparse files count less)."""
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def write(self, data: Any, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def digest(self, length: int) -> str:
        """xxh3-128 (hex) of the file as it holds them, which must be exactly
        ``length`` bytes (``OSError`` otherwise: bytes someone appended count)."""
        size = self.size()
        if size != length:
            raise OSError(errno.EIO, f"{self.part} holds {size} bytes, not {length}")
        return digest_on_disk(self.fd, length)

    def sync(self) -> None:
        os.fsync(self.fd)

    def place(self, overwrite: bool) -> None:
        """fsync, then move ``.part`` to the final name; never replace unless asked.

        Raises :class:`~llmwire.TargetExists` if the final name appeared and
        ``overwrite`` is off, and ``OSError`` if ``.part`` no longer names the
        file this transfer wrote (nothing is moved then).
        """
        os.fsync(self.fd)
        if not self.owns_name():
            raise OSError(errno.ESTALE, f"{self.part} was replaced during the transfer")
        fd = self.dir.fd
        if overwrite:
            existing = self.dir.lstat(self.final)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise TargetExists(self.name, "a directory exists at the final name")
            os.replace(self.part, self.final, src_dir_fd=fd, dst_dir_fd=fd)
        else:
            try:  # atomic: fails if the name exists, whatever it is
                os.link(self.part, self.final, src_dir_fd=fd, dst_dir_fd=fd,
                        follow_symlinks=False)
            except FileExistsError:
                raise TargetExists(self.name, "the final file appeared during the transfer "
                                              "and overwrite is off") from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if self.dir.lstat(self.final) is not None:  # no hard links: check, rename
                    raise TargetExists(self.name, "the final file appeared during the "
                                                  "transfer and overwrite is off") from None
                os.replace(self.part, self.final, src_dir_fd=fd, dst_dir_fd=fd)
            else:
                os.unlink(self.part, dir_fd=fd)
        self.dir.fsync()
        self.close()

    def close(self) -> None:
        """Release the descriptor and the lock (the ``.part`` stays)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def discard(self) -> None:
        """Remove the ``.part`` if it is still ours, then release it."""
        try:
            if self.owns_name():
                self.dir.unlink_quiet(self.part)
        except OSError:
            pass
        self.close()
