"""The out-of-band way in: model bytes beside Flower, over llmwire.

:class:`OutOfBandFedAvg` runs an llmwire server (llmwire.integrations._link)
next to the strategy, in the ServerApp's process. Flower's messages carry
only a link (address, port, a per-run secret, the round, the node's token);
each ClientApp, with :class:`OutOfBandClient`, connects, pulls the global
and pushes its update (``local - global``) into the round's streaming
aggregator (llmwire.rounds). The SuperLink and the SuperNodes never see a
model byte. What each client's downlink is (nothing, the last mean update,
or whole weights) and who counts: see llmwire.integrations._link.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from .._link import LinkClient, LinkError, LinkServer
from ...rounds import Reference
from .codec import META

__all__ = ["OutOfBandFedAvg", "OutOfBandClient", "FlowerLinkError"]

log = logging.getLogger("llmwire.flower")

#: the link's errors, under the name this module had first
FlowerLinkError = LinkError


class OutOfBandFedAvg(FedAvg):
    """FedAvg whose model bytes travel over llmwire, beside Flower.

    ``global_state``: the server's model (a state dict), updated in place
    after every round; it is the result (``start`` returns no arrays).
    ``down``: the format of the mean update sent to clients that hold the
    previous global (whole weights always go raw); ``up``: the clients'
    updates. ``host``/``port``: where the llmwire server listens (port 0:
    any free one), ``advertise``: the address the clients are told (default
    ``host``). ``secret``: the connection secret (default: 32 random bytes
    per strategy); it travels in Flower's messages, so protect Flower's own
    channel (TLS) as you would the model, or pass ``ssl`` for llmwire's.
    ``gather_timeout``: how long the downlink waits for all of a round's
    clients before it goes to those that came; ``upload_timeout``: how long
    aggregation waits for the uploads of clients that replied. Other keyword
    arguments go to ``FedAvg``.
    """

    def __init__(self, global_state: Mapping[str, Any], *, down: str = "nf4",
                 up: str = "nf4", host: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, secret: bytes | None = None,
                 ssl: Any = None, gather_timeout: float = 30.0,
                 upload_timeout: float = 600.0, sums: str = "float32", concurrency: int = 2,
                 settings: Any = None, **kwargs: Any) -> None:
        self.link = LinkServer(global_state, down=down, up=up, host=host, port=port,
                               advertise=advertise, secret=secret, ssl=ssl,
                               gather_timeout=gather_timeout, upload_timeout=upload_timeout,
                               sums=sums, concurrency=concurrency, settings=settings,
                               name="llmwire-flower-server")
        super().__init__(**kwargs)
        self.global_state = global_state

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per round and purpose: clients, downlink modes, failures, bytes."""
        return self.link.history

    @property
    def reference(self) -> Reference | None:
        return self.link.reference

    @property
    def port(self) -> int:
        return self.link.port

    # -- life ------------------------------------------------------------------

    def open(self) -> None:
        """Start the llmwire server (``start`` does it; call it yourself to
        drive the rounds without ``start``)."""
        self.link.open()

    def close(self) -> None:
        """Stop the llmwire server and its thread."""
        self.link.close()

    def start(self, grid: Any, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 3600, **kwargs: Any) -> Any:
        self.open()
        try:
            return super().start(grid, ArrayRecord() if initial_arrays is None
                                 else initial_arrays, num_rounds, timeout, **kwargs)
        finally:
            self.close()

    # -- Flower's side -----------------------------------------------------------

    def _link(self, messages: Iterable[Message], server_round: int,
              purpose: str) -> list[Message]:
        messages = list(messages)
        if not messages:  # e.g. fraction_evaluate=0: nothing to pull
            return messages
        self.link.expect(server_round, purpose, {m.metadata.dst_node_id for m in messages})
        for message in messages:
            node = message.metadata.dst_node_id
            # FedAvg shares one RecordDict between the messages: each gets its
            # own, since its token names its node alone
            content = RecordDict(dict(message.content.items()))
            content[META] = ConfigRecord(self.link.link(server_round, purpose, node))
            message.content = content
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> Iterable[Message]:
        return self._link(super().configure_train(server_round, ArrayRecord(), config, grid),
                          server_round, "train")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Any) -> Iterable[Message]:
        return self._link(super().configure_evaluate(server_round, ArrayRecord(), config,
                                                     grid), server_round, "evaluate")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, errors = self._check_and_log_replies(list(replies), is_train=True,
                                                    validate=False)
        replied = {m.metadata.src_node_id for m in valid}
        record = self.link.finish(server_round, replied)
        for node, reason in record["failed"]:
            log.warning("round %d: node %s's update is left out: %s", server_round, node,
                        reason)
        record["flower_failures"] = [(m.metadata.src_node_id, m.error.reason) for m in errors]
        counted = {int(c) for c in record["clients"]}
        if counted - replied:
            log.warning("round %d: nodes %s uploaded an update that verified but sent no "
                        "Flower reply; their updates count", server_round,
                        sorted(counted - replied))
        if not counted:
            return None, None
        metrics = self.train_metrics_aggr_fn(
            [m.content for m in valid if m.metadata.src_node_id in counted],
            self.weighted_by_key) if counted & replied else None
        return None, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        self.link.finish_pulls(server_round)
        return super().aggregate_evaluate(server_round, replies)


# -- the client side ------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$LLMWIRE_FLOWER_CACHE``, else ``~/.cache/llmwire/flower``."""
    return Path(os.environ.get("LLMWIRE_FLOWER_CACHE")
                or Path.home() / ".cache" / "llmwire" / "flower")


class OutOfBandClient(LinkClient):
    """A ClientApp's llmwire link for one message of an :class:`OutOfBandFedAvg`.

    ``state``: the model's own state dict (training changes it in place).
    :meth:`pull` fills it with the round's global (from the cached copy
    plus the server's update, or whole), :meth:`push` sends ``state -
    global``, :meth:`reply` builds the Flower reply. The connection stays
    open between them (a loop thread answers the server's pings while the
    app trains). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, msg: Message, context: Any, state: Mapping[str, Any], *,
                 cache_dir: str | os.PathLike[str] | None = None, timeout: float = 60.0,
                 ssl: Any = None) -> None:
        meta = msg.content.config_records.get(META)
        super().__init__(dict(meta) if meta is not None else {}, int(context.node_id), state,
                         cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                         timeout=timeout, ssl=ssl)
        self.msg, self.meta = msg, self.link

    def reply(self, metrics: Mapping[str, Any], metrics_key: str = "metrics") -> Message:
        """The Flower reply: ``metrics`` (with the FedAvg weight key) and what moved."""
        return Message(RecordDict({metrics_key: MetricRecord(dict(metrics)),
                                   META: ConfigRecord(self.receipt())}), reply_to=self.msg)
