"""The NumPy reference kernels: the specification of every C kernel.

Each function here defines, bit for bit, what its twin in ``llmwire._native``
must produce; tests compare the two on awkward inputs. The reference favours
clarity over speed, but it is complete: with ``LLMWIRE_PURE_PYTHON=1`` llmwire
runs on it alone.

Dtype conventions: arrays are 1-D and contiguous. ``float32`` and ``float16``
are NumPy's own; ``bfloat16`` travels as ``uint16`` bit patterns.

The rules, in one place:

* **float32 -> float16 / bfloat16** rounds to nearest, ties to even; values
  past the largest finite value become ±inf; NaN stays NaN with its sign,
  quiet, keeping the top payload bits.
* **float16 / bfloat16 -> float32** is exact; a float16 NaN keeps its sign
  and payload and is made quiet (as the F16C instruction does), a bfloat16
  NaN keeps all its bits.
* **Block quantization.** For each block of ``block_size`` elements (the last
  one may be short): ``absmax`` is the largest *finite* magnitude in the block
  (0.0 if there is none). ``inv = 1 / absmax`` (float32; 0 when absmax is 0).
  Each element is scaled ``s = x * inv`` (one float32 rounding); a NaN ``s``
  becomes 0, then ``s`` is clamped to [-1, 1]. The stored code is that of the
  nearest level: ``rank = #{thresholds < s}``, ``code = rank_to_code[rank]``.
  A block whose absmax is subnormal (below 2**-126, where ``1 / absmax``
  would overflow) is first multiplied by 2**32 (exact), values and absmax
  alike; the stored absmax is the unscaled one.
  So ±inf saturates to the extreme levels (±absmax once restored), NaN
  restores as 0, and the number of non-finite inputs is reported so callers
  can refuse them.
* **4-bit packing**: element ``2i`` in the high nibble of byte ``i``, element
  ``2i + 1`` in the low nibble; an odd tail leaves the last low nibble 0.
* **Block dequantization**: ``y = code[c] * absmax`` in float32, then cast to
  the target dtype by the rules above.
"""

from __future__ import annotations

import numpy as np

from .formats import Format

__all__ = [
    "to_float32",
    "from_float32",
    "cast",
    "quantize_blocks",
    "dequantize_blocks",
    "pack_nibbles",
    "unpack_nibbles",
]

_U32 = np.uint32


def _f16_bits_to_f32(h: np.ndarray) -> np.ndarray:
    h = h.astype(_U32)
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    normal = sign | ((exponent + 112) << 23) | (mantissa << 13)
    special = sign | 0x7F800000 | (mantissa << 13) | np.where(mantissa != 0, 0x400000, 0)
    # subnormal halves are m * 2**-24: exact in float32
    subnormal = (mantissa.astype(np.float32) * np.float32(2.0**-24)).view(_U32) | sign
    bits = np.where(exponent == 0x1F, special, np.where(exponent == 0, subnormal, normal))
    return bits.astype(_U32).view(np.float32)


