"""The tensor codec: quantize/dequantize, QuantizedTensor, TensorSpec, slices."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llmwire
from llmwire import NonFiniteError, QuantizationError, QuantizedTensor, TensorSpec
from llmwire.quant import codec, reference
from llmwire.quant.formats import BLOCK_SIZES, FORMATS

from conftest import as_numpy, assert_same_bits

CAST = {"fp16": "float16", "bf16": "bfloat16"}
# (format, options) pairs covering every encoding
ENCODINGS = [("fp16", {}), ("bf16", {}), ("blockwise8", {}), ("fp4", {}), ("nf4", {}),
             ("fp4", {"nested": True}), ("nf4", {"nested": True}),
             ("blockwise8", {"block_size": 32}), ("nf4", {"block_size": 4096})]
ENC_IDS = [f"{f}{'-' + '-'.join(f'{k}={v}' for k, v in o.items()) if o else ''}" for f, o in ENCODINGS]
SOURCES = [("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
           ("numpy", "float32"), ("numpy", "float16")]
SHAPES = [(), (0,), (1,), (7,), (129,), (3, 5, 0), (33, 17), (2, 3, 4, 5)]


def make_tensor(container: str, dtype: str, shape, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = torch.from_numpy(np.array(data, dtype=np.float32, copy=True)).to(getattr(torch, dtype))
    return t if container == "torch" else t.numpy()


def expected_restore(x, fmt: str, options: dict) -> np.ndarray:
    """What the spec says dequantize(quantize(x)) holds, flat, in x's dtype
    (not for nested, whose absmax is itself quantized)."""
    dtype = llmwire.quant.codec.view_tensor(x).dtype
    flat = np.ascontiguousarray(as_numpy(x)).reshape(-1)
    if fmt in CAST:
        return reference.cast(reference.cast(flat, dtype, CAST[fmt]), CAST[fmt], dtype)
    f = FORMATS[fmt]
    block = options.get("block_size") or f.default_block_size
    codes, absmax, _ = reference.quantize_blocks(flat, dtype, f, block)
    return reference.dequantize_blocks(codes, absmax, flat.size, f, block, dtype)


# ---- round trips ---------------------------------------------------------------

@pytest.mark.parametrize("fmt,options", ENCODINGS, ids=ENC_IDS)
@pytest.mark.parametrize("container,dtype", SOURCES, ids=[f"{c}-{d}" for c, d in SOURCES])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_restores_container_shape_dtype(fmt, options, container, dtype, shape):
    x = make_tensor(container, dtype, shape)
    q = llmwire.quantize(x, fmt, **options)
    assert (q.format, q.dtype, q.shape) == (fmt, dtype, tuple(shape))
    y = llmwire.dequantize(q)
    if container == "torch":
        assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and tuple(y.shape) == tuple(shape)
    else:
        assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == tuple(shape)
    if not options.get("nested"):
        assert_same_bits(as_numpy(y).reshape(-1), expected_restore(x, fmt, options))
    else:
        assert np.allclose(as_numpy(y).astype(np.float32) if dtype != "bfloat16" else
                           reference.to_float32(as_numpy(y), dtype),
                           reference.to_float32(np.ascontiguousarray(as_numpy(x)), dtype)
                           .reshape(shape), atol=1.5)
    # container override
    other = llmwire.dequantize(q, container="numpy" if container == "torch" else "torch")
    assert_same_bits(as_numpy(other), as_numpy(y))


def test_cast_formats_exact_on_their_own_dtype():
    h = make_tensor("torch", "float16", (100,), scale=1000)
    b = make_tensor("torch", "bfloat16", (100,), scale=1e-20)
    assert torch.equal(llmwire.dequantize(llmwire.quantize(h, "fp16")), h)
    assert torch.equal(llmwire.dequantize(llmwire.quantize(b, "bf16")), b)


INT_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bool"]


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("fmt", ["nf4", "fp16", "blockwise8", "raw"])
def test_integer_and_bool_pass_through_raw(dtype, fmt):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 7), dtype=np.uint64).astype(np.uint8).view(np.uint8)
    x = np.frombuffer(rng.bytes(35 * np.dtype(dtype).itemsize), dtype=np.uint8).view(dtype).reshape(5, 7) \
        if dtype != "bool" else x % 2 == 1
    for tensor in (x, torch.from_numpy(x.copy()) if dtype not in ("uint32", "uint64") else x):
        q = llmwire.quantize(tensor, fmt)
        assert q.format == "raw" and q.dtype == dtype and q.nonfinite == 0
        assert q.parts["data"].tobytes() == x.tobytes()
        y = llmwire.dequantize(q)
        assert type(y) is type(tensor)
        assert as_numpy(y).dtype == x.dtype and as_numpy(y).tobytes() == x.tobytes()
        assert as_numpy(y).shape == x.shape


def test_float64_passes_as_raw_only():
    x = np.random.default_rng(0).standard_normal((4, 3))
    q = llmwire.quantize(x, "raw")
    assert q.format == "raw" and np.array_equal(llmwire.dequantize(q), x)
    with pytest.raises(QuantizationError, match="float64"):
        llmwire.quantize(x, "nf4")


# ---- sizes -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt,options", ENCODINGS, ids=ENC_IDS)
def test_nbytes_is_parts_plus_header(fmt, options):
    q = llmwire.quantize(make_tensor("numpy", "float32", (37, 41)), fmt, **options)
    assert q.nbytes == len(q.header) + sum(p.nbytes for p in q.parts.values())
    assert len(q.header) == len(msgpack.packb(q.spec.to_header()))
    assert sum(len(b) for b in q.buffers()) == q.spec.payload_nbytes()
    if FORMATS[fmt].kind == "block":
        assert q.spec.payload_nbytes() == FORMATS[fmt].wire_bytes(
            q.spec.numel, q.spec.block_size, q.spec.nested)


def test_compression_ratios_on_large_tensor():
    x = make_tensor("numpy", "float32", (1 << 20,))
    ratio = {name: llmwire.quantize(x, fmt, **opt).nbytes / x.nbytes for name, fmt, opt in [
        ("nf4", "nf4", {}), ("nested", "nf4", {"nested": True}), ("b8", "blockwise8", {}),
        ("fp16", "fp16", {})]}
    assert ratio["nf4"] == pytest.approx(0.140625, abs=1e-4)
    assert ratio["nested"] == pytest.approx(0.1290, abs=2e-4)
    assert ratio["b8"] == pytest.approx(0.25 + 1 / 4096, abs=1e-4)
    assert ratio["fp16"] == pytest.approx(0.5, abs=1e-4)


# ---- out= and from_buffers ------------------------------------------------------------

@pytest.mark.parametrize("fmt,options", ENCODINGS, ids=ENC_IDS)
def test_out_writes_in_place(fmt, options):
    for container, dtype in SOURCES:
        x = make_tensor(container, dtype, (9, 70), seed=5)
        q = llmwire.quantize(x, fmt, **options)
        expected = llmwire.dequantize(q)
        out = (torch.full_like(x, 7.0) if container == "torch"
               else np.full_like(x, 7.0))
        assert llmwire.dequantize(q, out=out) is out
        assert_same_bits(as_numpy(out), as_numpy(expected))


def test_out_rejects_mismatch():
    q = llmwire.quantize(np.ones((4, 6), np.float32), "nf4")
    for bad in (np.zeros((6, 4), np.float32), np.zeros((4, 6), np.float16),
                np.zeros((6, 4), np.float32).T, np.zeros(24, np.float32), [0.0] * 24):
        with pytest.raises(QuantizationError):
            llmwire.dequantize(q, out=bad)
    with pytest.raises(QuantizationError, match="QuantizedTensor"):
        llmwire.dequantize(np.ones(3))


@pytest.mark.parametrize("fmt,options", ENCODINGS + [("raw", {})], ids=ENC_IDS + ["raw"])
def test_from_buffers_round_trip(fmt, options):
    x = make_tensor("numpy", "float32", (3, 333), seed=9)
    q = llmwire.quantize(x, fmt, **options)
    copies = [bytes(b) for b in q.buffers()]  # as they would arrive
    r = QuantizedTensor.from_buffers(q.header, copies)
    assert r.spec == q.spec and r.header == q.header
    for name in q.parts:
        assert r.parts[name].tobytes() == q.parts[name].tobytes()
    assert_same_bits(llmwire.dequantize(r), llmwire.dequantize(q))
    r2 = QuantizedTensor.from_buffers(q.spec.to_header(), [bytearray(c) for c in copies])
    assert_same_bits(llmwire.dequantize(r2), llmwire.dequantize(q))


def test_from_buffers_rejects_wrong_parts():
    q = llmwire.quantize(np.ones(100, np.float32), "nf4", nested=True)
    good = [bytes(b) for b in q.buffers()]
    for i in range(len(good)):
        for delta in (-1, 1):
            bad = list(good)
            bad[i] = good[i][:-1] if delta < 0 else good[i] + b"\0"
            with pytest.raises(QuantizationError, match="part"):
                QuantizedTensor.from_buffers(q.header, bad)
    for bad in (good[:-1], good + [b""], []):
        with pytest.raises(QuantizationError, match="part buffers"):
            QuantizedTensor.from_buffers(q.header, bad)
    for header in (b"\xc1", b"", q.header + b"\x00", msgpack.packb([1, 2])):
        with pytest.raises(QuantizationError):
            QuantizedTensor.from_buffers(header, good)


def test_quantized_tensor_checks_its_parts():
    q = llmwire.quantize(np.ones(100, np.float32), "nf4")
    with pytest.raises(QuantizationError):
        QuantizedTensor(q.spec, {"codes": q.parts["codes"]})
    with pytest.raises(QuantizationError):
        QuantizedTensor(q.spec, {"absmax": q.parts["absmax"], "codes": q.parts["codes"]})
    with pytest.raises(QuantizationError):
        QuantizedTensor(q.spec, {"codes": q.parts["codes"].astype(np.int8),
                                 "absmax": q.parts["absmax"]})


# ---- hostile headers ---------------------------------------------------------------------

GOOD_HEADER = {"format": "nf4", "dtype": "float32", "shape": [4, 64], "block_size": 64,
               "nested": False}
BAD_HEADERS = [
    None, [], "nf4", {},
    {**GOOD_HEADER, "extra": 1},
    {k: v for k, v in GOOD_HEADER.items() if k != "nested"},
    {**GOOD_HEADER, "shape": [-1, 64]},
    {**GOOD_HEADER, "shape": [2**62, 1]},
    {**GOOD_HEADER, "shape": [2**40, 2**40]},
    {**GOOD_HEADER, "shape": [True, 64]},
    {**GOOD_HEADER, "shape": [4.0, 64]},
    {**GOOD_HEADER, "shape": "4x64"},
    {**GOOD_HEADER, "shape": [1] * 65},
    {**GOOD_HEADER, "shape": None},
    {**GOOD_HEADER, "format": "nf5"},
    {**GOOD_HEADER, "format": None},
    {**GOOD_HEADER, "format": ["nf4"]},
    {**GOOD_HEADER, "dtype": "float64"},
    {**GOOD_HEADER, "dtype": "complex64"},
    {**GOOD_HEADER, "dtype": 3},
    {**GOOD_HEADER, "dtype": "int8"},  # would be raw, not nf4
    {**GOOD_HEADER, "block_size": 63},
    {**GOOD_HEADER, "block_size": 8192},
    {**GOOD_HEADER, "block_size": -64},
    {**GOOD_HEADER, "block_size": 0},
    {**GOOD_HEADER, "block_size": True},
    {**GOOD_HEADER, "block_size": 64.0},
    {**GOOD_HEADER, "block_size": "64"},
    {**GOOD_HEADER, "nested": 1},
    {**GOOD_HEADER, "nested": None},
    {**GOOD_HEADER, "format": "fp16", "block_size": 64},
    {**GOOD_HEADER, "format": "fp16", "block_size": 0, "nested": True},
    {**GOOD_HEADER, "format": "raw", "block_size": 0, "nested": True},
    {**GOOD_HEADER, "format": "raw", "block_size": 64},
]


@pytest.mark.parametrize("header", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
def test_from_header_rejects_hostile_headers(header):
    with pytest.raises(QuantizationError):
        TensorSpec.from_header(header)
    with pytest.raises(QuantizationError):
        QuantizedTensor.from_buffers(msgpack.packb(header), [b"", b""])


def test_from_header_accepts_what_to_header_writes():
    for fmt, options in ENCODINGS + [("raw", {})]:
        spec = llmwire.quantize(np.zeros((2, 3), np.float32), fmt, **options).spec
        assert TensorSpec.from_header(spec.to_header()) == spec
        assert TensorSpec.from_header(msgpack.unpackb(msgpack.packb(spec.to_header()))) == spec
    assert TensorSpec.from_header(GOOD_HEADER).shape == (4, 64)


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12)
    | st.sampled_from(list(FORMATS) + ["float32", "float16", "bfloat16", "int8", "bool"])
    | st.sampled_from(BLOCK_SIZES),
    lambda children: st.lists(children, max_size=6), max_leaves=12)


@given(header=st.one_of(
    st.dictionaries(st.sampled_from(list(GOOD_HEADER) + ["x"]), header_values, max_size=6),
    st.fixed_dictionaries({k: st.one_of(st.just(v), header_values) for k, v in GOOD_HEADER.items()}),
    header_values))
def test_from_header_fuzz(header):
    """Any msgpack-able header is either a valid spec or a QuantizationError."""
    try:
        spec = TensorSpec.from_header(header)
    except QuantizationError:
        return
    assert spec.to_header() == {**header, "shape": list(header["shape"])}
    assert 0 <= spec.numel < 2**62
    assert spec.payload_nbytes() >= 0


# ---- non-contiguous inputs ------------------------------------------------------------------

def _strided_views():
    base = np.random.default_rng(11).standard_normal((40, 130)).astype(np.float32)
    tbase = torch.from_numpy(np.random.default_rng(12).standard_normal((6, 40, 33)).astype(np.float32))
    return [
        ("np[:, ::2]", base[:, ::2]), ("np.T", base.T), ("np[::-1]", base[::-1]),
        ("np[::3, 1:-1].T", base[::3, 1:-1].T), ("np f16 [:, ::2]", base.astype(np.float16)[:, ::2]),
        ("np 1-D ::5", base.reshape(-1)[::5]),
        ("torch.T", torch.from_numpy(base).T), ("torch.permute", tbase.permute(2, 0, 1)),
        ("torch bf16 permute", tbase.bfloat16().permute(1, 2, 0)),
        ("torch f16 [:, ::2]", tbase.half()[:, ::2]),
        ("torch expand", torch.arange(33, dtype=torch.float32).expand(40, 33)),
    ]


@pytest.mark.parametrize("fmt,options", ENCODINGS + [("raw", {})], ids=ENC_IDS + ["raw"])
def test_non_contiguous_equals_contiguous_copy(fmt, options):
    for name, view in _strided_views():
        copy = view.contiguous() if isinstance(view, torch.Tensor) else np.ascontiguousarray(view)
        assert not (view.is_contiguous() if isinstance(view, torch.Tensor) else view.flags.c_contiguous)
        q, qc = llmwire.quantize(view, fmt, **options), llmwire.quantize(copy, fmt, **options)
        assert q.spec == qc.spec, name
        for part in q.parts:
            assert q.parts[part].tobytes() == qc.parts[part].tobytes(), (name, part)
        assert_same_bits(as_numpy(llmwire.dequantize(q)), as_numpy(llmwire.dequantize(qc)))


def test_large_non_contiguous_tensor_split_over_workers():
    # above PARALLEL_MIN_ELEMENTS: sliced into work items, rows copied per slice
    base = torch.randn(1100, 1000, generator=torch.Generator().manual_seed(0))
    view = base.T
    assert view.numel() > codec.PARALLEL_MIN_ELEMENTS
    for fmt, options in [("nf4", {"nested": True}), ("blockwise8", {}), ("bf16", {})]:
        q = llmwire.quantize(view, fmt, **options)
        qc = llmwire.quantize(view.contiguous(), fmt, **options)
        for part in q.parts:
            assert np.array_equal(q.parts[part], qc.parts[part]), (fmt, part)
        whole = encode_slicewise(view.contiguous().numpy(), q.spec, 1 << 30)
        for part in q.parts:
            assert np.array_equal(q.parts[part], whole[part]), (fmt, part)
        assert torch.equal(llmwire.dequantize(q), llmwire.dequantize(qc))


# ---- slices ---------------------------------------------------------------------------------

@given(data=st.data(), alignment=st.sampled_from([1, 32, 64, 4096, 16384, 2**20]),
       max_elements=st.integers(1, 10**6))
def test_iter_slices_cover_and_align(data, alignment, max_elements):
    numel = data.draw(st.integers(0, 300 * max(alignment, max_elements)))
    slices = list(llmwire.iter_slices(numel, alignment, max_elements))
    assert len(slices) <= numel // max(alignment, max_elements // alignment * alignment) + 1
    position = 0
    limit = max(max_elements, alignment)
    for start, stop in slices:
        assert start == position and start % alignment == 0
        assert start < stop <= numel and stop - start <= limit
        position = stop
    assert position == numel


def encode_slicewise(flat: np.ndarray, spec: TensorSpec, max_elements: int) -> dict:
    parts = {name: np.full(length, 0xEE if dtype.kind == "u" else np.nan, dtype=dtype)
             for name, dtype, length in spec.part_layout(spec.numel)}
    arrays = list(parts.values())
    nonfinite = 0
    for start, stop in llmwire.iter_slices(spec.numel, spec.alignment, max_elements):
        views = [a[lo:hi] for a, (lo, hi) in zip(arrays, spec.part_ranges(start, stop))]
        for view, (_, _, length) in zip(views, spec.part_layout(stop - start)):
            assert view.size == length
        nonfinite += llmwire.encode_slice_into(spec, flat[start:stop], views)
    parts["_nonfinite"] = nonfinite
    return parts


SLICE_CASES = [("nf4", {}, 1000), ("fp4", {"block_size": 32}, 77), ("blockwise8", {}, 9000),
               ("blockwise8", {"block_size": 256}, 300),
               ("nf4", {"nested": True, "block_size": 32}, 8192),
               ("fp4", {"nested": True, "block_size": 64}, 20000),
               ("fp16", {}, 999), ("bf16", {}, 257), ("raw", {}, 4097)]


@pytest.mark.parametrize("fmt,options,max_elements", SLICE_CASES, ids=[f"{f}-{o}-{m}" for f, o, m in SLICE_CASES])
@pytest.mark.parametrize("container,dtype", SOURCES, ids=[f"{c}-{d}" for c, d in SOURCES])
def test_slicewise_encoding_equals_whole(fmt, options, max_elements, container, dtype):
    numel = 3 * 8192 * 2 + 4133  # odd, several nested groups, short last block
    x = make_tensor(container, dtype, (numel,), seed=2)
    flat = as_numpy(x)
    flat[::997] = np.nan if dtype != "bfloat16" else 0x7FC0
    q = llmwire.quantize(x, fmt, **options)
    parts = encode_slicewise(flat, q.spec, max_elements)
    assert parts.pop("_nonfinite") == q.nonfinite
    assert list(parts) == list(q.parts)
    for name in q.parts:
        assert parts[name].tobytes() == q.parts[name].tobytes(), name
    # decoding slice by slice equals decoding the whole
    whole = as_numpy(llmwire.dequantize(q)).reshape(-1)
    out = np.zeros_like(whole)
    arrays = list(q.parts.values())
    for start, stop in llmwire.iter_slices(q.spec.numel, q.spec.alignment, max_elements):
        views = [a[lo:hi] for a, (lo, hi) in zip(arrays, q.spec.part_ranges(start, stop))]
        llmwire.decode_slice(q.spec, views, out[start:stop])
    assert_same_bits(out, whole)


@pytest.mark.parametrize("fmt,options", ENCODINGS, ids=ENC_IDS)
def test_unaligned_buffers_equal_aligned(fmt, options):
    """Arrays whose data pointer is not 4-byte aligned (e.g. parts of a
    received frame) reach the kernels as they are."""
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float16):
        n = 5000
        raw = np.zeros(n * np.dtype(dtype).itemsize + 1, np.uint8)
        x = raw[1:].view(dtype)
        x[:] = rng.standard_normal(n)
        assert not x.flags.aligned
        q, qa = llmwire.quantize(x, fmt, **options), llmwire.quantize(x.copy(), fmt, **options)
        for part in q.parts:
            assert q.parts[part].tobytes() == qa.parts[part].tobytes()
        out_raw = np.zeros(raw.size, np.uint8)
        out = out_raw[1:].view(dtype)
        llmwire.dequantize(q, out=out)
        assert_same_bits(out, llmwire.dequantize(qa))
        shifted = [memoryview(b"\0" + bytes(b))[1:] for b in q.buffers()]
        assert_same_bits(llmwire.dequantize(QuantizedTensor.from_buffers(q.header, shifted)), out)


def test_strided_view_encoded_slicewise_equals_whole():
    base = np.random.default_rng(4).standard_normal((300, 258)).astype(np.float32)
    view = base[:, ::2]  # 300 x 129, non-contiguous
    q = llmwire.quantize(view, "nf4", block_size=32)
    tv = llmwire.quant.codec.view_tensor(view)
    parts = {name: np.empty(length, dtype) for name, dtype, length in q.spec.part_layout(q.spec.numel)}
    arrays = list(parts.values())
    for start, stop in llmwire.iter_slices(q.spec.numel, q.spec.alignment, 700):
        views = [a[lo:hi] for a, (lo, hi) in zip(arrays, q.spec.part_ranges(start, stop))]
        llmwire.encode_slice_into(q.spec, tv.slice(start, stop), views)
    for name in parts:
        assert parts[name].tobytes() == q.parts[name].tobytes()


def test_part_ranges_tile_the_parts():
    spec = llmwire.make_spec("float32", (100_000,), "nf4", nested=True, block_size=32)
    layout = spec.part_layout(spec.numel)
    ends = [0] * len(layout)
    for start, stop in llmwire.iter_slices(spec.numel, spec.alignment, 10_000):
        for i, (lo, hi) in enumerate(spec.part_ranges(start, stop)):
            assert lo == ends[i] and hi >= lo
            ends[i] = hi
    assert ends == [length for _, _, length in layout]


# ---- NaN / inf rule -----------------------------------------------------------------------

BLOCK_FMTS = ["blockwise8", "fp4", "nf4"]


@pytest.mark.parametrize("fmt", BLOCK_FMTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nonfinite_rule(fmt, dtype):
    f = FORMATS[fmt]
    rng = np.random.default_rng(8)
    clean = torch.from_numpy(rng.standard_normal(64 * 4).astype(np.float32)).to(getattr(torch, dtype))
    dirty = clean.clone()
    pos_inf, neg_inf, nans = [3, 70], [5, 130], [9, 71, 200]
    dirty[pos_inf] = float("inf")
    dirty[neg_inf] = float("-inf")
    dirty[nans] = float("nan")
    dirty[192:256] = float("nan")  # an all-NaN block (block 64)
    q = llmwire.quantize(dirty, fmt, block_size=64)
    assert q.nonfinite == len(pos_inf) + len(neg_inf) + len(nans) + 64 - 1  # 200 is in the NaN block
    y = llmwire.dequantize(q).float()
    # restored as if the non-finite values were absent: compare with zeros put in their place
    reference_input = dirty.clone()
    reference_input[~torch.isfinite(reference_input)] = 0
    q0 = llmwire.quantize(reference_input, fmt, block_size=64)
    assert q0.nonfinite == 0
    assert np.array_equal(q.parts["absmax"], q0.parts["absmax"])
    y0 = llmwire.dequantize(q0).float()
    finite = torch.isfinite(dirty)
    assert torch.equal(y[finite], y0[finite])
    absmax = torch.from_numpy(q.parts["absmax"].copy())
    lowest = float(f.levels[0])
    for i in pos_inf:
        assert y[i] == absmax[i // 64].to(getattr(torch, dtype)).float()
        assert y[i] == dirty[[j for j in range(i // 64 * 64, i // 64 * 64 + 64)
                              if torch.isfinite(dirty[j])]].float().abs().max()
    for i in neg_inf:
        expected = torch.tensor(np.float32(lowest) * q.parts["absmax"][i // 64])
        assert y[i] == expected.to(getattr(torch, dtype)).float()
    assert (y[nans] == 0).all()
    assert (y[192:256] == 0).all() and q.parts["absmax"][3] == 0
    with pytest.raises(NonFiniteError) as info:
        llmwire.quantize(dirty, fmt, block_size=64, nonfinite="raise")
    assert info.value.count == q.nonfinite
    assert isinstance(info.value, QuantizationError) and isinstance(info.value, ValueError)
    assert str(q.nonfinite) in str(info.value)
    llmwire.quantize(clean, fmt, nonfinite="raise")  # finite data passes


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_casts_keep_nan_and_inf(fmt):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45, 7e4, -7e4])
    q = llmwire.quantize(x, fmt, nonfinite="raise")  # casts never raise: nothing is lost
    assert q.nonfinite == 0
    y = llmwire.dequantize(q)
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == float("-inf")
    assert y[3] == 0 and torch.signbit(y[3])
    if fmt == "fp16":
        assert y[4] == 0 and y[5] == float("inf") and y[6] == float("-inf")  # past 65504
    else:
        assert y[5] == 7e4 or abs(float(y[5]) - 7e4) < 7e4 * 2**-8


def test_all_zero_and_all_nonfinite_tensors():
    for fmt in BLOCK_FMTS:
        for fill in (0.0, float("nan"), float("inf")):
            x = torch.full((130,), fill)
            y = llmwire.dequantize(llmwire.quantize(x, fmt))
            assert torch.equal(y, torch.zeros(130)), (fmt, fill)


# ---- errors -------------------------------------------------------------------------------

def test_argument_errors_name_the_problem():
    x = np.ones(10, np.float32)
    cases = [
        (lambda: llmwire.quantize(x, "nf5"), "unknown format"),
        (lambda: llmwire.quantize(x, None), "unknown format"),
        (lambda: llmwire.quantize(x.astype(np.float64), "nf4"), "float64"),
        (lambda: llmwire.quantize(torch.ones(3, dtype=torch.float64), "fp16"), "float64"),
        (lambda: llmwire.quantize(x.astype(np.complex64), "nf4"), "complex64"),
        (lambda: llmwire.quantize(np.array([1, "a"], dtype=object), "raw"), "object"),
        (lambda: llmwire.quantize(torch.ones(3, dtype=torch.complex64), "raw"), "complex64"),
        (lambda: llmwire.quantize([1.0, 2.0], "nf4"), "list"),
        (lambda: llmwire.quantize(3.0, "nf4"), "float"),
        (lambda: llmwire.quantize(x, "nf4", block_size=100), "block_size"),
        (lambda: llmwire.quantize(x, "nf4", block_size=0), "block_size"),
        (lambda: llmwire.quantize(x, "nf4", block_size=8192), "block_size"),
        (lambda: llmwire.quantize(x, "fp16", nested=True), "nested"),
        (lambda: llmwire.quantize(x, "bf16", block_size=64), "block_size"),
        (lambda: llmwire.quantize(x, "raw", nested=True), "nested"),
        (lambda: llmwire.quantize(x, "nf4", nonfinite="ignore"), "nonfinite"),
        (lambda: llmwire.quantize(x.astype(">f4"), "nf4"), ">f4"),
        (lambda: llmwire.make_spec("float8", (3,), "nf4"), "float8"),
    ]
    for call, words in cases:
        with pytest.raises(QuantizationError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert words in str(info.value), (words, str(info.value))


# ---- accuracy -----------------------------------------------------------------------------

def _data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(2024)
    if kind == "normal":
        return rng.standard_normal(1 << 20).astype(np.float32)
    return rng.standard_t(3, 1 << 20).astype(np.float32)


# measured rel. mean abs error (numpy reference == C), ceilings about 20% above
REL_MAE_CEILING = {
    ("normal", "blockwise8"): 0.0150, ("normal", "fp4"): 0.145, ("normal", "nf4"): 0.110,
    ("t3", "blockwise8"): 0.0232, ("t3", "fp4"): 0.257, ("t3", "nf4"): 0.173,
}


@pytest.mark.parametrize("kind", ["normal", "t3"])
def test_cast_error_bounds(kind):
    x = _data(kind)
    for fmt, unit, tiny in (("fp16", 2.0**-11, 2.0**-14), ("bf16", 2.0**-8, 2.0**-126)):
        y = llmwire.dequantize(llmwire.quantize(x, fmt))
        normal_range = (np.abs(x) >= tiny) & (np.abs(x) <= (65504 if fmt == "fp16" else 3e38))
        rel = np.abs(y[normal_range].astype(np.float64) - x[normal_range]) / np.abs(x[normal_range])
        assert rel.max() <= unit
        assert rel.max() > unit / 4  # the bound is tight, so the test is not vacuous


@pytest.mark.parametrize("kind", ["normal", "t3"])
@pytest.mark.parametrize("fmt", BLOCK_FMTS)
def test_block_error_bounds(kind, fmt):
    x = _data(kind)
    f = FORMATS[fmt]
    half_gap = float(np.diff(f.levels.astype(np.float64)).max()) / 2
    for block in (f.default_block_size, 32):
        q = llmwire.quantize(x, fmt, block_size=block)
        y = llmwire.dequantize(q)
        assert np.array_equal(q.parts["absmax"], np.abs(x).reshape(-1, block).max(axis=1))
        absmax = np.repeat(q.parts["absmax"].astype(np.float64), block)
        error = np.abs(y.astype(np.float64) - x)
        assert (error <= half_gap * absmax * (1 + 1e-5)).all()
        rel_mae = error.mean() / np.abs(x).mean()
        if block == f.default_block_size:
            assert rel_mae <= REL_MAE_CEILING[kind, fmt]
        # nested absmax costs a few percent at most
        if f.bits == 4:
            yn = llmwire.dequantize(llmwire.quantize(x, fmt, block_size=block, nested=True))
            nested_mae = np.abs(yn.astype(np.float64) - x).mean() / np.abs(x).mean()
            assert abs(nested_mae - rel_mae) <= 0.03 * rel_mae


def test_subnormal_absmax_block_keeps_its_resolution():
    """A block whose largest magnitude is subnormal (1/absmax would overflow)
    is scaled by 2**32 first, so it is quantized like any other block: each
    value restores within half the largest level gap times absmax."""
    x = np.array([1e-39, 5e-40, -3e-40, 0.0] * 16, np.float32)
    q = llmwire.quantize(x, "nf4")
    y = llmwire.dequantize(q)
    assert q.parts["absmax"][0] == np.float32(1e-39)  # stored unscaled
    half_gap = np.diff(FORMATS["nf4"].levels).max() / 2
    assert np.abs(y - x).max() <= half_gap * np.float32(1e-39) * 1.001
    assert np.count_nonzero(y) == 48 and (np.sign(y) == np.sign(x)).all()


# ---- outputs the kernels could not write into are refused ------------------

def test_read_only_out_is_refused():
    q = llmwire.quantize(np.ones(100, np.float32), "nf4")
    out = np.zeros(100, np.float32)
    out.flags.writeable = False
    with pytest.raises(QuantizationError, match="writable"):
        llmwire.dequantize(q, out=out)


def test_decode_slice_refuses_a_non_contiguous_out():
    x = np.arange(128, dtype=np.float32)
    q = llmwire.quantize(x, "blockwise8", block_size=64)
    target = np.zeros(256, np.float32)[::2]  # 128 elements, strided
    with pytest.raises(QuantizationError, match="contiguous"):
        llmwire.decode_slice(q.spec, list(q.parts.values()), target)
    assert not target.any()


def test_encode_slice_refuses_read_only_parts():
    spec = llmwire.make_spec("float32", (64,), "nf4")
    parts = [np.zeros(length, dtype) for _, dtype, length in spec.part_layout(64)]
    parts[0].flags.writeable = False
    with pytest.raises(QuantizationError, match="parts"):
        llmwire.encode_slice_into(spec, np.ones(64, np.float32), parts)


def test_from_buffers_rejects_non_buffers():
    q = llmwire.quantize(np.ones(64, np.float32), "nf4")
    with pytest.raises(QuantizationError, match="not a buffer"):
        QuantizedTensor.from_buffers(q.header, [1, 2])


@pytest.mark.parametrize("kwargs", [{"block_size": 100}, {"block_size": 0}])
def test_bad_options_are_reported_even_for_pass_through_tensors(kwargs):
    with pytest.raises(QuantizationError, match="block_size"):
        llmwire.quantize(np.arange(10), "nf4", **kwargs)


def test_cast_options_are_reported_even_for_pass_through_tensors():
    with pytest.raises(QuantizationError, match="block_size or nested"):
        llmwire.quantize(np.arange(10), "fp16", nested=True)


def test_quantize_state_dict_keeps_small_tensors_raw():
    sd = {"w": torch.randn(64, 128), "norm": torch.ones(64), "step": torch.tensor(7)}
    q = llmwire.quantize_state_dict(sd, "nf4")
    assert [v.format for v in q.values()] == ["nf4", "raw", "raw"]
    assert llmwire.quantize_state_dict(sd, "nf4", min_elements=0)["norm"].format == "nf4"
    back = llmwire.dequantize_state_dict(q)
    assert torch.equal(back["norm"], sd["norm"]) and torch.equal(back["step"], sd["step"])
    with pytest.raises(QuantizationError, match="min_elements"):
        llmwire.quantize_state_dict(sd, "nf4", min_elements=-1)


def test_dequantize_state_dict_in_place_into_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.LayerNorm(128))
    source = {k: v.clone() for k, v in model.state_dict().items()}
    q = llmwire.quantize_state_dict(source, "blockwise8")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    target = model.state_dict()
    result = llmwire.dequantize_state_dict(q, out=target)
    assert all(result[k] is target[k] for k in target)  # the model's own tensors
    err = (model[0].weight - source["0.weight"]).abs().max()
    assert 0 < err <= source["0.weight"].abs().max() * 0.01
    assert torch.equal(model[1].weight, source["1.weight"])  # small: raw
    with pytest.raises(QuantizationError, match="out has no tensor"):
        llmwire.dequantize_state_dict(q, out={})


def test_quantize_state_dict_nonfinite_raise_names_the_tensor():
    sd = {"a": torch.randn(8192), "b": torch.full((8192,), float("nan"))}
    with pytest.raises(NonFiniteError) as info:
        llmwire.quantize_state_dict(sd, "nf4", nonfinite="raise")
    assert info.value.name == "b" and info.value.count == 8192
