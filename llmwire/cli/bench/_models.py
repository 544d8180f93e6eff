"""Where a profiled process gets its state dict: synthetic, or a user's checkpoint.

A :class:`ModelSource` is small and picklable, so the parent process checks
it once and hands it to the sender and receiver processes, which each build
their own copy. A user's checkpoint (``.safetensors``, or a torch checkpoint
``.pt``/``.pth``/``.bin`` holding a state dict) is *loaded into private
memory* by :meth:`ModelSource.build`, as a training process holds its model;
the lazy, memory-mapped view (:meth:`ModelSource.reference`) serves for
shapes and for checking what arrived without counting against the peak.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ...errors import LlmwireError, PayloadError

__all__ = ["ModelSource", "SYNTHETIC", "MIN_PARAMS"]

SYNTHETIC = ("llama", "single")
#: the smallest synthetic models, in parameters
MIN_PARAMS = {"llama": 10_000, "single": 4096}


@dataclass(frozen=True)
class ModelSource:
    """``kind`` is ``llama`` or ``single`` (synthetic, ``params`` elements,
    seeded) or ``path`` (a checkpoint file at ``path``)."""

    kind: str
    params: int = 0
    path: str | None = None
    seed: int = 1
    checkpoint_bytes: int = 0  # a checkpoint's tensor bytes, measured once by parse()

    @classmethod
    def parse(cls, model: str, params: int) -> "ModelSource":
        """``--model``: ``llama``, ``single`` or the path of a checkpoint.

        A path is checked here, in the calling process: it must exist and be
        a safetensors file or a torch checkpoint holding a state dict
        (:class:`~llmwire.errors.PayloadError` otherwise).
        """
        if model in SYNTHETIC:
            return cls(model, params)
        from ...checkpoints import checkpoint_kind, open_checkpoint
        from ...tensors import DTYPES

        if not os.path.isfile(model):
            raise LlmwireError(f"--model takes llama, single or a checkpoint file; "
                               f"{model!r} is neither")
        if checkpoint_kind(model) is None:
            raise PayloadError(f"{model!r} is not a checkpoint (expected .safetensors, or a "
                               f".pt/.pth/.bin torch checkpoint)")
        with open_checkpoint(model) as checkpoint:  # its layout: nothing is read yet
            distinct = [(int(_numel(t)), DTYPES[_dtype(t)].itemsize)
                        for t in checkpoint.distinct()]
        if not distinct:
            raise PayloadError(f"{model!r} holds no tensors")
        return cls("path", sum(n for n, _ in distinct), os.path.abspath(model),
                   checkpoint_bytes=sum(n * size for n, size in distinct))

    def describe(self) -> str:
        n = self.count()
        count = f"{n / 1e6:.4g}M parameters" if n >= 10**6 else f"{n:,} parameters"
        if self.kind == "path":
            return f"{os.path.basename(self.path or '')} ({count})"
        return f"{count} ({self.kind})"

    def reference(self) -> dict[str, Any]:
        """The state dict: synthetic tensors are built, a checkpoint is read
        into the process's own memory, as a trainer holds it; names tied to
        one tensor in the checkpoint share one tensor."""
        if self.kind != "path":
            from ..synthetic import make_state_dict
            return make_state_dict(self.kind, self.params, seed=self.seed)
        from ...checkpoints import open_checkpoint

        assert self.path is not None
        with open_checkpoint(self.path) as checkpoint:
            return checkpoint.load()

    def build(self) -> dict[str, Any]:
        """The state dict in the process's own memory (see :meth:`reference`)."""
        return self.reference()

    def zeros(self) -> dict[str, Any]:
        """Zero tensors of the same names, shapes and dtypes (in-place targets)."""
        import torch

        if self.kind == "llama":  # no need to draw the random values
            from ..synthetic import llama_shapes
            return {name: torch.zeros(shape) for name, shape in llama_shapes(self.params).items()}
        return {name: torch.zeros(t.shape, dtype=t.dtype)
                for name, t in self.reference().items()}

    def checkpoint(self, workdir: str) -> str:
        """A checkpoint file for file mode: the user's own, or the synthetic
        state dict saved as safetensors under ``workdir``."""
        if self.kind == "path":
            assert self.path is not None
            return self.path
        from safetensors.torch import save_file

        path = os.path.join(workdir, "model.safetensors")
        save_file(self.reference(), path)
        return path

    def _distinct(self) -> list[Any]:
        """The checkpoint's tensors, a tied tensor (the same elements of the
        same storage, whatever its shape or strides) once."""
        seen: dict[tuple[Any, ...], Any] = {}
        for t in self.reference().values():
            key = ((t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                   if t.numel() else (id(t),))
            seen.setdefault(key, t)
        return list(seen.values())

    def count(self) -> int:
        """Elements in the state dict (a tied tensor once): the number of
        parameters actually built, which for a synthetic Llama is near, not
        at, ``params``. For a checkpoint, :meth:`parse` stores it in ``params``."""
        if self.kind == "llama":
            from ..synthetic import llama_shapes
            return sum(math.prod(shape) for shape in llama_shapes(self.params).values())
        if self.kind == "single":
            return 4096 * max(1, self.params // 4096)
        if self.params:
            return self.params
        return sum(int(t.numel()) for t in self._distinct())

    def nbytes(self) -> int:
        """Bytes of the state dict's tensors (fp32 for synthetic models; a
        tied tensor once). For a checkpoint, :meth:`parse` stores it."""
        if self.kind != "path":
            return 4 * self.count()
        if self.checkpoint_bytes:
            return self.checkpoint_bytes
        return sum(int(t.numel()) * t.element_size() for t in self._distinct())


def _numel(tensor: Any) -> int:
    return tensor.numel if isinstance(tensor.numel, int) else int(tensor.numel())


def _dtype(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")
