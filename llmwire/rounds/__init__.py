"""Federated rounds on the wire: one server, N clients (docs/rounds.md).

Below any orchestrator: no scheduling, no client selection, no training
loop. The primitives of a round are:

- updates, not weights: a client sends ``local - global`` and the server
  ``new global - previous global``, quantized in any format, each receiver
  adding the restored delta to its own copy (:func:`send_update`,
  :func:`receive_update`), named by a :class:`Reference` both sides compute
  (round + digest); unchanged tensors cost a manifest line;
- error feedback, optional (:class:`ErrorFeedback`);
- broadcast, encoded once and sent to N (:func:`broadcast_update`,
  :func:`broadcast_state`, :func:`broadcast_planned`);
- streaming aggregation into one running sum, of exactly the uploads that
  verified (:class:`Aggregator`).
"""

from .aggregate import Aggregate, AggregationError, Aggregator, Upload, UploadStalled
from .broadcast import DEFAULT_WINDOW, BroadcastResult, PeerResult, broadcast_planned
from .exchange import (
    Diverged, UpdateResult, announce, broadcast_state, broadcast_update, read_announce,
    receive_update, send_update,
)
from .feedback import ErrorFeedback
from .reference import Reference, state_digest
from .sinks import AccumulateSink, ApplySink, NonFiniteUpdate, ReferenceMismatch
from .update import add_into, plan_delta, plan_increment

__all__ = [
    "Reference", "state_digest", "ErrorFeedback",
    "plan_delta", "plan_increment", "add_into",
    "ApplySink", "AccumulateSink", "ReferenceMismatch", "NonFiniteUpdate",
    "Aggregator", "Aggregate", "Upload", "AggregationError", "UploadStalled",
    "broadcast_planned", "broadcast_update", "broadcast_state", "BroadcastResult",
    "PeerResult", "DEFAULT_WINDOW",
    "send_update", "receive_update", "UpdateResult", "Diverged", "announce", "read_announce",
]
