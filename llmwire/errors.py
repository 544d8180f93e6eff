"""llmwire's exceptions: one tree, rooted at :class:`LlmwireError`.

Errors are sorted by *fault* (the caller misused the API, or the peer broke
the protocol) and by *scope* (one frame, one stream, the whole connection).
Where callers would reasonably catch a builtin, the error mixes it in.

.. code-block:: text

    LlmwireError
    ├── QuantizationError (ValueError)       bad dtype, format or option
    │   └── NonFiniteError                   NaN/inf met with nonfinite="raise"
    └── ProtocolError                        abstract: see its two kinds
        ├── LocalProtocolError               you misused the API
        └── RemoteProtocolError              the peer broke the protocol

Each class says, in its docstring, what state the object that raised it is in
afterwards; docs/errors.md collects the same facts in one table.
"""

from __future__ import annotations

__all__ = [
    "LlmwireError",
    "QuantizationError",
    "NonFiniteError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
]


class LlmwireError(Exception):
    """Root of every exception llmwire raises on purpose."""


class QuantizationError(LlmwireError, ValueError):
    """A tensor cannot be quantized or restored as asked.

    Raised for an unsupported dtype or format name, a bad option, or a
    :class:`~llmwire.QuantizedTensor` whose parts do not fit together. Nothing
    was allocated for the result; the input is untouched.
    """


class NonFiniteError(QuantizationError):
    """A tensor held NaN or ±inf and ``nonfinite="raise"`` was asked for.

    ``count`` is the number of non-finite elements found (in the slice or
    tensor that was being quantized).
    """

    def __init__(self, count: int, name: str | None = None) -> None:
        self.count = count
        self.name = name
        where = f" in {name!r}" if name else ""
        super().__init__(f"{count} non-finite value(s){where}; "
                         "pass nonfinite='saturate' to quantize them by the documented rule")


class ProtocolError(LlmwireError):
    """Abstract: the connection cannot go on as asked. See the two kinds."""

    def __init__(self, *args: object) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError "
                            "or RemoteProtocolError")
        super().__init__(*args)


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
