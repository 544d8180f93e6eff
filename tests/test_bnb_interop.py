"""llmwire's block formats read and written by bitsandbytes (CPU), and back.

Skipped where bitsandbytes is not installed (it may print a warning about
'kernels-community' on import; that is harmless).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmwire
from llmwire import QuantizedTensor

from conftest import assert_same_bits

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def awkward(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[5] = float("nan")
    x[70] = float("inf")
    x[140] = float("-inf")
    x[192:256] = 0  # an all-zero block
    x[300] = 1e-40
    return x


def equal_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as numbers (NaN == NaN, -0.0 == 0.0)."""
    return np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [1000, 1001, 64])
def test_llmwire_4bit_read_by_bitsandbytes(fmt, n):
    x = awkward(n, seed=n) if n > 300 else torch.randn(n)
    q = llmwire.quantize(x, fmt)
    state = bnb_functional.QuantState(
        absmax=torch.from_numpy(q.parts["absmax"].copy()), shape=x.shape, dtype=torch.float32,
        blocksize=64, code=bnb_functional.get_4bit_type(fmt, device="cpu"), quant_type=fmt)
    codes = torch.from_numpy(q.parts["codes"].copy()).reshape(-1, 1)
    theirs = bnb_functional.dequantize_4bit(codes, state).reshape(-1).numpy()
    ours = llmwire.dequantize(q).numpy()
    # llmwire never emits the fp4 -0 code, so this is bit for bit for both tables
    assert_same_bits(ours, theirs)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [1000, 1001])
def test_bitsandbytes_4bit_read_by_llmwire(fmt, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, state = bnb_functional.quantize_4bit(x, blocksize=64, quant_type=fmt)
    theirs = bnb_functional.dequantize_4bit(packed, state).reshape(-1).numpy()
    q = QuantizedTensor.from_buffers(
        {"format": fmt, "dtype": "float32", "shape": [n], "block_size": 64, "nested": False},
        [packed.numpy().tobytes(), state.absmax.numpy().tobytes()])
    ours = llmwire.dequantize(q)
    assert isinstance(ours, np.ndarray) and ours.shape == (n,)
    assert equal_values(ours, theirs)
    if fmt == "nf4":
        assert_same_bits(ours, theirs)
    else:
        # fp4 nibble 8 is -0.0 in llmwire; bitsandbytes' CPU paths disagree among
        # themselves (-0.0 for n=1000, +0.0 for n=1001), so only its sign may differ
        differ = ours.view(np.uint32) != theirs.view(np.uint32)
        assert (ours[differ] == 0).all()
    # llmwire's own codes agree with bnb's wherever both are meaningful
    mine = llmwire.quantize(x, fmt)
    assert np.array_equal(mine.parts["absmax"], state.absmax.numpy())


def test_blockwise8_both_ways():
    code = bnb_functional.create_dynamic_map(signed=True)
    x = awkward(10_000, seed=3)
    q = llmwire.quantize(x, "blockwise8")
    theirs = bnb_functional.dequantize_blockwise(
        torch.from_numpy(q.parts["codes"].copy()), absmax=torch.from_numpy(q.parts["absmax"].copy()),
        code=code, blocksize=4096).numpy()
    assert_same_bits(llmwire.dequantize(q).numpy(), theirs)

    y = torch.randn(10_001, generator=torch.Generator().manual_seed(4))
    codes, state = bnb_functional.quantize_blockwise(y, code=code, blocksize=4096)
    theirs = bnb_functional.dequantize_blockwise(codes, state).numpy()
    q = QuantizedTensor.from_buffers(
        {"format": "blockwise8", "dtype": "float32", "shape": [10_001], "block_size": 4096,
         "nested": False}, [codes.numpy().tobytes(), state.absmax.numpy().tobytes()])
    assert_same_bits(llmwire.dequantize(q), theirs)
    assert np.array_equal(llmwire.quantize(y, "blockwise8").parts["absmax"], state.absmax.numpy())
