"""A model directory as one transfer: its weights as a state dict, its other
files as files, nothing final until all of it landed.

The sender announces the directory (``dir-begin``: its name and the names of
its other files), the receiver accepts it and stages it as ``<name>.part/``,
then on the same connection come the weights (a resumable state-dict stream
whose header names the directory, landed as shards with an index in the
staged directory) and each file (the file protocol, relative to the staged
directory), and ``dir-done``. Only when the weights and every announced file
landed does the receiver rename ``<name>.part`` to ``<name>`` and answer
``dir-ok``; anything else keeps the staged directory for the next attempt,
which resumes the weights and files where they stopped (docs/streaming.md,
"Directories").
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import PayloadError, TargetExists, TransferRefused, UnsafeFileName
from ..transport.base import Transport
from .files import check_file_name
from .landing import PART_SUFFIX, TargetDir
from .verdict import failure_fields, raise_failure, receive_control, send_control

__all__ = ["DirectoryLanding", "begin_directory", "end_directory", "directory_files",
           "WEIGHT_NAMES", "MAX_DIRECTORY_FILES"]

#: names in a model directory that hold weights (sent as the state dict)
WEIGHT_NAMES = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                          r"(\.index\.json)?$")
MAX_DIRECTORY_FILES = 10_000


def directory_files(path: str, weights: tuple[str, ...], index: str | None) -> list[str]:
    """The files of a model directory besides its weights: relative POSIX
    names, sorted; hidden names (``.git``, ``.cache``) are left out, links to
    regular files are followed."""
    skip = {os.path.realpath(p) for p in (*weights, *((index,) if index else ()))}
    out = []
    for top, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(top, name)
            if name.startswith(".") or os.path.realpath(full) in skip \
                    or not os.path.isfile(full):
                continue
            out.append(os.path.relpath(full, path).replace(os.sep, "/"))
    if len(out) > MAX_DIRECTORY_FILES:
        raise PayloadError(f"{path}: {len(out)} files, over the limit of {MAX_DIRECTORY_FILES}")
    return out


async def begin_directory(transport: Transport, name: str, files: list[str]) -> str:
    """Announce a directory; return its id once the receiver accepted it
    (its refusal raises, as a file's does: ``TargetExists``...)."""
    key = uuid.uuid4().hex
    await send_control(transport, "dir-begin", id=key, name=name, files=files)
    reply = await receive_control(transport, ("dir-accept", "dir-refuse"), key,
                                  what=f"directory {name!r}", error=PayloadError)
    if reply["kind"] == "dir-refuse":
        raise_failure(reply, name=name, stream_id=0, file=True)
    return key


async def end_directory(transport: Transport, key: str, name: str) -> dict[str, Any]:
    """Everything was sent: wait until the receiver placed the directory."""
    await send_control(transport, "dir-done", id=key)
    reply = await receive_control(transport, ("dir-ok", "dir-failed"), key,
                                  what=f"directory {name!r}", error=PayloadError)
    if reply["kind"] == "dir-failed":
        raise_failure(reply, name=name, stream_id=0, file=True)
    return reply


@dataclass
class DirectoryLanding:
    """The receiving end of one directory: ``<name>.part`` below ``root``."""

    key: str
    name: str
    files: list[str]
    root: str
    overwrite: bool
    landed: set[str] = field(default_factory=set)
    weights: dict[str, Any] | None = None  # the state dict's receipt, once landed

    @classmethod
    def open(cls, header: dict[Any, Any], root: str, overwrite: bool) -> "DirectoryLanding":
        """Check a ``dir-begin`` and stage the directory; raise a refusal."""
        key, name, files = header.get("id"), header.get("name"), header.get("files")
        if not isinstance(key, str) or not isinstance(files, list) \
                or len(files) > MAX_DIRECTORY_FILES:
            raise TransferRefused(name if isinstance(name, str) else None,
                                  "malformed directory offer (id, name, files)")
        parts = check_file_name(name)
        for file in files:
            check_file_name(file)
            if "/" not in file and WEIGHT_NAMES.match(file):
                raise UnsafeFileName(file, "the name of the directory's weights, which "
                                           "arrive as its state dict")
        if len(set(files)) != len(files):
            raise TransferRefused(name, "a file is named twice")
        landing = cls(key, name, list(files), root, overwrite)
        with landing._parent() as parent:
            existing = parent.lstat(parts[-1])
            if existing is not None and not overwrite:
                raise TargetExists(name, "the directory exists and overwrite is off")
            parent.child(parts[-1] + PART_SUFFIX, name).close()
        return landing

    def _parent(self) -> TargetDir:
        parts = check_file_name(self.name)
        return TargetDir.walk(self.root, parts[:-1], create=True, name=self.name)

    @property
    def staged(self) -> str:
        """The staged directory's path (``<root>/<name>.part``)."""
        return os.path.join(self.root, *self.name.split("/")) + PART_SUFFIX

    @property
    def path(self) -> str:
        return os.path.join(self.root, *self.name.split("/"))

    def file_landed(self, name: str) -> None:
        self.landed.add(name)

    def finish(self) -> None:
        """All of it landed: rename ``<name>.part`` to ``<name>``."""
        missing = [f for f in self.files if f not in self.landed]
        if self.weights is None:
            missing.insert(0, "its weights")
        if missing:
            raise PayloadError(f"directory {self.name!r}: {len(missing)} part(s) never landed "
                               f"({', '.join(missing[:3])})")
        final = self.name.split("/")[-1]
        with self._parent() as parent:
            parent.replace_directory(final + PART_SUFFIX, final, self.overwrite, self.name)


async def refuse_directory(transport: Transport, key: Any, exc: BaseException) -> None:
    if isinstance(key, str):
        await send_control(transport, "dir-refuse", id=key, **failure_fields(exc))
