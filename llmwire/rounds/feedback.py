"""Error feedback: what quantization dropped from one update, added to the next.

An update ``u`` quantized to ``Q(u)`` restores to ``q = dq(Q(u))``; the
residual ``u - q`` is kept and added to the next update before it is
quantized, so the error does not accumulate over rounds. One residual is kept
per peer key (a client's uplink to its server; the server's broadcast
lineage), each one buffer the size of the float tensors, in ``dtype``
(``float32``, or ``bfloat16`` for half the memory), allocated at the first
update that needs it.

Reset rule: a residual belongs to a chain of updates that all landed. It is
cleared (:meth:`ErrorFeedback.reset`) when a send of that peer fails or is
refused (what it carried never arrived), when the peer's reference is
replaced by full weights, and whenever the caller asks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..errors import PayloadError
from ..quant import _kernels

__all__ = ["ErrorFeedback"]

_DTYPES = {"float32": np.float32, "bfloat16": np.uint16}


class ErrorFeedback:
    """Residuals per peer key, per tensor name (flat arrays, zeros at first)."""

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise PayloadError(f"error feedback residuals are float32 or bfloat16, not {dtype!r}")
        self.dtype = dtype
        self._residuals: dict[Any, dict[str, np.ndarray]] = {}
        #: per peer, per name: the starts of the slices whose residual is not zero
        self._nonzero: dict[Any, dict[str, set[int]]] = {}
        self._lock = threading.Lock()

    def residual(self, peer: Any, name: str, numel: int) -> np.ndarray:
        """The flat residual of tensor ``name`` for ``peer`` (allocated as zeros)."""
        with self._lock:
            store = self._residuals.setdefault(peer, {})
            array = store.get(name)
            if array is None or array.size != numel:
                array = store[name] = np.zeros(numel, _DTYPES[self.dtype])
            return array

    def is_zero(self, peer: Any, name: str) -> bool:
        """Whether ``name``'s residual for ``peer`` holds nothing."""
        return not self._nonzero.get(peer, {}).get(name)

    def add_into(self, peer: Any, name: str, start: int, values: np.ndarray) -> None:
        """``values += residual[start:...]`` (float32 ``values``)."""
        if self.is_zero(peer, name):
            return
        residual = self._residuals[peer][name][start:start + values.size]
        if self.dtype == "float32":
            values += residual
        else:
            values += _as_float32(residual)

    def store(self, peer: Any, name: str, numel: int, start: int, wanted: np.ndarray,
              restored: np.ndarray) -> None:
        """The residual of ``name``'s slice at ``start``: ``wanted - restored``
        (both float32; ``restored`` is overwritten). A value that was not
        finite (mapped by ``nonfinite="saturate"``) leaves no residual: it is
        not carried into the next round."""
        np.subtract(wanted, restored, out=restored)
        np.nan_to_num(restored, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        residual = self.residual(peer, name, numel)[start:start + restored.size]
        if self.dtype == "float32":
            residual[...] = restored
        else:
            _kernels.cast_into(restored, "float32", residual, "bfloat16")
        with self._lock:
            starts = self._nonzero.setdefault(peer, {}).setdefault(name, set())
            if restored.any():
                starts.add(start)
            else:
                starts.discard(start)

    def clear(self, peer: Any, name: str, start: int, count: int) -> None:
        """Nothing was dropped from ``name``'s slice at ``start``: zero its residual."""
        if not self.is_zero(peer, name):
            self._residuals[peer][name][start:start + count] = 0
            with self._lock:
                self._nonzero[peer][name].discard(start)

    def memory_bytes(self, peer: Any = None) -> int:
        """Bytes the residuals hold (of ``peer``, or all)."""
        stores = [self._residuals.get(peer, {})] if peer is not None \
            else list(self._residuals.values())
        return sum(a.nbytes for store in stores for a in store.values())

    def reset(self, peer: Any = None) -> None:
        """Forget the residuals of ``peer`` (of every peer when None)."""
        with self._lock:
            if peer is None:
                self._residuals.clear()
                self._nonzero.clear()
            else:
                self._residuals.pop(peer, None)
                self._nonzero.pop(peer, None)


def _as_float32(bits: np.ndarray) -> np.ndarray:
    out = np.empty(bits.size, np.float32)
    _kernels.cast_into(bits, "bfloat16", out, "float32")
    return out
