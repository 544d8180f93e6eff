"""Code tables and format constants, rebuilt from their definitions; and the
rule that the quantization core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from llmwire import QuantizationError
from llmwire.quant import formats
from llmwire.quant.formats import DYNAMIC8_CODE, FORMATS, FP4_CODE, NF4_CODE, get_format

from conftest import assert_same_bits


def rebuilt_dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True), from its definition."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32).numpy()


def test_dynamic8_code_rebuilt_from_definition():
    assert_same_bits(DYNAMIC8_CODE, rebuilt_dynamic_map())
    assert not DYNAMIC8_CODE.flags.writeable


def test_dynamic8_code_equals_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert_same_bits(DYNAMIC8_CODE, functional.create_dynamic_map(signed=True).numpy())


def test_fp4_table_from_definition():
    # 1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' FP4 values / 12
    magnitudes = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float64) / 12
    assert np.array_equal(FP4_CODE[:8], magnitudes.astype(np.float32))
    assert np.array_equal(FP4_CODE[8:], -magnitudes.astype(np.float32))
    assert FP4_CODE.max() == 1 and FP4_CODE.min() == -1


def test_nf4_table_is_normal_quantiles():
    assert NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert (np.diff(NF4_CODE) > 0).all()
    # QLoRA construction: quantiles of N(0, 1), normalised; 3 decimals is enough
    from statistics import NormalDist

    offset = 0.9677083
    normal = NormalDist()
    positive = [normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    assert np.allclose(values / values.max(), NF4_CODE, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_tables_equal_bitsandbytes_values(fmt):
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = functional.get_4bit_type(fmt, device="cpu").numpy()
    ours = FORMATS[fmt].code
    assert np.array_equal(ours, theirs)  # as numbers (-0.0 == 0.0)
    if fmt == "nf4":
        assert_same_bits(ours, theirs)


def test_fp4_table_equals_bitsandbytes_bit_for_bit():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert_same_bits(FP4_CODE, functional.get_4bit_type("fp4", device="cpu").numpy())


@pytest.mark.parametrize("name", ["blockwise8", "fp4", "nf4"])
def test_levels_thresholds_and_rank_to_code(name):
    fmt = FORMATS[name]
    levels, thresholds = fmt.levels, fmt.thresholds
    assert levels.dtype == np.float32 and (np.diff(levels) > 0).all()
    assert set(levels.tolist()) == set(fmt.code.tolist())
    assert thresholds.size == 2**fmt.bits - 1
    mids = ((levels[:-1].astype(np.float64) + levels[1:]) / 2).astype(np.float32)
    assert_same_bits(thresholds[: mids.size], mids)
    assert np.isinf(thresholds[mids.size:]).all() and (thresholds[mids.size:] > 0).all()
    # each threshold lies strictly between the levels it separates
    assert (levels[:-1] < mids).all() and (mids < levels[1:]).all()
    # rank -> code: the code's value is that level; zero maps to the +0 code
    for rank, level in enumerate(levels):
        code = fmt.rank_to_code[rank]
        assert fmt.code[code] == level
        if level == 0:
            assert not np.signbit(fmt.code[code])
    assert fmt.code[fmt.rank_to_code[np.searchsorted(levels, 0)]].view(np.uint32) == 0
    for array in (fmt.levels, fmt.thresholds, fmt.rank_to_code, fmt.code):
        assert not array.flags.writeable


def test_block_sizes_and_defaults():
    assert formats.BLOCK_SIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert FORMATS["blockwise8"].default_block_size == 4096
    assert FORMATS["nf4"].default_block_size == FORMATS["fp4"].default_block_size == 64
    assert formats.NESTED_FORMAT is FORMATS["blockwise8"]


def test_wire_bytes():
    assert FORMATS["fp16"].wire_bytes(10) == 20
    assert FORMATS["nf4"].wire_bytes(65) == 33 + 8
    assert FORMATS["blockwise8"].wire_bytes(4097) == 4097 + 8
    assert FORMATS["nf4"].wire_bytes(64 * 257, nested=True) == 32 * 257 + 257 + 16
    with pytest.raises(QuantizationError):
        FORMATS["raw"].wire_bytes(10)


def test_get_format():
    assert get_format("nf4") is FORMATS["nf4"]
    assert get_format(FORMATS["fp4"]) is FORMATS["fp4"]
    for bad in ("NF4", "", None, ["nf4"], 4):
        with pytest.raises(QuantizationError, match="unknown format"):
            get_format(bad)


# ---- the core does no I/O -------------------------------------------------------------------

FORBIDDEN = {"asyncio", "socket", "time", "select", "threading", "selectors", "ssl"}


def test_quant_core_imports_no_io_modules():
    package = Path(formats.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