def _round_shift_rne(value: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``value >> shift`` rounded to nearest even (uint64 in, uint64 out)."""
    value = value.astype(np.uint64)
    shift = shift.astype(np.uint64)
    quotient = value >> shift
    remainder = value & ((np.uint64(1) << shift) - np.uint64(1))
    half = np.uint64(1) << (shift - np.uint64(1))
    round_up = (remainder > half) | ((remainder == half) & ((quotient & np.uint64(1)) == 1))
    return quotient + round_up.astype(np.uint64)


def _f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(_U32)
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    # normal range: rebias the exponent, drop 13 mantissa bits with RNE (a
    # carry out of the mantissa correctly bumps the exponent, up to inf)
    rebias = np.where(magnitude >= 0x38800000, magnitude - 0x38000000, 0)
    normal = _round_shift_rne(rebias, np.full_like(rebias, 13))
    # subnormal range: value = m * 2**(e - 150) -> units of 2**-24
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    shift = np.clip(126 - exponent.astype(np.int64), 1, 25)
    subnormal = np.where(exponent >= 102, _round_shift_rne(mantissa, shift), 0)
    nan = 0x7E00 | ((magnitude >> 13) & 0x3FF)
    result = np.where(
        magnitude > 0x7F800000, nan,
        np.where(magnitude >= 0x477FF000, 0x7C00,
                 np.where(magnitude >= 0x38800000, normal, subnormal)))
    return (result.astype(_U32) | sign).astype(np.uint16)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(_U32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits >> 16) | 0x0040
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(is_nan, nan, rounded).astype(np.uint16)


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Widen ``x`` (held as ``dtype``) to float32, exactly."""
    if dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return _f16_bits_to_f32(np.asarray(x).view(np.uint16))
    if dtype == "bfloat16":
        return (np.asarray(x).view(np.uint16).astype(_U32) << 16).view(np.float32)
    raise ValueError(f"unsupported dtype {dtype!r}")


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Narrow float32 ``x`` to ``dtype`` (round to nearest even)."""
    if dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return _f32_to_f16_bits(x).view(np.float16)
    if dtype == "bfloat16":
        return _f32_to_bf16_bits(x)
    raise ValueError(f"unsupported dtype {dtype!r}")


def cast(x: np.ndarray, src_dtype: str, dst_dtype: str) -> np.ndarray:
    """Convert between float32, float16 and bfloat16 by the rules above; a
    cast to the same dtype copies the bits (signalling NaNs included)."""
    if src_dtype == dst_dtype:
        return np.array(x, copy=True)
    return from_float32(to_float32(x, src_dtype), dst_dtype)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte, first in the high nibble."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles` for ``count`` codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:count]


def quantize_blocks(x: np.ndarray, dtype: str, fmt: Format, block_size: int
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize 1-D ``x`` block by block.

    Returns ``(codes, absmax, nonfinite)``: codes as uint8 (packed two per
    byte for 4-bit formats), one float32 absmax per block, and the number of
    NaN/±inf elements seen.
    """
    assert fmt.thresholds is not None and fmt.rank_to_code is not None
    values = to_float32(x, dtype).ravel()
    count = values.size
    nblocks = -(-count // block_size)
    padded = np.zeros(nblocks * block_size, dtype=np.float32)
    padded[:count] = values
    blocks = padded.reshape(nblocks, block_size)
    magnitude = np.abs(blocks)
    finite = magnitude < np.inf
    nonfinite = int(finite.size - np.count_nonzero(finite))  # padding is finite
    absmax = np.where(finite, magnitude, np.float32(0)).max(axis=1, initial=np.float32(0))
    absmax = absmax.astype(np.float32)
    # subnormal absmax: scale the block by 2**32 (exact) so 1/absmax is finite
    tiny = (absmax > 0) & (absmax < np.float32(2.0**-126))
    boost = np.where(tiny, np.float32(2.0**32), np.float32(1))
    divisor = absmax * boost
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        blocks = blocks * boost[:, None]
        inv = np.where(divisor > 0, np.float32(1) / np.where(divisor > 0, divisor, 1), 0)
        scaled = blocks * inv.astype(np.float32)[:, None]
    scaled = np.where(np.isnan(scaled), np.float32(0), scaled)
    scaled = np.clip(scaled, np.float32(-1), np.float32(1)).ravel()[:count]
    ranks = np.searchsorted(fmt.thresholds, scaled, side="left")
    codes = fmt.rank_to_code[ranks]
    if fmt.bits == 4:
        codes = pack_nibbles(codes)
    return codes, absmax, nonfinite


def dequantize_blocks(codes: np.ndarray, absmax: np.ndarray, count: int, fmt: Format,
                      block_size: int, dtype: str) -> np.ndarray:
    """Restore ``count`` elements of ``dtype`` from codes and per-block absmax."""
    assert fmt.code is not None
    indices = unpack_nibbles(codes, count) if fmt.bits == 4 else np.asarray(codes)[:count]
    scales = np.repeat(np.asarray(absmax, dtype=np.float32), block_size)[:count]
    values = fmt.code[indices] * scales
    return from_float32(values, dtype)
