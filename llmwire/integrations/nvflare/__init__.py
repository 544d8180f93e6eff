"""llmwire inside NVIDIA FLARE (docs/nvflare.md), for ``nvflare>=2.9,<2.10``.

DXO filters that quantize ``WEIGHTS`` and ``WEIGHT_DIFF`` on the CPU in
every llmwire format and restore them to the original dtype and container
(:class:`QuantizeFilter`, :class:`DequantizeFilter`), and a one-call helper
that wires all four filter positions of a ``FedJob`` with explicit task
names (:func:`add_filters`); and a FedAvg controller whose models travel
over llmwire beside NVFlare's message path (:class:`OutOfBandFedAvg`, with
:class:`OutOfBandClient` in the site's script).
"""

try:
    import nvflare  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llmwire.integrations.nvflare needs NVFlare: "
                      "pip install 'llmwire[nvflare]'") from exc

from .filters import META, DequantizeFilter, QuantizeFilter, add_filters

from .outofband import LINK, LinkError, OutOfBandClient, OutOfBandFedAvg  # noqa: E402

__all__ = ["QuantizeFilter", "DequantizeFilter", "add_filters", "META",
           "OutOfBandFedAvg", "OutOfBandClient", "LinkError", "LINK"]
