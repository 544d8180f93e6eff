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

from ..errors import LlmwireError, PayloadError

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
        from ..transfer import state_dict_kind

        if not os.path.isfile(model):
            raise LlmwireError(f"--model takes llama, single or a checkpoint file; "
                               f"{model!r} is neither")
        if state_dict_kind(model) is None:
            raise PayloadError(f"{model!r} is not a checkpoint (expected .safetensors, or a "
                               f".pt/.pth/.bin torch checkpoint)")
        source = cls("path", 0, os.path.abspath(model))
        distinct = source._distinct()
        if not distinct:
            raise PayloadError(f"{model!r} holds no tensors")
        return cls("path", sum(int(t.numel()) for t in distinct), source.path,
                   checkpoint_bytes=sum(int(t.numel()) * t.element_size() for t in distinct))

    def describe(self) -> str:
        n = self.count()
        count = f"{n / 1e6:.4g}M parameters" if n >= 10**6 else f"{n:,} parameters"
        if self.kind == "path":
            return f"{os.path.basename(self.path or '')} ({count})"
        return f"{count} ({self.kind})"

    def reference(self) -> dict[str, Any]:
        """The state dict as cheaply as possible: synthetic tensors are built,
        a checkpoint is mapped (pages read only when touched)."""
        if self.kind != "path":
            from ..synthetic import make_state_dict
            return make_state_dict(self.kind, self.params, seed=self.seed)
        from ..transfer import load_safetensors_lazily, load_torch_checkpoint, state_dict_kind

        assert self.path is not None
        if state_dict_kind(self.path) == "safetensors":
            return load_safetensors_lazily(self.path)
        return load_torch_checkpoint(self.path)

    def build(self) -> dict[str, Any]:
        """The state dict in the process's own memory, as a trainer holds it;
        tensors that share storage in the checkpoint (tied weights) still
        share it."""
        state = self.reference()
        if self.kind != "path":
            return state
        import torch

        copies: dict[tuple[int, int], Any] = {}
        out = {}
        for name, t in state.items():
            if not t.numel():  # an empty tensor may report its neighbour's address
                out[name] = t.clone()
                continue
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            copy = copies.get(key)
            if copy is None:
                copy = copies[key] = storage.clone()
            out[name] = torch.empty(0, dtype=t.dtype).set_(copy, t.storage_offset(),
                                                          t.shape, t.stride())
        return out

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
