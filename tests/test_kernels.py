"""The C kernels against their NumPy specification, bit for bit.

``llmwire._native`` is called exactly as ``llmwire.quant._kernels`` calls it;
``llmwire.quant.reference`` is the spec (rules in its module docstring).
Inputs are generated as bit patterns so that NaN payloads, subnormals, ±0
and ±inf all occur, alongside ordinary data, values on decision thresholds,
all-zero / all-NaN blocks and huge or tiny magnitudes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmwire
from llmwire.quant import _kernels, reference
from llmwire.quant.formats import BLOCK_SIZES, FLOAT_DTYPES, FORMATS

from conftest import STORAGE, UINT, assert_same_bits, requires_native

BLOCK_FORMATS = [name for name, fmt in FORMATS.items() if fmt.is_block]
CODE = _kernels.DTYPE_CODES

SPECIAL32 = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # ±0, ±inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF,
    0x7FC00001, 0xFFFFFFFF, 0x7FA00000,  # quiet and signalling NaNs, payloads
    0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x80800000,  # subnormals, min normal
    0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0x3F7FFFFF,  # max finite, ±1
    0x477FF000, 0x477FEFFF, 0x477FE000, 0xC77FF000,  # float16 overflow edge
    0x38800000, 0x387FFFFF, 0x387FE000, 0x33000000, 0x33000001, 0x32FFFFFF,  # f16 subnormal edges
    0x3F808000, 0x3F818000, 0x3F808001, 0x7F7F8000, 0x7F7F7FFF,  # bfloat16 ties, overflow
]
SPECIAL16_F16 = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7DFF, 0x7FFF,
                 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00]
SPECIAL16_BF16 = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FBF, 0x7FFF,
                  0x0001, 0x8001, 0x007F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80]
MODES = ("bits", "gauss", "tiny", "huge", "mixed_scale", "ties", "blocks")


def _float32_values(rng: np.random.Generator, mode: str, n: int, fmt: str | None) -> np.ndarray:
    """float32 data of one flavour (as uint32 bit patterns)."""
    if mode == "bits":
        return rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    if mode == "gauss":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)
    elif mode == "tiny":  # subnormal and near-subnormal magnitudes
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-45, -36)
    elif mode == "huge":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(30, 38.5)
    elif mode == "mixed_scale":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)
    elif mode == "ties":  # values exactly on (and next to) decision thresholds
        table = FORMATS[fmt or "nf4"]
        candidates = np.concatenate([table.thresholds[np.isfinite(table.thresholds)],
                                     table.levels, [1.0, -1.0]]).astype(np.float32)
        picked = candidates[rng.integers(0, candidates.size, n)]
        nudge = rng.integers(-1, 2, n)
        picked = np.where(nudge > 0, np.nextafter(picked, np.float32(2)),
                          np.where(nudge < 0, np.nextafter(picked, np.float32(-2)), picked))
        # a power-of-two scale keeps x * (1 / absmax) exact
        x = picked.astype(np.float32) * np.float32(2.0 ** int(rng.integers(-20, 20)))
        if n:
            x[:: max(1, n // 7)] = np.float32(2.0 ** int(rng.integers(-20, 20)))
    else:  # "blocks": ordinary data, some blocks blanked below
        x = rng.standard_normal(n)
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).view(np.uint32).copy()


@st.composite
def float32_bits(draw, max_len: int = 600, fmt: str | None = None, n: int | None = None):
    """uint32 bit patterns of awkward float32 data."""
    if n is None:
        n = draw(st.integers(0, max_len))
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u = _float32_values(rng, mode, n, fmt)
    for index, value in draw(st.lists(st.tuples(st.integers(0, 2**31), st.sampled_from(SPECIAL32)),
                                      max_size=10)):
        if n:
            u[index % n] = value
    return u


def to_source(u32: np.ndarray, dtype: str, rng_bits: np.ndarray | None = None) -> np.ndarray:
    """float32 bit patterns as an array of ``dtype`` (bfloat16 as uint16)."""
    if dtype == "float32":
        return u32.view(np.float32)
    if dtype == "float16":
        return reference.from_float32(u32.view(np.float32), "float16")
    return (u32 >> 16).astype(np.uint16)  # truncation keeps every bf16 pattern reachable


@st.composite
def source_arrays(draw, dtype: str, max_len: int = 600, fmt: str | None = None,
                  n: int | None = None):
    """An array of ``dtype`` (raw 16-bit patterns included for 16-bit types)."""
    u = draw(float32_bits(max_len=max_len, fmt=fmt, n=n))
    src = np.ascontiguousarray(to_source(u, dtype))
    if dtype != "float32" and src.size and draw(st.booleans()):
        specials = SPECIAL16_F16 if dtype == "float16" else SPECIAL16_BF16
        raw = src.view(np.uint16)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if draw(st.booleans()):
            raw[:] = rng.integers(0, 2**16, raw.size, dtype=np.uint32).astype(np.uint16)
        raw[rng.integers(0, raw.size, min(raw.size, 8))] = rng.choice(specials, min(raw.size, 8))
    return src


# ---- the extension is what runs --------------------------------------------

def test_native_extension_in_use():
    """CI runs the suite without LLMWIRE_PURE_PYTHON: there the C extension
    must have built and be the implementation in use."""
    if os.environ.get("LLMWIRE_PURE_PYTHON", "") not in ("", "0"):
        assert llmwire.IMPLEMENTATION == "reference"
        return
    assert llmwire.IMPLEMENTATION == "native", (
        "llmwire._native did not import: build it with "
        "`python3 setup.py build_ext --inplace`")


# ---- casts -----------------------------------------------------------------

ALL16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


@requires_native
@pytest.mark.parametrize("src_dtype,dst_dtype", [
    ("float16", "float32"), ("float16", "bfloat16"),
    ("bfloat16", "float32"), ("bfloat16", "float16"),
    ("float16", "float16"), ("bfloat16", "bfloat16"),
])
def test_cast_every_16bit_pattern(native, src_dtype, dst_dtype):
    src = ALL16.view(STORAGE[src_dtype])
    out = np.zeros(src.size, dtype=STORAGE[dst_dtype])
    native.cast(src, CODE[src_dtype], out, CODE[dst_dtype], src.size)
    assert_same_bits(out, reference.cast(src, src_dtype, dst_dtype))


@requires_native
@given(u=float32_bits(max_len=2000), dst_dtype=st.sampled_from(FLOAT_DTYPES))
def test_cast_float32_matches_reference(native, u, dst_dtype):
    src = u.view(np.float32)
    out = np.zeros(src.size, dtype=STORAGE[dst_dtype])
    native.cast(src, CODE["float32"], out, CODE[dst_dtype], src.size)
    assert_same_bits(out, reference.cast(src, "float32", dst_dtype))


@requires_native
@given(data=st.data(), pair=st.sampled_from([("float16", "bfloat16"), ("bfloat16", "float16")]))
def test_cast_between_16bit_types_long_arrays(native, data, pair):
    src_dtype, dst_dtype = pair
    # longer than the C kernel's 4096-element staging buffer
    n = data.draw(st.integers(4000, 9000))
    src = data.draw(source_arrays(src_dtype, n=n))
    out = np.zeros(n, dtype=STORAGE[dst_dtype])
    native.cast(src, CODE[src_dtype], out, CODE[dst_dtype], n)
    assert_same_bits(out, reference.cast(src, src_dtype, dst_dtype))


@requires_native
def test_cast_partial_count_leaves_tail(native):
    src = np.arange(10, dtype=np.float32)
    out = np.full(10, 0xFFFF, dtype=np.uint16)
    native.cast(src, CODE["float32"], out, CODE["float16"], 6)
    assert_same_bits(out[:6], reference.cast(src[:6], "float32", "float16").view(np.uint16))
    assert (out[6:] == 0xFFFF).all()


# ---- the reference conversions against NumPy and torch ----------------------

def _sample_float32_bits() -> np.ndarray:
    strided = np.arange(0, 2**32, 2039, dtype=np.uint64).astype(np.uint32)
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    # every float16 / bfloat16 rounding boundary region: patterns around the
    # halfway points of both formats
    halves = (np.arange(2**16, dtype=np.uint32) << 16) | 0x8000
    f16_halves = (np.arange(0x38000, 0x47800, dtype=np.uint32) << 13) | 0x1000
    edges = np.concatenate([halves, f16_halves])
    edges = np.concatenate([edges - 1, edges, edges + 1])
    return np.concatenate([strided, random, edges, np.array(SPECIAL32, np.uint32)])


SAMPLE32 = _sample_float32_bits()


def test_reference_float16_narrowing_equals_numpy():
    x = SAMPLE32.view(np.float32)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert_same_bits(reference.from_float32(x, "float16"), expected)


def test_reference_bfloat16_narrowing_equals_torch():
    torch = pytest.importorskip("torch")
    x = SAMPLE32.view(np.float32)
    x = x[~np.isnan(x)]
    expected = torch.from_numpy(x.copy()).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert_same_bits(reference.from_float32(x, "bfloat16"), expected)


def test_reference_nan_narrowing_keeps_sign_quiet_and_top_payload():
    u = SAMPLE32[np.isnan(SAMPLE32.view(np.float32))]
    assert u.size > 100
    half = reference.from_float32(u.view(np.float32), "float16").view(np.uint16).astype(np.uint32)
    brain = reference.from_float32(u.view(np.float32), "bfloat16").astype(np.uint32)
    for out, mantissa_bits in ((half, 10), (brain, 7)):
        assert np.isnan(reference.to_float32(out.astype(np.uint16), "bfloat16" if mantissa_bits == 7
                                             else "float16")).all()
        assert ((out >> 15) == (u >> 31)).all()  # sign
        assert (out & (1 << (mantissa_bits - 1))).all()  # quiet bit
        payload = (1 << (mantissa_bits - 1)) - 1
        assert ((out & payload) == ((u >> (23 - mantissa_bits)) & payload)).all()


def test_reference_widening_every_16bit_pattern():
    torch = pytest.importorskip("torch")
    half = ALL16.view(np.float16)
    wide = reference.to_float32(half, "float16")
    finite = ~np.isnan(half)
    assert_same_bits(wide[finite], half[finite].astype(np.float32))
    assert np.isnan(wide[~finite]).all()
    # NaN payloads are kept: narrowing back returns the same pattern for quiet NaNs
    assert_same_bits(reference.from_float32(wide, "float16"),
                     np.where(finite, ALL16, ALL16 | 0x0200).view(np.float16))
    brain = reference.to_float32(ALL16, "bfloat16")
    expected = torch.from_numpy(ALL16.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert_same_bits(brain, expected)  # exact, NaN payloads included


# ---- block quantization ------------------------------------------------------

def _native_quantize(native, src, dtype, fmt, block):
    t = _kernels._TABLES[fmt]
    n = src.size
    codes = np.full(n if t.bits == 8 else (n + 1) // 2, 0xA5, dtype=np.uint8)
    absmax = np.full(-(-n // block), np.nan, dtype=np.float32)
    nonfinite = native.quantize(src, CODE[dtype], n, block, t.bits, t.thresholds,
                                t.rank_to_code, t.buckets, codes, absmax)
    return codes, absmax, nonfinite


def _native_dequantize(native, codes, absmax, n, fmt, block, dtype):
    t = _kernels._TABLES[fmt]
    out = np.zeros(n, dtype=STORAGE[dtype])
    native.dequantize(codes, absmax, n, block, t.bits, t.code_values, out, CODE[dtype])
    return out


@st.composite
def quantize_cases(draw):
    fmt = draw(st.sampled_from(BLOCK_FORMATS))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    block = draw(st.sampled_from(BLOCK_SIZES))
    n = draw(st.one_of(st.integers(0, 3 * block + 1), st.integers(0, 70)))
    src = draw(source_arrays(dtype, fmt=fmt, n=n))
    # blank some whole blocks: all zero, all NaN, all inf, or zero with one inf
    nblocks = -(-n // block)
    raw = src.view(UINT[dtype])
    if nblocks:
        zero, nan, inf = {"float32": (0, 0x7FC00000, 0x7F800000),
                          "float16": (0, 0x7E00, 0x7C00),
                          "bfloat16": (0, 0x7FC0, 0x7F80)}[dtype]
        for b, kind in draw(st.lists(st.tuples(st.integers(0, nblocks - 1),
                                               st.sampled_from(["zero", "nan", "inf", "zero_inf"])),
                                     max_size=3)):
            chunk = raw[b * block:(b + 1) * block]
            chunk[:] = {"zero": zero, "nan": nan, "inf": inf, "zero_inf": zero}[kind]
            if kind == "zero_inf":
                chunk[len(chunk) // 2] = inf | (raw.dtype.type(1) << (raw.itemsize * 8 - 1))
    return fmt, dtype, block, src


@requires_native
@settings(max_examples=200)
@given(case=quantize_cases())
def test_quantize_matches_reference(native, case):
    fmt, dtype, block, src = case
    codes, absmax, nonfinite = _native_quantize(native, src, dtype, fmt, block)
    ref_codes, ref_absmax, ref_nonfinite = reference.quantize_blocks(src, dtype, FORMATS[fmt], block)
    assert_same_bits(codes, ref_codes)
    assert_same_bits(absmax, ref_absmax)
    assert nonfinite == ref_nonfinite
    assert nonfinite == np.count_nonzero(~np.isfinite(reference.to_float32(src, dtype)))


@requires_native
@settings(max_examples=200)
@given(case=quantize_cases(), out_dtype=st.sampled_from(FLOAT_DTYPES))
def test_quantize_then_dequantize_matches_reference(native, case, out_dtype):
    fmt, dtype, block, src = case
    codes, absmax, _ = reference.quantize_blocks(src, dtype, FORMATS[fmt], block)
    out = _native_dequantize(native, codes, absmax, src.size, fmt, block, out_dtype)
    expected = reference.dequantize_blocks(codes, absmax, src.size, FORMATS[fmt], block, out_dtype)
    assert_same_bits(out, expected)


@requires_native
@settings(max_examples=150)
@given(data=st.data(), fmt=st.sampled_from(BLOCK_FORMATS), block=st.sampled_from(BLOCK_SIZES),
       out_dtype=st.sampled_from(FLOAT_DTYPES))
def test_dequantize_arbitrary_codes_and_scales(native, data, fmt, block, out_dtype):
    """Codes as received from a peer: any byte, any absmax bit pattern."""
    n = data.draw(st.one_of(st.integers(0, 2 * block + 3), st.integers(0, 40)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ncodes = n if FORMATS[fmt].bits == 8 else (n + 1) // 2
    codes = rng.integers(0, 256, ncodes, dtype=np.uint16).astype(np.uint8)
    absmax = data.draw(float32_bits(n=-(-n // block))).view(np.float32)
    out = _native_dequantize(native, codes, absmax, n, fmt, block, out_dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference.dequantize_blocks(codes, absmax, n, FORMATS[fmt], block, out_dtype)
    assert_same_bits(out, expected)


@requires_native
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_every_16bit_pattern(native, fmt, dtype):
    """All 65536 patterns of a 16-bit dtype (and the float32 they widen to)
    in small blocks, so each sits with few neighbours."""
    src = ALL16.view(STORAGE[dtype]) if dtype != "float32" else \
        (ALL16.astype(np.uint32) << 16 | 0x1234).view(np.float32)
    for block in (32, 4096):
        codes, absmax, nonfinite = _native_quantize(native, src, dtype, fmt, block)
        ref = reference.quantize_blocks(src, dtype, FORMATS[fmt], block)
        assert_same_bits(codes, ref[0])
        assert_same_bits(absmax, ref[1])
        assert nonfinite == ref[2] > 0


@requires_native
def test_quantize_partial_tail_bytes(native):
    """An odd count writes exactly (n + 1) // 2 code bytes, low nibble 0."""
    src = np.linspace(-1, 1, 65, dtype=np.float32)
    codes, _, _ = _native_quantize(native, src, "float32", "nf4", 64)
    assert codes.size == 33 and codes[-1] & 0x0F == 0
    assert_same_bits(codes, reference.quantize_blocks(src, "float32", FORMATS["nf4"], 64)[0])


