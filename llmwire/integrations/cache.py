"""A client's copy of the last global it received, on disk.

Out of band (llmwire.integrations._link), a client pulls the global as an
update against the one it holds, so that global lives between rounds, and
between processes (Flower starts a fresh ClientApp process for every
message), in a file: a ``.safetensors`` file whose
metadata names its reference (round and digest) and the run it belongs to.
The file is named by run and node, written whole to a ``.part`` of its own
(unique per writer), fsynced and renamed into place, so a file under the
final name is always a complete global; after it is read, its digest is
checked against the one its metadata names (a damaged file is never taken
for the global). It is read with ``pread`` (the pages stay in the page
cache, not in the process): the client holds one model in memory, its own,
while it computes ``local - global``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..checkpoints import Checkpoint, open_checkpoint
from ..errors import CheckpointError, TargetMismatch
from ..payloads.landing import TargetDir, pwrite_all
from ..payloads.sinks import safetensors_header
from ..rounds.reference import Reference, state_digest
from ..tensors import view_tensor

__all__ = ["GlobalCache"]

_CHUNK = 1 << 24


class GlobalCache:
    """The global of run ``run`` as node ``node`` last received it, in
    ``directory`` (``run-<run>-node-<node>.safetensors``)."""

    def __init__(self, directory: str | os.PathLike[str], run: str, node: int | str) -> None:
        self.run = str(run)
        if not self.run.isalnum():
            raise ValueError(f"a run id is alphanumeric, got {run!r}")
        node = str(node)
        if not node or not all(c.isalnum() or c in "-_." for c in node) or node[0] == ".":
            raise ValueError(f"a node id is a plain name (letters, digits, '-', '_', '.'), "
                             f"got {node!r}")
        self.path = Path(directory) / f"run-{self.run}-node-{node}.safetensors"

    def reference(self) -> Reference | None:
        """The reference the file holds for this run, or None (no file, another
        run, unreadable)."""
        try:
            with open_checkpoint(self.path, "safetensors") as ckpt:
                return self.reference_of(ckpt)
        except (OSError, CheckpointError):
            return None

    def reference_of(self, ckpt: Checkpoint) -> Reference | None:
        """The reference an opened cache file names for this run (None: none)."""
        meta = ckpt.metadata
        if meta.get("llmwire-run") != self.run:
            return None
        try:
            return Reference(int(meta["llmwire-round"]), meta["llmwire-digest"])
        except (KeyError, ValueError):
            return None

    def load_into(self, state: Mapping[str, Any]) -> Reference | None:
        """Read the cached global into ``state``'s tensors, in place; its
        reference, or None when there is none that fits ``state`` (``state``
        untouched) or the bytes read are not the global the file names
        (``state`` then holds them: the caller needs whole weights)."""
        try:
            ckpt = open_checkpoint(self.path, "safetensors")
        except (OSError, CheckpointError):
            return None
        with ckpt:
            ref = self.reference_of(ckpt)
            if ref is None or set(ckpt) != set(state):
                return None
            views = {}
            for name, tensor in ckpt.items():
                view = view_tensor(state[name])
                if (view.dtype, view.shape) != (tensor.dtype, tensor.shape) or view.flat is None:
                    return None
                views[name] = (view, view_tensor(tensor))
            for view, cached in views.values():
                flat = view.flat.view(np.uint8)
                step = _CHUNK // max(1, view.flat.itemsize)
                for start in range(0, view.numel, step):
                    stop = min(view.numel, start + step)
                    size = view.flat.itemsize
                    cached.slice(start, stop, flat[start * size:stop * size])
        if state_digest(state) != ref.digest:  # damaged on disk: never claim to hold it
            self.remove()
            return None
        with contextlib.suppress(OSError):
            os.utime(self.path)  # in use: not for prune()
        return ref

    def open(self) -> Checkpoint:
        """The cached global, opened lazily (the base of an update)."""
        return open_checkpoint(self.path, "safetensors")

    def store(self, state: Mapping[str, Any], ref: Reference) -> None:
        """Write ``state`` as this run's global ``ref``: to ``.part``, then renamed."""
        views = {name: view_tensor(tensor) for name, tensor in state.items()}
        for name, view in views.items():
            if view.flat is None:
                raise TargetMismatch(f"{name!r}: not a contiguous tensor")
        head, offsets, _ = safetensors_header(
            [(name, view.dtype, view.shape) for name, view in views.items()],
            {"llmwire-run": self.run, "llmwire-round": str(ref.round),
             "llmwire-digest": ref.digest})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(f"{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            pwrite_all(fd, head, 0)
            for name, view in views.items():
                data = view.flat.view(np.uint8)
                for at in range(0, data.size, _CHUNK):
                    pwrite_all(fd, data[at:at + _CHUNK], len(head) + offsets[name] + at)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(part, self.path)
        with TargetDir.at(self.path.parent) as directory:
            directory.fsync()
        self.prune()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def prune(self, older_than: float = 3600.0) -> int:
        """Delete the cached globals of other runs in this directory that were
        not written for ``older_than`` seconds (node ids change with every
        deployment, so their files would pile up); returns how many."""
        removed, now = 0, time.time()
        for other in self.path.parent.glob("run-*-node-*.safetensors"):
            if other == self.path:
                continue
            try:
                if now - other.stat().st_mtime < older_than:
                    continue
                with open_checkpoint(other, "safetensors") as ckpt:
                    if ckpt.metadata.get("llmwire-run") == self.run:
                        continue
                other.unlink()
                removed += 1
            except (OSError, CheckpointError):
                continue
        return removed
