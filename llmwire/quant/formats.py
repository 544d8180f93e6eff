"""Quantization formats: names, block sizes and code tables.

This module is the single source of truth for every constant the kernels use.
The block formats follow bitsandbytes' blockwise layout (float32 absmax per
block; the 256-entry signed dynamic code for ``blockwise8``; the 16-entry FP4
and NF4 tables for ``fp4``/``nf4``, two values per byte, first value in the
high nibble), so a packed tensor means the same thing to both libraries.

Quantizing maps each scaled value to the nearest code *level* (ties go to the
smaller level); the decision thresholds are the float32 midpoints between
adjacent distinct levels. See docs/quantization.md for the byte layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import QuantizationError

__all__ = [
    "Format",
    "FORMATS",
    "FLOAT_DTYPES",
    "NESTED_GROUP",
    "NESTED_FORMAT",
    "get_format",
    "parse_format_list",
    "DYNAMIC8_CODE",
    "FP4_CODE",
    "NF4_CODE",
]

# bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)),
# as float32 bit patterns in ascending order: 254 "dynamic exponent + linear
# fraction" values, 0 and 1.0. Stored as bits so no float formatting can
# perturb them; tests rebuild the table from its definition.
_DYNAMIC8_BITS = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]

DYNAMIC8_CODE: np.ndarray = np.array(_DYNAMIC8_BITS, dtype=np.uint32).view(np.float32)
DYNAMIC8_CODE.setflags(write=False)

# bitsandbytes' FP4 table (1 sign bit, 2 exponent bits, 1 mantissa bit, scaled
# so the largest magnitude is 1), indexed by the stored nibble. Nibble 1000
# ("negative zero") restores as +0.0, as in bitsandbytes' published table;
# llmwire never writes it (zero is stored as 0000).
FP4_CODE: np.ndarray = np.array(
    [0.0, 0.0052083333, 0.6666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
     0.0, -0.0052083333, -0.6666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25],
    dtype=np.float32,
)
FP4_CODE.setflags(write=False)

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al.
# 2023), indexed by the stored nibble, as bitsandbytes ships them.
NF4_CODE: np.ndarray = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
     0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)

#: Source/target dtypes the float formats accept (names as torch spells them).
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

#: Nested (double) quantization groups this many absmax values of a 4-bit
#: format and stores them with ``blockwise8`` around the group's mean.
NESTED_GROUP = 256


@dataclass(frozen=True)
class Format:
    """One quantization format.

    ``kind`` is ``"cast"`` (fp16/bf16: element-wise conversion), ``"block"``
    (absmax-scaled code table) or ``"raw"`` (bytes as they are).
    """

    name: str
    kind: str
    bits: int
    default_block_size: int = 0
    code: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: distinct code values, ascending (float32)
    levels: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: float32 midpoints between adjacent levels, padded with +inf to
    #: ``2**bits - 1`` entries (a padded threshold never counts)
    thresholds: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: level rank -> stored code (uint8); the zero level maps to the +0 code
    rank_to_code: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def is_block(self) -> bool:
        return self.kind == "block"

    def wire_bytes(self, numel: int, block_size: int | None = None, nested: bool = False) -> int:
        """Payload bytes (codes + scales) for ``numel`` elements, no header."""
        if self.kind == "cast":
            return 2 * numel
        if self.kind == "raw":
            raise QuantizationError("raw size depends on the dtype")
        block = block_size or self.default_block_size
        nblocks = -(-numel // block)
        codes = numel if self.bits == 8 else (numel + 1) // 2
        if nested:
            ngroups = -(-nblocks // NESTED_GROUP)
            return codes + nblocks + 8 * ngroups  # uint8 absmax + (scale, offset) f32
        return codes + 4 * nblocks


def _block_format(name: str, code: np.ndarray, block_size: int) -> Format:
    bits = int(np.log2(len(code)))
    levels = np.unique(code)  # sorted, and -0.0 == 0.0 collapse to one level
    mids64 = (levels[:-1].astype(np.float64) + levels[1:].astype(np.float64)) / 2.0
    thresholds = np.full(2**bits - 1, np.inf, dtype=np.float32)
    thresholds[: len(mids64)] = mids64.astype(np.float32)
    rank_to_code = np.zeros(2**bits, dtype=np.uint8)
    for rank, level in enumerate(levels):
        rank_to_code[rank] = np.flatnonzero(code == level)[0]  # zero: the first, +0 code
    for array in (levels, thresholds, rank_to_code):
        array.setflags(write=False)
    return Format(name, "block", bits, block_size, code, levels, thresholds, rank_to_code)


FORMATS: dict[str, Format] = {
    "fp16": Format("fp16", "cast", 16),
    "bf16": Format("bf16", "cast", 16),
    "blockwise8": _block_format("blockwise8", DYNAMIC8_CODE, 4096),
    "fp4": _block_format("fp4", FP4_CODE, 64),
    "nf4": _block_format("nf4", NF4_CODE, 64),
    "raw": Format("raw", "raw", 0),
}

#: The format nested quantization stores absmax values in.
NESTED_FORMAT = FORMATS["blockwise8"]

#: Block sizes a block format accepts (bitsandbytes accepts the same set).
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def get_format(name: str | Format) -> Format:
    """Return the :class:`Format` called ``name``; :class:`QuantizationError` if unknown."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(FORMATS))
        raise QuantizationError(f"unknown format {name!r} (known: {known})") from None


def parse_format_list(text: str) -> list[tuple[str, str, bool]]:
    """Parse a command line's ``--formats`` value, e.g. ``"fp32,fp16,nf4+nested"``.

    Returns ``(label, format name, nested)`` per item; ``fp32`` means ``raw``.
    Raises :class:`QuantizationError` for an unknown format or option.
    """
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, extra = item.partition("+")
        fmt = "raw" if name == "fp32" else name
        get_format(fmt)
        if extra not in ("", "nested"):
            raise QuantizationError(f"unknown format option {extra!r} in {item!r}")
        out.append((item, fmt, extra == "nested"))
    return out