# ---- the C module's own argument checks ---------------------------------------

@requires_native
def test_native_rejects_short_buffers(native):
    t = _kernels._TABLES["nf4"]
    t8 = _kernels._TABLES["blockwise8"]
    src = np.ones(128, np.float32)
    codes, absmax = np.zeros(64, np.uint8), np.zeros(2, np.float32)
    before = codes.copy()
    bad_quantize = [
        (src[:100], CODE["float32"], 128, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes[:63], absmax),
        (src, CODE["float32"], 128, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax[:1]),
        (src, CODE["float32"], 128, 64, 4, t.thresholds[:14], t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 64, 4, t.thresholds, t.rank_to_code[:15], t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 64, 8, t8.thresholds, t8.rank_to_code, t8.buckets[:100],
         np.zeros(128, np.uint8), absmax),
        (src, CODE["float32"], 128, 64, 8, t8.thresholds[:255], t8.rank_to_code, t8.buckets,
         np.zeros(128, np.uint8), absmax),
        (src, 3, 128, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, -1, 128, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], -1, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 63, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 0, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 8192, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 128, 64, 5, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
        (src, CODE["float32"], 2**62, 64, 4, t.thresholds, t.rank_to_code, t.buckets, codes, absmax),
    ]
    for args in bad_quantize:
        with pytest.raises(ValueError):
            native.quantize(*args)
    assert (codes == before).all()

    out = np.zeros(128, np.float32)
    bad_dequantize = [
        (codes[:63], absmax, 128, 64, 4, t.code_values, out, CODE["float32"]),
        (codes, absmax[:1], 128, 64, 4, t.code_values, out, CODE["float32"]),
        (codes, absmax, 128, 64, 4, t.code_values[:15], out, CODE["float32"]),
        (codes, absmax, 128, 64, 4, t.code_values, out[:127], CODE["float32"]),
        (codes, absmax, 128, 64, 4, t.code_values, out.view(np.uint16)[:127], CODE["float16"]),
        (codes, absmax, 128, 64, 4, t.code_values, out, 7),
        (codes, absmax, 128, 64, 8, t.code_values, out, CODE["float32"]),  # 8-bit needs 256 codes
        (codes, absmax, -5, 64, 4, t.code_values, out, CODE["float32"]),
        (codes, absmax, 128, 65, 4, t.code_values, out, CODE["float32"]),
    ]
    for args in bad_dequantize:
        with pytest.raises(ValueError):
            native.dequantize(*args)
    assert (out == 0).all()

    bad_cast = [
        (src[:10], CODE["float32"], np.zeros(20, np.uint16), CODE["float16"], 20),
        (src, CODE["float32"], np.zeros(10, np.uint16), CODE["float16"], 20),
        (src, 9, np.zeros(20, np.uint16), CODE["float16"], 20),
        (src, CODE["float32"], np.zeros(20, np.uint16), CODE["float16"], -1),
    ]
    for args in bad_cast:
        with pytest.raises(ValueError):
            native.cast(*args)


