"""Golden vectors: stored bytes that both implementations must reproduce.

``tests/vectors/quant_vectors.json`` was generated once from the reference
by ``tests/vectors/make_vectors.py``. If a test here fails, the spec (or an
implementation) changed: that is a wire-format change, never a tidy-up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest

import llmwire
from llmwire.quant import _kernels, reference
from llmwire.quant.formats import FORMATS

from conftest import STORAGE, requires_native

VECTORS = json.loads((Path(__file__).parent / "vectors" / "quant_vectors.json").read_text())


def matches(actual: np.ndarray, stored) -> bool:
    data = np.ascontiguousarray(actual).tobytes()
    if isinstance(stored, dict):
        return len(data) == stored["nbytes"] and hashlib.sha256(data).hexdigest() == stored["sha256"]
    return data.hex() == stored


def load(hex_text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_text), dtype=STORAGE[dtype]).copy()


def test_vector_file_is_complete():
    assert {c["format"] for c in VECTORS["blocks"]} == {"blockwise8", "fp4", "nf4"}
    assert len(VECTORS["casts"]) == 6
    assert any(c["nonfinite"] for c in VECTORS["blocks"])
    assert any(c["count"] % 2 for c in VECTORS["blocks"])


@pytest.mark.parametrize("case", VECTORS["casts"], ids=lambda c: c["name"])
def test_cast_vectors_reference(case):
    src = load(case["input"], case["src_dtype"])
    assert matches(reference.cast(src, case["src_dtype"], case["dst_dtype"]), case["output"])


@requires_native
@pytest.mark.parametrize("case", VECTORS["casts"], ids=lambda c: c["name"])
def test_cast_vectors_native(native, case):
    src = load(case["input"], case["src_dtype"])
    out = np.zeros(case["count"], dtype=STORAGE[case["dst_dtype"]])
    native.cast(src, _kernels.DTYPE_CODES[case["src_dtype"]], out,
                _kernels.DTYPE_CODES[case["dst_dtype"]], case["count"])
    assert matches(out, case["output"])


@pytest.mark.parametrize("case", VECTORS["blocks"], ids=lambda c: c["name"])
def test_block_vectors_reference(case):
    fmt, block, count = FORMATS[case["format"]], case["block_size"], case["count"]
    src = load(case["input"], case["dtype"])
    codes, absmax, nonfinite = reference.quantize_blocks(src, case["dtype"], fmt, block)
    assert matches(codes, case["codes"])
    assert matches(absmax, case["absmax"])
    assert nonfinite == case["nonfinite"]
    for dst, stored in case["dequantized"].items():
        with np.errstate(all="ignore"):
            restored = reference.dequantize_blocks(codes, absmax, count, fmt, block, dst)
        assert matches(restored, stored), dst


@requires_native
@pytest.mark.parametrize("case", VECTORS["blocks"], ids=lambda c: c["name"])
def test_block_vectors_native(native, case):
    t = _kernels._TABLES[case["format"]]
    block, count = case["block_size"], case["count"]
    src = load(case["input"], case["dtype"])
    codes = np.zeros(count if t.bits == 8 else (count + 1) // 2, np.uint8)
    absmax = np.zeros(-(-count // block), np.float32)
    nonfinite = native.quantize(src, _kernels.DTYPE_CODES[case["dtype"]], count, block, t.bits,
                                t.thresholds, t.rank_to_code, t.buckets, codes, absmax)
    assert matches(codes, case["codes"])
    assert matches(absmax, case["absmax"])
    assert nonfinite == case["nonfinite"]
    for dst, stored in case["dequantized"].items():
        out = np.zeros(count, dtype=STORAGE[dst])
        native.dequantize(codes, absmax, count, block, t.bits, t.code_values, out,
                          _kernels.DTYPE_CODES[dst])
        assert matches(out, stored), dst


@pytest.mark.parametrize("case", VECTORS["codec"]["cases"], ids=lambda c: c["name"])
def test_codec_vectors(case):
    """Whole-tensor encoding under whichever implementation this run uses."""
    codec = VECTORS["codec"]
    x = load(codec["input"], codec["dtype"]).reshape(codec["shape"])
    q = llmwire.quantize(x, case["format"], **case["options"])
    assert q.header.hex() == case["header"]
    assert q.nonfinite == case["nonfinite"]
    assert list(q.parts) == [name for name, _ in case["parts"]]  # wire order
    for name, stored in case["parts"]:
        assert matches(q.parts[name], stored), name
    assert matches(llmwire.dequantize(q), case["dequantized"])
    # and the stored header alone restores the same tensor from the same parts
    rebuilt = llmwire.QuantizedTensor.from_buffers(bytes.fromhex(case["header"]), q.buffers())
    assert msgpack.unpackb(rebuilt.header) == msgpack.unpackb(q.header)
    assert matches(llmwire.dequantize(rebuilt), case["dequantized"])
