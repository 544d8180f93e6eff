"""The in-message way in: llmwire encodings carried inside Flower's records.

Server: :class:`QuantizedFedAvg`, a ``FedAvg`` that encodes the global once
per round (``down``: bf16 by default) and folds the clients' encoded updates
into one running sum as it reads each reply, never decoding a reply to fp32
first. Client: :func:`llmwire_mod` for an unchanged ClientApp (it decodes
the global into stock arrays for the app and encodes the app's reply as an
update), or :func:`load_global` and :func:`reply_update` for an app that
wants the memory win (decoded in place into the model's tensors; the update
computed from the received encoding, with no second copy of the model).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.app import RecordDict
from flwr.serverapp.strategy import FedAvg

from ...errors import LlmwireError
from ...quant.codec import MIN_ELEMENTS
from ...tensors import DTYPES
from .codec import (
    LAYOUT, META, Folder, decode_state, encode_state, encode_update, is_encoded, record_digest,
    wire_bytes,
)

__all__ = ["QuantizedFedAvg", "llmwire_mod", "load_global", "reply_update", "weights_meta"]

log = logging.getLogger("llmwire.flower")


def weights_meta(server_round: int, digest: str, up: str) -> ConfigRecord:
    """The META record of a broadcast: what it is, and how to send updates."""
    return ConfigRecord({"layout": LAYOUT, "kind": "weights", "round": server_round,
                         "digest": digest, "up": up})


def _encoded_record(content: RecordDict) -> tuple[str, ArrayRecord]:
    found = [(k, r) for k, r in content.array_records.items() if is_encoded(r)]
    if len(found) != 1:
        raise LlmwireError(f"expected one llmwire ArrayRecord in the message, found {len(found)}")
    return found[0]


def _weight(content: RecordDict, key: str) -> float:
    for record in content.metric_records.values():
        if key in record:
            value = record[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    raise LlmwireError(f"the reply's metrics hold no number {key!r} (its FedAvg weight)")


class QuantizedFedAvg(FedAvg):
    """FedAvg over llmwire encodings carried in Flower's messages.

    ``global_state``: the server's model (a state dict of torch tensors or
    NumPy arrays), updated in place after every round. ``down``: the format
    the global travels in to the clients (``bf16`` by default; ``raw`` for
    exact fp32); ``up``: the format of the clients' updates (``nf4``:
    deltas against the global they received, which match fp32's accuracy
    where weights at 4 bits do not; docs/learning.md). ``sums``: the running
    sums' dtype. Other keyword arguments go to ``FedAvg``.

    Pass :meth:`global_arrays` as ``start``'s ``initial_arrays``; the arrays
    ``start`` returns and hands to ``evaluate_fn`` are llmwire-encoded:
    restore them with :func:`~llmwire.integrations.flower.decode_state`, or
    read :attr:`global_state`.

    A reply that is not an update of this round's global (another digest),
    carries no weight, or fails to decode or to fold (non-finite values) is
    left out of the mean and reported in :attr:`history`, never half-added.
    """

    def __init__(self, global_state: Mapping[str, Any], *, down: str = "bf16",
                 up: str = "nf4", sums: str = "float32", min_elements: int = MIN_ELEMENTS,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_state = global_state
        self.down, self.up, self.min_elements = down, up, min_elements
        self._folder = Folder(global_state, sums)
        self._encoded: ArrayRecord | None = None
        self._digest = ""
        self._expected: set[int] = set()
        #: per round: clients folded, rejected replies (node, reason), failures, bytes
        self.history: list[dict[str, Any]] = []

    def global_arrays(self) -> ArrayRecord:
        """The global as the clients receive it (encoded once per round)."""
        if self._encoded is None:
            self._encoded = encode_state(self.global_state, self.down,
                                         min_elements=self.min_elements)
            self._digest = record_digest(self._encoded)
        return self._encoded

    def _with_meta(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        messages = list(messages)
        self._expected = {m.metadata.dst_node_id for m in messages}
        meta = weights_meta(server_round, self._digest, self.up)
        for message in messages:  # FedAvg shares one RecordDict between them
            message.content[META] = meta
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        record = self.global_arrays()
        return self._with_meta(super().configure_train(server_round, record, config, grid),
                               server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Any) -> Iterable[Message]:
        record = self.global_arrays()
        return self._with_meta(super().configure_evaluate(server_round, record, config, grid),
                               server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        expected = self._expected
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        down = wire_bytes(self.global_arrays())
        self._folder.reset()
        folded, rejected, up = [], [], 0
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                meta = msg.content.config_records.get(META)
                if meta is None or meta.get("kind") != "update" \
                        or meta.get("digest") != self._digest:
                    raise LlmwireError("not an llmwire update of this round's global "
                                       f"(meta {dict(meta) if meta else None})")
                _, record = _encoded_record(msg.content)
                weight = _weight(msg.content, self.weighted_by_key)
                self._folder.add(record, weight)
            except (LlmwireError, ValueError, TypeError) as exc:
                log.warning("round %d: the reply of node %s is left out: %s", server_round,
                            node, exc)
                rejected.append((node, str(exc)))
                continue
            up += wire_bytes(record)
            folded.append(msg)
        self.history.append({"round": server_round, "clients": [m.metadata.src_node_id
                                                               for m in folded],
                             "rejected": rejected, "flower_failures": [
                                 (m.metadata.src_node_id, m.error.reason) for m in errors],
                             "no_reply": sorted(expected - {m.metadata.src_node_id
                                                            for m in replies}),
                             "down_bytes": down * (len(valid) + len(errors)),
                             "up_bytes": up})
        if not folded:
            return None, None
        self._folder.apply_mean(self.global_state)
        self._encoded = None  # the next round's global, encoded on first use
        metrics = self.train_metrics_aggr_fn([m.content for m in folded], self.weighted_by_key)
        return self.global_arrays(), metrics


# -- the client side ----------------------------------------------------------

def load_global(msg: Message, state: Mapping[str, Any]) -> ArrayRecord:
    """Restore the global a :class:`QuantizedFedAvg` sent into ``state``'s own
    tensors, in place. Returns the received record: the base
    :func:`reply_update` computes the update against."""
    _, record = _encoded_record(msg.content)
    decode_state(record, state)
    return record


def reply_update(msg: Message, state: Mapping[str, Any], metrics: Mapping[str, Any], *,
                 base: ArrayRecord | None = None, fmt: str | None = None,
                 arrays_key: str = "arrays", metrics_key: str = "metrics") -> Message:
    """The reply to a train message: ``state - global`` encoded in the
    server's ``up`` format (or ``fmt``), with ``metrics`` (which must hold
    the FedAvg weight, ``num-examples`` by default)."""
    meta = msg.content.config_records.get(META)
    if meta is None or meta.get("kind") != "weights":
        raise LlmwireError("this message carries no llmwire global")
    if base is None:
        _, base = _encoded_record(msg.content)
    update = encode_update(state, base, fmt or str(meta.get("up", "nf4")))
    content = RecordDict({arrays_key: update, metrics_key: MetricRecord(dict(metrics)),
                          META: ConfigRecord({"layout": LAYOUT, "kind": "update",
                                              "round": meta["round"],
                                              "digest": meta["digest"]})})
    return Message(content, reply_to=msg)


def _stock(record: ArrayRecord) -> ArrayRecord:
    """Decoded into stock NumPy arrays (bfloat16, which NumPy lacks, as float32)."""
    out = ArrayRecord()
    for name, array in record.items():
        single = ArrayRecord()
        single[name] = array
        dtype = "float32" if array.dtype == "bfloat16" else array.dtype
        value = np.empty(tuple(array.shape), DTYPES[dtype].numpy)
        if dtype == array.dtype:
            decode_state(single, {name: value})
        else:
            import torch

            held = torch.empty(tuple(array.shape), dtype=torch.bfloat16)
            decode_state(single, {name: held})
            value = held.float().numpy()
        out[name] = Array(value)
    return out


def llmwire_mod(msg: Message, context: Any, call_next: Any) -> Message:
    """A Flower client mod for unchanged ClientApps under
    :class:`QuantizedFedAvg`: the app receives the global as stock arrays, and
    its reply's arrays go back as an llmwire update against that global.
    Messages that carry no llmwire global pass through untouched."""
    meta = msg.content.config_records.get(META)
    if meta is None or meta.get("kind") != "weights":
        return call_next(msg, context)
    key, encoded = _encoded_record(msg.content)
    msg.content[key] = _stock(encoded)
    reply = call_next(msg, context)
    if reply.has_error() or msg.metadata.message_type != MessageType.TRAIN \
            or key not in reply.content.array_records:
        return reply
    local = {name: array.numpy() for name, array in reply.content[key].items()}
    for name, array in encoded.items():  # the app's dtype may differ from the global's
        if name in local and array.dtype == "bfloat16":
            import torch

            local[name] = torch.from_numpy(local[name]).to(torch.bfloat16)
        elif name in local and local[name].dtype != DTYPES[array.dtype].numpy:
            local[name] = local[name].astype(DTYPES[array.dtype].numpy)
    reply.content[key] = encode_update(local, encoded, str(meta.get("up", "nf4")))
    reply.content[META] = ConfigRecord({"layout": LAYOUT, "kind": "update",
                                        "round": meta["round"], "digest": meta["digest"]})
    return reply
