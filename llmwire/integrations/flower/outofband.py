"""The out-of-band way in: model bytes beside Flower, over llmwire.

:class:`OutOfBandFedAvg` runs an llmwire server next to the strategy, in the
ServerApp's process. Flower's messages carry only a reference (address,
port, a per-run secret, the round); each ClientApp, with
:class:`OutOfBandClient`, connects, pulls the global and pushes its update
(``local - global``) into the round's streaming aggregator
(llmwire.rounds). The SuperLink and the SuperNodes never see a model byte.

The downlink of a round, per client, by what it says it holds (its cached
copy: llmwire.integrations.flower.cache):

- the current global: nothing but a one-line message;
- the previous global: the last mean update, in ``down`` (nf4 by default),
  encoded once for every such client (``broadcast_planned``);
- anything else (a new client, one that missed rounds): whole weights, raw.

The server waits for the round's clients to connect (``gather_timeout``
after the round's messages went out), sends each group once, then reads the
uploads as they come; a client that connects later gets its downlink alone.
The aggregate is the mean of exactly the uploads that verified (the round
primitives' rule: a failed or missing client is never half-added).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from ...errors import LlmwireError, PayloadError, TargetMismatch
from ...rounds import Aggregator, Reference, broadcast_planned, broadcast_update
from ...rounds import broadcast_state, receive_update, send_update
from ...rounds.exchange import Diverged
from ...rounds.update import plan_increment
from ...transport import connect, serve
from .._encoding import tied_names
from ._loop import LoopThread
from .cache import GlobalCache
from .codec import LAYOUT, META

__all__ = ["OutOfBandFedAvg", "OutOfBandClient", "FlowerLinkError"]

log = logging.getLogger("llmwire.flower")

_HELLO = "llmwire-flower-hello"
_CURRENT = "llmwire-flower-current"
_REFUSED = "llmwire-flower-refused"


class FlowerLinkError(LlmwireError):
    """The llmwire side of a Flower round failed: the server refused this
    client (not in the round, a stale round), or the pull or push failed."""


@dataclass(eq=False)
class _Session:
    node: int
    transport: Any
    have: Reference | None
    downlinked: asyncio.Future[None]
    done: asyncio.Future[Any]
    mode: str = ""
    wire_bytes: int = 0


@dataclass(eq=False)
class _Gather:
    round: int
    purpose: str
    expected: set[int]
    sessions: dict[int, _Session] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one downlink at a time
    sent: bool = False  # the gathered downlink went out (later clients go alone)
    opened: bool = False  # train: the aggregator takes this round's uploads
    over: bool = False  # Flower closed the round


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
        super().__init__(**kwargs)
        tied = tied_names(global_state)
        if tied:  # the clients' cached global (.safetensors) cannot alias them
            raise TargetMismatch(f"{tied[0][0]!r} and {tied[0][1]!r} share one tensor: untie "
                                 "them (clone one) for out-of-band rounds")
        self.global_state = global_state
        self.down, self.up = down, up
        self.host, self.port, self.advertise = host, port, advertise or host
        self.secret = secret or secrets.token_bytes(32)
        self.ssl, self.settings = ssl, settings
        self.gather_timeout, self.upload_timeout = gather_timeout, upload_timeout
        self.sums, self.concurrency = sums, concurrency
        self.run_id = secrets.token_hex(8)
        self.reference: Reference | None = None
        #: per round and purpose: clients, downlink modes, failures, bytes
        self.history: list[dict[str, Any]] = []
        self._loop: LoopThread | None = None
        self._server: Any = None
        self._aggregator: Aggregator | None = None
        self._prev: Reference | None = None
        self._pending: Mapping[str, Any] | None = None
        self._gathers: dict[tuple[int, str], _Gather] = {}
        self._train_round: int | None = None

    # -- life ------------------------------------------------------------------

    def open(self) -> None:
        """Start the llmwire server (``start`` does it; call it yourself to
        drive the rounds without ``start``)."""
        if self._loop is not None:
            return
        self._loop = LoopThread("llmwire-flower-server")
        self.reference = Reference.of(self.global_state, 0)
        self._aggregator = Aggregator(self.global_state, self.reference, dtype=self.sums,
                                      concurrency=self.concurrency)

        async def open_server() -> Any:
            return await serve(self._handle, self.host, self.port, secret=self.secret,
                               ssl=self.ssl, settings=self.settings)

        self._server = self._loop.call(open_server())
        self.port = self._server.port

    def close(self) -> None:
        """Stop the llmwire server and its thread."""
        if self._loop is None:
            return
        server, self._server = self._server, None

        async def shut() -> None:
            if server is not None:
                await server.close()

        try:
            self._loop.call(shut(), timeout=30)
        finally:
            self._loop.close()
            self._loop = None

    def start(self, grid: Any, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float = 3600, **kwargs: Any) -> Any:
        self.open()
        try:
            return super().start(grid, ArrayRecord() if initial_arrays is None
                                 else initial_arrays, num_rounds, timeout, **kwargs)
        finally:
            self.close()

    # -- Flower's side -----------------------------------------------------------

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop is None:
            raise LlmwireError("the strategy's llmwire server is not running: call start() "
                               "or open() first")
        return self._loop.call(coro, timeout)

    def _link(self, messages: Iterable[Message], server_round: int,
              purpose: str) -> list[Message]:
        messages = list(messages)
        if not messages:  # e.g. fraction_evaluate=0: nothing to pull
            return messages
        nodes = {m.metadata.dst_node_id for m in messages}
        self._call(self._expect(server_round, purpose, nodes))
        for message in messages:
            node = message.metadata.dst_node_id
            # FedAvg shares one RecordDict between the messages: each gets its
            # own, since its token names its node alone
            content = RecordDict(dict(message.content.items()))
            content[META] = ConfigRecord({
                "layout": LAYOUT, "kind": "link", "host": self.advertise, "port": self.port,
                "secret": self.secret.hex(), "round": server_round, "purpose": purpose,
                "up": self.up, "run": self.run_id, "tls": self.ssl is not None, "node": node,
                "token": self._token(server_round, purpose, node),
                "gather_timeout": self.gather_timeout})
            message.content = content
        return messages

    def _token(self, server_round: int, purpose: str, node: int) -> str:
        """What proves a connection speaks for ``node`` (only its message holds it)."""
        text = f"{self.run_id}/{server_round}/{purpose}/{node}".encode()
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()

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
        record = self._call(self._finish(server_round, replied))
        for node, reason in record["failed"]:
            log.warning("round %d: node %s's update is left out: %s", server_round, node,
                        reason)
        record["flower_failures"] = [(m.metadata.src_node_id, m.error.reason) for m in errors]
        self.history.append(record)
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
        self._call(self._finish_pulls(server_round))
        return super().aggregate_evaluate(server_round, replies)

    # -- the llmwire side (on the loop thread) -----------------------------------

    async def _expect(self, server_round: int, purpose: str, nodes: set[int]) -> None:
        gather = _Gather(server_round, purpose, set(nodes))
        self._gathers[(server_round, purpose)] = gather
        if purpose == "train":
            self._train_round = server_round
        asyncio.ensure_future(self._coordinate(gather))

    async def _coordinate(self, gather: _Gather) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gather.arrived.wait(), self.gather_timeout)
        if gather.over or gather.sent:
            return
        gather.sent = True
        await self._downlink(gather, list(gather.sessions.values()))

    async def _handle(self, transport: Any) -> None:
        try:
            msg = await asyncio.wait_for(transport.receive_message(64 * 1024), 60)
        except (asyncio.TimeoutError, LlmwireError):
            return
        hello = msg.header if isinstance(msg.header, dict) else {}
        node, round_, purpose = hello.get("node"), hello.get("round"), hello.get("purpose")
        valid = (hello.get("kind") == _HELLO and type(node) is int and type(round_) is int
                 and purpose in ("train", "evaluate"))
        gather = self._gathers.get((round_, purpose)) if valid else None
        token = hello.get("token")
        if gather is None or gather.over or node not in gather.expected \
                or node in gather.sessions or not isinstance(token, str) \
                or not hmac.compare_digest(token, self._token(round_, purpose, node)):
            reason = ("not a Flower hello" if not valid else
                      f"node {node!r} is not expected for {purpose} round {round_!r}"
                      if gather is None or gather.over or node not in gather.expected else
                      f"node {node!r} already connected for round {round_!r}"
                      if node in gather.sessions else
                      f"node {node!r}: the token is not this round's")
            with contextlib.suppress(LlmwireError):
                await transport.send_message({"kind": _REFUSED, "reason": reason})
            return
        loop = asyncio.get_running_loop()
        session = _Session(node, transport, Reference.from_wire(hello.get("have")),
                           loop.create_future(), loop.create_future())
        gather.sessions[node] = session
        try:
            if gather.sent:  # late: its downlink alone
                await self._downlink(gather, [session])
            elif set(gather.sessions) >= gather.expected:
                gather.arrived.set()
            await session.downlinked
            if purpose == "train":
                upload = await self._aggregator.receive(transport, client=str(node))
                session.done.set_result(upload)
            else:
                session.done.set_result(None)
        except BaseException as exc:
            if not session.done.done():
                session.done.set_exception(exc)
                session.done.exception()  # retrieved: reported through the round's record
            if not isinstance(exc, (LlmwireError, asyncio.CancelledError, OSError)):
                raise
        finally:
            with contextlib.suppress(Exception):
                await transport.close()

    async def _downlink(self, gather: _Gather, sessions: list[_Session]) -> None:
        """Send each session its global: nothing, the last mean, or whole
        weights; then (train) open the round's aggregation, and only then let
        the sessions go on to their uploads. One at a time per gather: a late
        client's waits for the gathered one (which reads the pending mean)."""
        async with gather.lock:
            if gather.over:
                for s in sessions:
                    if not s.downlinked.done():
                        s.downlinked.set_exception(FlowerLinkError(
                            f"node {s.node}: the round ended before its downlink"))
                return
            await self._downlink_locked(gather, sessions)

    async def _downlink_locked(self, gather: _Gather, sessions: list[_Session]) -> None:
        current = self.reference
        assert current is not None and self._aggregator is not None
        pending = self._pending  # None once a train round opened (its sums were zeroed)
        groups: dict[str, list[_Session]] = {"current": [], "update": [], "whole": []}
        for s in sessions:
            if s.have == current:
                groups["current"].append(s)
            elif pending is not None and s.have == self._prev:
                groups["update"].append(s)
            else:
                groups["whole"].append(s)
        outcome: dict[_Session, BaseException | None] = {}
        try:
            for s in groups["current"]:
                s.mode = "current"
                try:
                    await s.transport.send_message({"kind": _CURRENT})
                    outcome[s] = None
                except LlmwireError as exc:
                    outcome[s] = exc
            if groups["update"]:
                assert self._prev is not None and pending is not None
                manifest, views = plan_increment(pending, self.global_state, self.down,
                                                 reference=self._prev)
                result = await broadcast_planned([s.transport for s in groups["update"]],
                                                 manifest, views,
                                                 header={"round": current.round,
                                                         "llmwire-flower": "update"})
                self._outcomes(groups["update"], result, "update", current, outcome)
            if groups["whole"]:
                result = await broadcast_state([s.transport for s in groups["whole"]],
                                               self.global_state, current.round)
                self._outcomes(groups["whole"], result, "whole", current, outcome)
            if gather.purpose == "train" and not gather.opened:
                self._aggregator.next_round(current)  # the sums (the pending mean) zeroed
                self._pending = None
                gather.opened = True
        except BaseException as exc:
            for s in sessions:
                outcome.setdefault(s, exc)
            raise
        finally:
            for s in sessions:
                error = outcome.get(s)
                if s.downlinked.done():
                    continue
                if error is None:
                    s.downlinked.set_result(None)
                else:
                    s.downlinked.set_exception(FlowerLinkError(
                        f"node {s.node}: the downlink failed: {error}"))

    @staticmethod
    def _outcomes(sessions: list[_Session], result: Any, mode: str, current: Reference,
                  outcome: dict[_Session, BaseException | None]) -> None:
        for session, peer in zip(sessions, result.peers):
            session.mode, session.wire_bytes = mode, result.wire_bytes
            if peer.landed and peer.receipt.get("digest") == current.digest:
                outcome[session] = None
            else:
                outcome[session] = peer.error or Diverged(
                    f"node {session.node} holds {peer.receipt.get('digest')!r}, the server "
                    f"{current.digest!r}")

    async def _finish(self, server_round: int, replied: set[int]) -> dict[str, Any]:
        """Wait for the uploads of the clients that replied; give up on the
        others; close the round and apply its mean to the global."""
        gather = self._gathers.pop((server_round, "train"), None)
        assert self._aggregator is not None and self.reference is not None
        sessions = await self._end(gather, replied, self.upload_timeout)
        failed = [(s.node, str(s.done.exception())) for s in sessions
                  if s.done.done() and s.done.exception() is not None]
        if gather is not None:
            missing = gather.expected - set(gather.sessions)
            failed += [(node, "never connected") for node in sorted(missing)]
        if gather is None or not gather.opened:
            # no client came at all: the pending mean goes next round
            return self._record(server_round, "train", sessions, failed, [], 0)
        try:
            aggregate = self._aggregator.close()
        except PayloadError as exc:  # an upload's undo outlived the grace: nothing counts
            failed.append((-1, f"the round could not be closed: {exc}"))
            self._pending = None
            return self._record(server_round, "train", sessions, failed, [], 0)
        up = sum(u.wire_bytes for u in self._aggregator.uploads)
        clients = list(aggregate.clients)
        if clients:
            result = await broadcast_update([], aggregate.update, self.global_state,
                                            self.reference, self.down)
            self._prev, self.reference = self.reference, result.reference
            self._pending = aggregate.update  # views of the sums, until the next round opens
        return self._record(server_round, "train", sessions, failed, clients, up)

    async def _finish_pulls(self, server_round: int) -> None:
        gather = self._gathers.pop((server_round, "evaluate"), None)
        if gather is None:
            return
        sessions = await self._end(gather, set(gather.sessions), self.upload_timeout)
        failed = [(s.node, str(s.done.exception())) for s in sessions
                  if s.done.done() and s.done.exception() is not None]
        failed += [(node, "never connected") for node in sorted(gather.expected
                                                                - set(gather.sessions))]
        self.history.append(self._record(server_round, "evaluate", sessions, failed, [], 0))

    async def _end(self, gather: _Gather | None, replied: set[int], timeout: float
                   ) -> list[_Session]:
        """Close a gather: sessions still waiting for their downlink fail now;
        those of nodes that replied get ``timeout`` to finish; the rest are
        closed (an upload in progress is taken back out) and awaited."""
        if gather is None:
            return []
        gather.over = True
        sessions = list(gather.sessions.values())
        for s in sessions:
            if not s.downlinked.done():
                s.downlinked.set_exception(FlowerLinkError(
                    f"node {s.node}: connected, and the round ended before its downlink"))
        waiting = [s.done for s in sessions if s.node in replied and not s.done.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        stragglers = [s for s in sessions if not s.done.done()]
        for s in stragglers:
            with contextlib.suppress(Exception):
                await s.transport.close("the round is over")
        if stragglers:
            await asyncio.wait([s.done for s in stragglers], timeout=30)
        return sessions

    def _record(self, server_round: int, purpose: str, sessions: list[_Session],
                failed: list[tuple[int, str]], clients: list[str], up: int) -> dict[str, Any]:
        return {"round": server_round, "purpose": purpose, "clients": clients,
                "downlink": {str(s.node): s.mode for s in sessions},
                "down_bytes": sum(s.wire_bytes for s in sessions), "up_bytes": up,
                "failed": failed, "reference": str(self.reference)}


# -- the client side ------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$LLMWIRE_FLOWER_CACHE``, else ``~/.cache/llmwire/flower``."""
    return Path(os.environ.get("LLMWIRE_FLOWER_CACHE")
                or Path.home() / ".cache" / "llmwire" / "flower")


class OutOfBandClient:
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
        if meta is None or meta.get("kind") != "link":
            raise FlowerLinkError("this message carries no llmwire link (is the server's "
                                  "strategy an OutOfBandFedAvg?)")
        if meta.get("tls") and ssl is None:
            raise FlowerLinkError("the llmwire server uses TLS: pass ssl= (a client context)")
        self.msg, self.meta, self.state = msg, meta, state
        self.node = int(context.node_id)
        if meta.get("node") not in (None, self.node):
            raise FlowerLinkError(f"this message is for node {meta.get('node')}, this is node "
                                  f"{self.node}")
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = GlobalCache(directory, str(meta["run"]), self.node)
        self.timeout, self.ssl = timeout, ssl
        self._base: Any = None
        self.reference: Reference | None = None
        self.pulled: str = ""
        self.pushed: Any = None
        self._loop = LoopThread("llmwire-flower-client")
        self._transport: Any = None

    def __enter__(self) -> "OutOfBandClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def pull(self) -> Reference:
        """Connect and receive the round's global into ``state``, in place."""
        have = self.cache.load_into(self.state)
        started = time.perf_counter()
        self.reference = self._loop.call(self._pull(have))
        if self.pulled != "current":
            self.cache.store(self.state, self.reference)
        # held open until push(): the update is computed against this very file
        base = self.cache.open()
        if self.cache._reference_of(base) != self.reference:
            base.close()
            raise FlowerLinkError("the cached global changed under this client (another "
                                  "process of this node and run?)")
        self._base = base
        self.pull_seconds = time.perf_counter() - started
        return self.reference

    async def _pull(self, have: Reference | None) -> Reference:
        meta = self.meta
        try:
            self._transport = await connect(str(meta["host"]), int(meta["port"]),
                                            secret=bytes.fromhex(str(meta["secret"])),
                                            ssl=self.ssl, timeout=self.timeout)
        except (OSError, LlmwireError, asyncio.TimeoutError) as exc:
            raise FlowerLinkError(f"cannot reach the llmwire server at {meta['host']}:"
                                  f"{meta['port']}: {exc}") from exc
        t = self._transport
        wait = float(meta.get("gather_timeout", 30.0)) + 120.0
        try:
            await t.send_message({"kind": _HELLO, "node": self.node, "round": meta["round"],
                                  "purpose": meta["purpose"], "token": meta.get("token"),
                                  "have": have.to_wire() if have is not None else None})
            stream = await asyncio.wait_for(t.accept_stream(), wait)
            return await self._receive(stream, have)
        except asyncio.TimeoutError:
            raise FlowerLinkError(f"node {self.node}: no downlink from the server in "
                                  f"{wait:g} s") from None
        except FlowerLinkError:
            raise
        except LlmwireError as exc:
            raise FlowerLinkError(f"node {self.node}: the downlink failed: {exc}") from exc

    async def _receive(self, stream: Any, have: Reference | None) -> Reference:
        t = self._transport
        header = stream.header if isinstance(stream.header, dict) else {}
        if header.get("kind") == _REFUSED:
            await stream.read_all(64 * 1024)
            raise FlowerLinkError(f"the llmwire server refused node {self.node}: "
                                  f"{header.get('reason')}")
        if header.get("kind") == _CURRENT:
            await stream.read_all(64 * 1024)
            self.pulled = "current"
            assert have is not None
            return have
        self.cache.remove()  # the state now changes: the old copy no longer describes it
        ref = await receive_update(stream, self.state, have, transport=t)
        self.pulled = "update" if header.get("llmwire-flower") == "update" else "whole"
        return ref

    def push(self, weight: float) -> Any:
        """Send ``state - global`` (FedAvg weight ``weight``, e.g. the number
        of examples); returns once the server folded it into its sums."""
        if self.reference is None or self._transport is None or self._base is None:
            raise FlowerLinkError("pull() first (and push() once)")
        base, self._base = self._base, None
        try:
            self.pushed = self._loop.call(send_update(
                self._transport, self.state, base, self.reference, str(self.meta["up"]),
                client=str(self.node), weight=weight))
        finally:
            base.close()
        return self.pushed

    def reply(self, metrics: Mapping[str, Any], metrics_key: str = "metrics") -> Message:
        """The Flower reply: ``metrics`` (with the FedAvg weight key) and what moved."""
        link = {"layout": LAYOUT, "kind": "receipt", "round": self.meta["round"],
                "pulled": self.pulled,
                "reference": str(self.reference) if self.reference else ""}
        if self.pushed is not None:
            link["up_bytes"] = int(self.pushed.wire_bytes)
        return Message(RecordDict({metrics_key: MetricRecord(dict(metrics)),
                                   META: ConfigRecord(link)}), reply_to=self.msg)

    def close(self) -> None:
        base, self._base = self._base, None
        if base is not None:
            base.close()
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                self._loop.call(transport.close(), timeout=10)
        self._loop.close()