@requires_native
def test_native_rejects_readonly_and_strided_outputs(native):
    t = _kernels._TABLES["nf4"]
    codes, absmax = reference.quantize_blocks(np.ones(64, np.float32), "float32",
                                              FORMATS["nf4"], 64)[:2]
    readonly = np.zeros(64, np.float32)
    readonly.setflags(write=False)
    strided = np.zeros(128, np.float32)[::2]
    for out in (readonly, strided, b"\0" * 256):
        with pytest.raises((TypeError, ValueError, BufferError)):
            native.dequantize(codes, absmax, 64, 64, 4, t.code_values, out, CODE["float32"])
    assert (readonly == 0).all() and (strided == 0).all()


@requires_native
@pytest.mark.parametrize("src_dtype,dst_dtype", [
    ("float32", "float16"), ("float32", "bfloat16"), ("float16", "float32"),
    ("bfloat16", "float32"), ("float16", "bfloat16"), ("bfloat16", "float16")])
@pytest.mark.parametrize("skew", [0, 1, 3])
def test_cast_bypassing_the_cache_writes_the_same_bits(native, src_dtype, dst_dtype, skew):
    """Non-temporal stores (aligned destinations) and the plain path (skewed
    ones) give the reference's bits, tails included."""
    rng = np.random.default_rng(7)
    n = 100_003
    src = rng.integers(0, 2**32, n, dtype=np.uint32)
    src = (src.view(np.float32) if src_dtype == "float32"
           else src.astype(np.uint16).view(STORAGE[src_dtype]))
    out_type = UINT[dst_dtype]
    buffer = np.zeros(n + 8, dtype=out_type)
    out = buffer[skew:skew + n]
    native.cast(src, CODE[src_dtype], out, CODE[dst_dtype], n, True)
    assert_same_bits(out.view(out_type), reference.cast(src, src_dtype, dst_dtype).view(out_type))


@requires_native
@pytest.mark.parametrize("name", ["blockwise8", "fp4", "nf4"])
@pytest.mark.parametrize("skew", [0, 1])
def test_dequantize_bypassing_the_cache_writes_the_same_bits(native, name, skew):
    fmt = FORMATS[name]
    block = 64 if fmt.bits == 4 else 256
    rng = np.random.default_rng(11)
    n = 64 * 1000 + 37
    x = rng.standard_normal(n).astype(np.float32)
    codes, absmax, _ = reference.quantize_blocks(x, "float32", fmt, block)
    buffer = np.zeros(n + 4, np.float32)
    out = buffer[skew:skew + n]  # skewed: not 16-byte aligned, plain stores
    table = _kernels._TABLES[name]
    native.dequantize(codes, absmax, n, block, fmt.bits, table.code_values, out, 0, True)
    assert_same_bits(out, reference.dequantize_blocks(codes, absmax, n, fmt, block, "float32"))
