"""Generate tests/vectors/quant_vectors.json from the NumPy reference.

Run once (``LLMWIRE_PURE_PYTHON=1 python3 tests/vectors/make_vectors.py``) and
commit the output; the tests never run this script. They check that both the
C kernels and the reference still reproduce every stored byte, so a change of
the spec cannot pass silently: regenerate only on purpose, and say so.

All floats are stored as bit patterns (hex), never as decimal text.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["LLMWIRE_PURE_PYTHON"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import llmwire  # noqa: E402
from llmwire.quant import reference  # noqa: E402
from llmwire.quant.formats import FORMATS  # noqa: E402

assert llmwire.IMPLEMENTATION == "reference"

HERE = Path(__file__).resolve().parent
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


#: arrays larger than this (bytes) are stored as a SHA-256 digest, not in full
FULL_LIMIT = 2048


def hexbytes(array: np.ndarray) -> str:
    return np.ascontiguousarray(array).tobytes().hex()


def expected(array: np.ndarray) -> str | dict:
    """Small arrays in full (hex), large ones as their SHA-256."""
    data = np.ascontiguousarray(array).tobytes()
    if len(data) <= FULL_LIMIT:
        return data.hex()
    return {"sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data)}


def f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float64).astype(np.float32)


def specials32() -> np.ndarray:
    bits = np.array([0x7FC00000, 0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x007FFFFF,
                     0xFFC00123, 0x7F800005], dtype=np.uint32)
    return bits.view(np.float32)


def block_inputs() -> list[tuple[str, str, int, np.ndarray]]:
    rng = np.random.default_rng(20240601)
    cases = []
    mixed = rng.standard_normal(69).astype(np.float32)  # odd, 3 blocks of 32 (last short)
    mixed[[3, 10, 20, 40, 41, 50, 60, 68]] = specials32()
    cases.append(("mixed_specials_odd", "float32", 32, mixed))
    blocks = np.zeros(96, np.float32)
    blocks[32:64] = np.nan  # all-NaN block
    blocks[64:] = rng.standard_normal(32) * np.float32(1e-39)  # subnormal block
    blocks[70] = np.inf
    cases.append(("zero_nan_subnormal_blocks", "float32", 32, blocks))
    ties = FORMATS["nf4"].thresholds[:14].astype(np.float32) * np.float32(4.0)
    ties = np.concatenate([ties, f32([4.0, -4.0, 3.0, -3.0, 0.5, 1e-30, -1e30])])
    cases.append(("thresholds_and_extremes", "float32", 64, ties))
    half = (rng.standard_normal(45) * 100).astype(np.float16)
    half.view(np.uint16)[[0, 5, 9, 30, 44]] = [0x7C00, 0xFC00, 0x7E00, 0x0001, 0x8000]
    cases.append(("float16_source", "float16", 32, half))
    brain = (rng.standard_normal(33).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    brain[[1, 2, 3, 32]] = [0x7F80, 0xFF80, 0x7FC0, 0x0001]
    cases.append(("bfloat16_source", "bfloat16", 32, brain))
    wide = (rng.standard_t(3, 5000) * 10).astype(np.float32)
    wide[[7, 4100]] = [np.inf, np.nan]
    cases.append(("default_block_two_blocks", "float32", 4096, wide))
    return cases


def block_vectors() -> list[dict]:
    out = []
    for fmt in ("blockwise8", "fp4", "nf4"):
        for name, dtype, block, src in block_inputs():
            if fmt != "blockwise8" and block == 4096:
                block = 64
            codes, absmax, nonfinite = reference.quantize_blocks(src, dtype, FORMATS[fmt], block)
            with np.errstate(all="ignore"):
                restored = {dst: expected(reference.dequantize_blocks(
                    codes, absmax, src.size, FORMATS[fmt], block, dst))
                    for dst in ("float32", "float16", "bfloat16")}
            out.append({"name": f"{fmt}/{name}", "format": fmt, "dtype": dtype,
                        "block_size": block, "count": int(src.size), "input": hexbytes(src),
                        "codes": expected(codes), "absmax": expected(absmax),
                        "nonfinite": nonfinite, "dequantized": restored})
    return out


def cast_vectors() -> list[dict]:
    rng = np.random.default_rng(7)
    f32_bits = np.concatenate([
        specials32().view(np.uint32),
        np.array([0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x38800000, 0x387FFFFF,
                  0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF], np.uint32),
        rng.integers(0, 2**32, 40, dtype=np.uint64).astype(np.uint32)]).astype(np.uint32)
    sixteen = np.concatenate([
        np.array([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x03FF, 0x7BFF,
                  0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x007F, 0x7F7F], np.uint16),
        rng.integers(0, 2**16, 40, dtype=np.uint32).astype(np.uint16)])
    out = []
    for src_dtype, dst_dtype in [("float32", "float16"), ("float32", "bfloat16"),
                                 ("float16", "float32"), ("float16", "bfloat16"),
                                 ("bfloat16", "float32"), ("bfloat16", "float16")]:
        src = f32_bits.view(np.float32) if src_dtype == "float32" else sixteen.view(STORAGE[src_dtype])
        result = reference.cast(src, src_dtype, dst_dtype)
        out.append({"name": f"{src_dtype}->{dst_dtype}", "src_dtype": src_dtype,
                    "dst_dtype": dst_dtype, "count": int(src.size), "input": hexbytes(src),
                    "output": expected(result)})
    return out


def codec_vectors() -> list[dict]:
    """Whole tensors through llmwire.quantize: header and every part."""
    x = (np.sin(np.arange(8230, dtype=np.float64) * 0.37) * np.exp(np.cos(np.arange(8230) * 0.011) * 3))
    x = x.astype(np.float32)
    x[[0, 100, 5000]] = [np.nan, np.inf, -np.inf]
    cases = [("fp16", {}), ("bf16", {}), ("blockwise8", {}), ("fp4", {}), ("nf4", {}),
             ("nf4", {"nested": True, "block_size": 32}), ("fp4", {"nested": True, "block_size": 32}),
             ("blockwise8", {"block_size": 256})]
    out = []
    for fmt, options in cases:
        q = llmwire.quantize(x.reshape(10, 823), fmt, **options)
        restored = llmwire.dequantize(q)
        out.append({"name": f"{fmt}/{options}", "format": fmt, "options": options,
                    "header": q.header.hex(), "nonfinite": q.nonfinite,
                    "parts": [[name, expected(part)] for name, part in q.parts.items()],
                    "dequantized": expected(restored)})
    return {"input": hexbytes(x), "shape": [10, 823], "dtype": "float32", "cases": out}


def main() -> None:
    vectors = {
        "about": "Generated by tests/vectors/make_vectors.py from llmwire.quant.reference; "
                 "all arrays are little-endian bytes in hex.",
        "casts": cast_vectors(),
        "blocks": block_vectors(),
        "codec": codec_vectors(),
    }
    path = HERE / "quant_vectors.json"
    path.write_text(json.dumps(vectors, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
