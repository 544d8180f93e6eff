"""Adapters between torch tensors, NumPy arrays and flat byte views.

llmwire's kernels work on 1-D contiguous NumPy arrays; this module turns a
user's tensor into such views *without copying* where the tensor is
contiguous, and into bounded per-slice copies where it is not. ``bfloat16``,
which NumPy lacks, is carried as ``uint16`` bit patterns.

torch is optional: nothing here imports it unless a torch tensor is handed in
or asked for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QuantizationError

__all__ = ["DTYPES", "DtypeInfo", "TensorView", "view_tensor", "empty_like_spec", "torch_module"]


@dataclass(frozen=True)
class DtypeInfo:
    """One element type as llmwire names it (torch's spelling)."""

    name: str
    numpy: np.dtype  # how the bytes are held in NumPy (bfloat16 -> uint16)
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


DTYPES: dict[str, DtypeInfo] = {
    info.name: info
    for info in (
        DtypeInfo("float32", np.dtype(np.float32), True),
        DtypeInfo("float16", np.dtype(np.float16), True),
        DtypeInfo("bfloat16", np.dtype(np.uint16), True),
        DtypeInfo("float64", np.dtype(np.float64), True),
        DtypeInfo("int8", np.dtype(np.int8), False),
        DtypeInfo("uint8", np.dtype(np.uint8), False),
        DtypeInfo("int16", np.dtype(np.int16), False),
        DtypeInfo("uint16", np.dtype(np.uint16), False),
        DtypeInfo("int32", np.dtype(np.int32), False),
        DtypeInfo("uint32", np.dtype(np.uint32), False),
        DtypeInfo("int64", np.dtype(np.int64), False),
        DtypeInfo("uint64", np.dtype(np.uint64), False),
        DtypeInfo("bool", np.dtype(np.bool_), False),
    )
}


def torch_module() -> Any:
    """The torch module if it is importable, else ``None`` (never imports it
    eagerly at llmwire import time)."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        import torch
    except ImportError:
        return None
    return torch


def _is_torch(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


@dataclass
class TensorView:
    """A tensor seen as llmwire sees it.

    ``array`` is a NumPy view sharing memory with the tensor (possibly
    strided); ``flat`` is a 1-D contiguous view when the tensor is
    contiguous, else ``None``; ``container`` is ``"torch"`` or ``"numpy"``.
    """

    array: np.ndarray
    dtype: str
    shape: tuple[int, ...]
    container: str
    source: Any

    @property
    def numel(self) -> int:
        return int(self.array.size)

    @property
    def flat(self) -> np.ndarray | None:
        if self.array.flags.c_contiguous:
            return self.array.reshape(-1)
        return None

    def slice(self, start: int, stop: int, scratch: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` in row-major order as a contiguous 1-D
        array: a view when possible, else a copy of at most the slice plus
        one row on either side (never of the whole tensor). ``scratch`` is for
        views whose values live elsewhere (a file): memory views ignore it."""
        flat = self.flat
        if flat is not None:
            return flat[start:stop]
        array = self.array
        if array.ndim <= 1:
            return np.ascontiguousarray(array.reshape(-1)[start:stop])
        row = int(np.prod(array.shape[1:]))
        first, last = start // row, -(-stop // row)
        rows = np.ascontiguousarray(array[first:last]).reshape(-1)
        return rows[start - first * row: stop - first * row]


def view_tensor(tensor: Any) -> TensorView:
    """Wrap a torch tensor or NumPy array without copying its data.

    A torch tensor on another device is brought to the CPU first (a copy, as
    there is no other way to read it); a tensor that requires grad is
    detached. An object with a ``_llmwire_view()`` method (such as
    :class:`~llmwire.checkpoints.FileTensor`) supplies its own view. Raises
    :class:`QuantizationError` for other objects and for dtypes llmwire does
    not know.
    """
    own = getattr(type(tensor), "_llmwire_view", None)
    if own is not None:
        return own(tensor)
    if _is_torch(tensor):
        torch = sys.modules["torch"]
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise QuantizationError(f"unsupported dtype {name}")
        if name == "bfloat16":
            array = t.view(torch.int16).numpy().view(np.uint16)
        else:
            array = t.numpy()
        return TensorView(array, name, tuple(t.shape), "torch", tensor)
    if isinstance(tensor, np.ndarray):
        name = tensor.dtype.name
        if name not in DTYPES or tensor.dtype.byteorder == ">":
            raise QuantizationError(f"unsupported dtype {tensor.dtype}")
        # ml_dtypes' bfloat16 (if a user has it) is held as its bit patterns
        array = tensor.view(np.uint16) if name == "bfloat16" else tensor
        return TensorView(array, name, tuple(tensor.shape), "numpy", tensor)
    raise QuantizationError(
        f"expected a torch tensor or NumPy array, got {type(tensor).__name__}")


def empty_like_spec(shape: tuple[int, ...], dtype: str, container: str) -> tuple[Any, np.ndarray]:
    """Allocate an uninitialised tensor; return it and a flat NumPy view of it."""
    info = DTYPES[dtype]
    if container == "torch":
        torch = torch_module()
        if torch is None:
            raise QuantizationError("this tensor came from torch, which is not installed here")
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        return tensor, view_tensor(tensor).array.reshape(-1)
    array = np.empty(shape, dtype=info.numpy)
    return array, array.reshape(-1)
