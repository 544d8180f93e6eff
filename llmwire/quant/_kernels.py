"""The one place that picks the C kernels or the NumPy reference.

``LLMWIRE_PURE_PYTHON=1`` in the environment forces the reference; otherwise
the C extension ``llmwire._native`` is used when it imports. Both paths take
the same arguments, write into caller-provided arrays and raise the same
errors, so nothing above this module knows which one runs.

All arrays passed here are 1-D and C-contiguous; ``bfloat16`` data is held as
``uint16``. Argument checking is done by the callers (``codec``).
"""

from __future__ import annotations

import os

import numpy as np

from . import reference
from .formats import FORMATS, Format

__all__ = ["IMPLEMENTATION", "DTYPE_CODES", "cast_into", "quantize_into", "dequantize_into"]

#: dtype name -> the integer the C kernels use
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

_native = None
if os.environ.get("LLMWIRE_PURE_PYTHON", "") in ("", "0"):
    try:
        from .. import _native  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - exercised by builds without a compiler
        _native = None

#: ``"native"`` (C extension) or ``"reference"`` (NumPy)
IMPLEMENTATION = "native" if _native is not None else "reference"


class _Tables:
    """A block format's decision tables, laid out as the C kernels read them."""

    def __init__(self, fmt: Format) -> None:
        assert fmt.thresholds is not None and fmt.rank_to_code is not None and fmt.code is not None
        self.bits = fmt.bits
        size = 256 if fmt.bits == 8 else 15
        thresholds = np.full(size, np.inf, dtype=np.float32)
        thresholds[: fmt.thresholds.size] = fmt.thresholds
        self.thresholds = thresholds
        self.rank_to_code = np.ascontiguousarray(fmt.rank_to_code, dtype=np.uint8)
        self.code_values = np.ascontiguousarray(fmt.code, dtype=np.float32)
        self.buckets = _bucket_table(fmt.thresholds) if fmt.bits == 8 else np.zeros(0, np.uint8)


def _bucket_table(thresholds: np.ndarray) -> np.ndarray:
    """For each top-16-bit bucket of a float32 in [-1, 1], the count of
    thresholds below every value in it. The 8-bit kernel then needs one
    compare (against ``thresholds[count]``) to finish the search; that is
    exact only if no bucket holds two thresholds, which is checked here."""
    bucket = np.arange(65536, dtype=np.uint32)
    first = (bucket << 16).view(np.float32)
    last = ((bucket << 16) | 0xFFFF).view(np.float32)
    negative = bucket >= 0x8000
    low = np.clip(np.where(negative, last, first), -1, 1)
    high = np.clip(np.where(negative, first, last), -1, 1)
    valid = ~(np.isnan(low) | np.isnan(high))
    low = np.where(valid, low, 0)
    high = np.where(valid, high, 0)
    below = np.searchsorted(thresholds, low, side="left")
    inside = np.searchsorted(thresholds, high, side="right") - below
    if inside.max() > 1:  # pragma: no cover - guards a future code table
        raise AssertionError("code table too dense for the 16-bit bucket search")
    return below.astype(np.uint8)


_TABLES = {name: _Tables(fmt) for name, fmt in FORMATS.items() if fmt.is_block}


def cast_into(src: np.ndarray, src_dtype: str, out: np.ndarray, dst_dtype: str, *,
              bypass_cache: bool = False) -> None:
    """Convert ``src`` into ``out`` (same element count). ``bypass_cache``
    writes ``out`` with non-temporal stores: faster for large outputs that
    will not be read soon, slower for buffers about to be sent."""
    if _native is not None:
        _native.cast(src, DTYPE_CODES[src_dtype], out, DTYPE_CODES[dst_dtype], src.size,
                     bypass_cache)
    else:
        out[...] = reference.cast(src, src_dtype, dst_dtype).view(out.dtype)


def quantize_into(src: np.ndarray, dtype: str, fmt: Format, block_size: int,
                  codes: np.ndarray, absmax: np.ndarray) -> int:
    """Quantize ``src`` into ``codes``/``absmax``; return the non-finite count."""
    if _native is not None:
        t = _TABLES[fmt.name]
        return _native.quantize(src, DTYPE_CODES[dtype], src.size, block_size, t.bits,
                                t.thresholds, t.rank_to_code, t.buckets, codes, absmax)
    ref_codes, ref_absmax, nonfinite = reference.quantize_blocks(src, dtype, fmt, block_size)
    codes[: ref_codes.size] = ref_codes
    absmax[: ref_absmax.size] = ref_absmax
    return nonfinite


def dequantize_into(codes: np.ndarray, absmax: np.ndarray, count: int, fmt: Format,
                    block_size: int, out: np.ndarray, dtype: str, *,
                    bypass_cache: bool = False) -> None:
    """Restore ``count`` elements into ``out`` (held as ``dtype``);
    ``bypass_cache`` as for :func:`cast_into`."""
    if _native is not None:
        t = _TABLES[fmt.name]
        _native.dequantize(codes, absmax, count, block_size, t.bits, t.code_values,
                           out, DTYPE_CODES[dtype], bypass_cache)
    else:
        out[...] = reference.dequantize_blocks(codes, absmax, count, fmt, block_size,
                                               dtype).view(out.dtype)
