"""llmwire inside Flower (docs/flower.md), for ``flwr>=1.42,<1.43``.

Two ways in:

- in-message (no extra port): :class:`QuantizedFedAvg` on the server, and
  :func:`llmwire_mod` (unchanged apps) or :func:`load_global` /
  :func:`reply_update` (apps that want the memory win) on the clients;
- out of band: :class:`OutOfBandFedAvg` runs an llmwire server beside the
  strategy, Flower messages carry only a reference, and clients pull the
  global and push their update over llmwire (:class:`OutOfBandClient`).
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llmwire.integrations.flower needs Flower: "
                      "pip install 'llmwire[flower]'") from exc

from .codec import (
    META, decode_state, encode_array, encode_state, encode_update, is_encoded, record_digest,
    wire_bytes,
)
from .inmessage import QuantizedFedAvg, llmwire_mod, load_global, reply_update

__all__ = ["QuantizedFedAvg", "llmwire_mod", "load_global", "reply_update", "META",
           "encode_array", "encode_state", "decode_state", "encode_update", "is_encoded",
           "record_digest", "wire_bytes"]
from .outofband import FlowerLinkError, OutOfBandClient, OutOfBandFedAvg  # noqa: E402

__all__ += ["OutOfBandFedAvg", "OutOfBandClient", "FlowerLinkError"]
