"""Type stub of the C extension ``llmwire._native`` (csrc/). Each function
has a NumPy twin in ``llmwire.quant.reference`` that defines its output."""

from collections.abc import Buffer

def cast(src: Buffer, src_dtype: int, dst: Buffer, dst_dtype: int, n: int,
         nontemporal: bool = False, /) -> None:
    """Convert n elements between float32 (0), float16 (1) and bfloat16 (2);
    nontemporal writes the output past the CPU caches."""

def quantize(src: Buffer, src_dtype: int, n: int, block: int, bits: int, thresholds: Buffer,
             rank_to_code: Buffer, buckets: Buffer, codes: Buffer, absmax: Buffer, /) -> int:
    """Block-quantize n elements into codes/absmax; return the non-finite count."""

def dequantize(codes: Buffer, absmax: Buffer, n: int, block: int, bits: int,
               code_values: Buffer, dst: Buffer, dst_dtype: int, nontemporal: bool = False,
               /) -> None:
    """Restore n elements of dst_dtype from codes and per-block absmax;
    nontemporal writes float32 output past the CPU caches."""
