"""Message quantization: formats, the NumPy reference, the kernel dispatch
and the tensor codec. The public names are re-exported by :mod:`llmwire`."""

from ._kernels import IMPLEMENTATION
from .codec import (
    QuantizedTensor,
    TensorSpec,
    decode_slice,
    dequantize,
    dequantize_state_dict,
    encode_slice_into,
    iter_slices,
    make_spec,
    quantize,
    quantize_state_dict,
)
from .formats import FORMATS, get_format

__all__ = [
    "FORMATS",
    "IMPLEMENTATION",
    "QuantizedTensor",
    "TensorSpec",
    "decode_slice",
    "dequantize",
    "dequantize_state_dict",
    "encode_slice_into",
    "get_format",
    "iter_slices",
    "make_spec",
    "quantize",
    "quantize_state_dict",
]
