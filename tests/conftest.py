"""Shared fixtures and helpers for llmwire's tests.

The suite runs twice in CI: once as is (C kernels) and once with
``LLMWIRE_PURE_PYTHON=1`` (NumPy reference). Tests that compare the two
import ``llmwire._native`` directly, so they run in both passes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "llmwire",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("llmwire")

try:
    from llmwire import _native as NATIVE
except ImportError:  # pragma: no cover - only where the extension did not build
    NATIVE = None

requires_native = pytest.mark.skipif(NATIVE is None, reason="llmwire._native did not import")

#: numpy storage dtype of each llmwire float dtype (bfloat16 as bit patterns)
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
#: unsigned view of the same width, to compare by bit pattern
UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}


def bits_of(array: np.ndarray) -> np.ndarray:
    """The bit patterns of a float array (uint view of the same width)."""
    array = np.ascontiguousarray(array)
    return array.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[array.itemsize])


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shapes and equal bit patterns, element for element."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.itemsize == expected.itemsize
    a, e = bits_of(actual).reshape(-1), bits_of(expected).reshape(-1)
    bad = np.flatnonzero(a != e)
    assert bad.size == 0, (
        f"{bad.size} of {a.size} differ; first at {bad[:5].tolist()}: "
        f"{[hex(int(v)) for v in a[bad[:5]]]} != {[hex(int(v)) for v in e[bad[:5]]]}")


def as_numpy(tensor) -> np.ndarray:
    """A torch tensor or NumPy array as NumPy (bfloat16 as uint16 bits)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


@pytest.fixture(scope="session")
def native():
    """The C extension module; skips the test where it did not import."""
    if NATIVE is None:
        pytest.skip("llmwire._native did not import")
    return NATIVE
