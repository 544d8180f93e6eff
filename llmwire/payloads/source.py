"""Reading a file that is being sent, without trusting it to hold still.

A sender reads its source with ``pread`` into buffers it owns, never through
a map: a mapped file that shrinks turns the next touch of a page past its new
end into SIGBUS, which kills the process with no message. With ``pread`` a
shrunk file is a short read, reported as :class:`~llmwire.SourceChanged`.

A file rewritten in place during a send (a training job saving to the same
path) would otherwise land as a copy matching neither version, so a sender
records the file's :class:`FileIdentity` when it opens it and checks it again
before it declares the file sent (:func:`check_unchanged`): size, mtime and
ctime (the kernel updates both on every write and truncate, ctime cannot be
set back by a user, and it changes too when the file is renamed over or
unlinked, as its link count drops). All of it is read from the descriptor the
sender reads through, so nothing can swap the file between check and read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import SourceChanged

__all__ = ["FileIdentity", "check_unchanged", "pread_exact", "read_or_changed"]


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What says a file is still the version a sender started with."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, fd: int) -> "FileIdentity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def differences(self, other: "FileIdentity") -> str:
        """What changed, in words ("" if nothing did)."""
        said = []
        if other.size != self.size:
            said.append(f"size {self.size} -> {other.size}")
        if other.mtime_ns != self.mtime_ns:
            said.append("modified")
        elif other.ctime_ns != self.ctime_ns:
            said.append("status changed (renamed over, unlinked, or its mode or times set)")
        return ", ".join(said)


def check_unchanged(fd: int, identity: FileIdentity, name: str | None) -> None:
    """Raise :class:`~llmwire.SourceChanged` if ``fd`` is not the file it was."""
    what = identity.differences(FileIdentity.of(fd))
    if what:
        raise SourceChanged(name, f"{what} since the send began")


def pread_exact(fd: int, view: Any, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd``; return bytes read (fewer only at EOF)."""
    out = memoryview(view).cast("B")
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def read_or_changed(fd: int, view: Any, offset: int, name: str | None) -> None:
    """Fill ``view`` from ``offset``; a file that ends first raised SourceChanged."""
    want = memoryview(view).nbytes
    got = pread_exact(fd, view, offset)
    if got < want:
        raise SourceChanged(name, f"it ends at byte {offset + got}, before byte "
                                  f"{offset + want} that the send was reading")
