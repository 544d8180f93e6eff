"""llmwire: move very large model state between machines.

Quantized, streamed, with bounded memory. This module holds the public API
and nothing else; see docs/ for the guides.
"""

from ._version import __version__
from .quant import (
    FORMATS,
    IMPLEMENTATION,
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
from .errors import (
    LlmwireError,
    LocalProtocolError,
    NonFiniteError,
    ProtocolError,
    QuantizationError,
    RemoteProtocolError,
)

__all__ = [
    "__version__",
    "FORMATS",
    "IMPLEMENTATION",
    "QuantizedTensor",
    "TensorSpec",
    "decode_slice",
    "dequantize",
    "dequantize_state_dict",
    "encode_slice_into",
    "iter_slices",
    "make_spec",
    "quantize",
    "quantize_state_dict",
    "LlmwireError",
    "LocalProtocolError",
    "NonFiniteError",
    "ProtocolError",
    "QuantizationError",
    "RemoteProtocolError",
]
