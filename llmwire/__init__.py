"""llmwire: move very large model state between machines.

Quantized, streamed, with bounded memory. This module holds the public API
and nothing else; see docs/ for the guides.
"""

from ._version import __version__
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
    "LlmwireError",
    "LocalProtocolError",
    "NonFiniteError",
    "ProtocolError",
    "QuantizationError",
    "RemoteProtocolError",
]
