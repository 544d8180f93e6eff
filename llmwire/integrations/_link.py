"""Model bytes beside an engine's messages: the llmwire side of out-of-band rounds.

An engine (Flower, NVFlare) schedules the round and carries, per client,
only a *link*: a small dict with the llmwire server's address, a per-run
secret, the round, and a token that names the client (an HMAC of run,
round, purpose and client under the secret; only that client's message
holds it). :class:`LinkServer` runs an llmwire server on a loop thread of
its own, in the engine's server process; each client, with
:class:`LinkClient`, connects, pulls the global and pushes its update
(``local - global``) into the round's streaming aggregator
(llmwire.rounds). The engine never sees a model byte.

The downlink of a round, per client, by what it says it holds (its cached
copy: llmwire.integrations.cache):

- the current global: nothing but a one-line message;
- the previous global: the last mean update, in ``down`` (nf4 by default),
  encoded once for every such client (``broadcast_planned``);
- anything else (a new client, one that missed rounds): whole weights, raw.

The server waits for the round's clients to connect (``gather_timeout``
after the round's links went out), sends each group once, then reads the
uploads as they come; a client that connects later gets its downlink alone.
The aggregate is the mean of exactly the uploads that verified (the round
primitives' rule: a failed or missing client is never half-added).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Self

from ..errors import LlmwireError, PayloadError, TargetMismatch
from ..rounds import Aggregator, Reference, broadcast_planned, broadcast_update
from ..rounds import broadcast_state, receive_update, send_update
from ..rounds.exchange import Diverged
from ..rounds.update import plan_increment
from ..transport import connect, serve
from ._encoding import LAYOUT, tied_names
from ._loop import LoopThread
from .cache import GlobalCache

__all__ = ["LinkServer", "LinkClient", "LinkError"]

_HELLO = "llmwire-link-hello"
_CURRENT = "llmwire-link-current"
_REFUSED = "llmwire-link-refused"


class LinkError(LlmwireError):
    """The llmwire side of an out-of-band round failed: the server refused
    this client (not in the round, a stale round, not its token), or the
    pull or push failed."""



@dataclass(eq=False)
class _Session:
    node: int | str
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
    expected: set[int | str]
    sessions: dict[int | str, _Session] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one downlink at a time
    sent: bool = False  # the gathered downlink went out (later clients go alone)
    opened: bool = False  # train: the aggregator takes this round's uploads
    over: bool = False  # the engine closed the round


class LinkServer:
    """The llmwire server of out-of-band rounds, on a loop thread.

    ``global_state``: the server's model (a state dict), updated in place
    after every train round. ``down``: the format of the mean update sent to
    clients that hold the previous global (whole weights always go raw);
    ``up``: the clients' updates. ``host``/``port``: where it listens (port
    0: any free one), ``advertise``: the address clients are told (default
    ``host``). ``secret``: the connection secret (default: 32 random bytes);
    it travels in the engine's messages, so protect the engine's channel
    (TLS) as you would the model, or pass ``ssl`` for llmwire's.
    ``gather_timeout``: how long a downlink waits for all of a round's
    clients before it goes to those that came; ``upload_timeout``: how long
    :meth:`finish` waits for the uploads of clients that replied.

    The engine's side, synchronous: :meth:`open`, then per round
    :meth:`expect` (the clients), :meth:`link` (what each client's message
    carries), and :meth:`finish` (train) or :meth:`finish_pulls`
    (evaluate) once the engine has the replies; :meth:`close`.
    """

    def __init__(self, global_state: Mapping[str, Any], *, down: str = "nf4",
                 up: str = "nf4", host: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, secret: bytes | None = None,
                 ssl: Any = None, gather_timeout: float = 30.0,
                 upload_timeout: float = 600.0, sums: str = "float32", concurrency: int = 2,
                 settings: Any = None, name: str = "llmwire-link-server") -> None:
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
        self.sums, self.concurrency, self.name = sums, concurrency, name
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

    # -- the engine's side (synchronous) ------------------------------------------

    def open(self) -> None:
        """Start the server (once)."""
        if self._loop is not None:
            return
        self._loop = LoopThread(self.name)
        self.reference = Reference.of(self.global_state, 0)
        self._aggregator = Aggregator(self.global_state, self.reference, dtype=self.sums,
                                      concurrency=self.concurrency)

        async def open_server() -> Any:
            return await serve(self._handle, self.host, self.port, secret=self.secret,
                               ssl=self.ssl, settings=self.settings)

        try:
            self._server = self._loop.call(open_server())
        except BaseException:
            self._loop.close()
            self._loop = None
            raise
        self.port = self._server.port

    def close(self) -> None:
        """Stop the server and its thread."""
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

    def __enter__(self) -> "LinkServer":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop is None:
            coro.close()
            raise LlmwireError("the llmwire link server is not running: open() it first")
        return self._loop.call(coro, timeout)

    def expect(self, server_round: int, purpose: str, nodes: Iterable[int | str]) -> None:
        """Open ``purpose`` (``"train"`` or ``"evaluate"``) round
        ``server_round`` for ``nodes``: their downlink goes once all of them
        connected, or ``gather_timeout`` from now."""
        if purpose not in ("train", "evaluate"):
            raise ValueError(f"purpose is 'train' or 'evaluate', not {purpose!r}")
        self.call(self._expect(server_round, purpose, set(nodes)))

    def link(self, server_round: int, purpose: str, node: int | str) -> dict[str, Any]:
        """What ``node``'s message of that round carries (its token alone)."""
        return {"layout": LAYOUT, "kind": "link", "host": self.advertise, "port": self.port,
                "secret": self.secret.hex(), "round": server_round, "purpose": purpose,
                "up": self.up, "run": self.run_id, "tls": self.ssl is not None, "node": node,
                "token": self._token(server_round, purpose, node),
                "gather_timeout": self.gather_timeout}

    def finish(self, server_round: int, replied: Iterable[int | str]) -> dict[str, Any]:
        """Close a train round: wait for the uploads of ``replied`` (the
        clients the engine heard back from), give up on the others, apply
        the mean of those that verified to the global; the round's record
        (also appended to :attr:`history`): ``clients`` (as strings) that
        count, ``failed`` (client, reason), ``downlink`` modes, bytes."""
        record = self.call(self._finish(server_round, set(replied)))
        self.history.append(record)
        return record

    def finish_pulls(self, server_round: int) -> dict[str, Any] | None:
        """Close an evaluate round (pulls only); its record, or None."""
        record = self.call(self._finish_pulls(server_round))
        if record is not None:
            self.history.append(record)
        return record

    def _token(self, server_round: int, purpose: str, node: int | str) -> str:
        """What proves a connection speaks for ``node`` (only its message holds it)."""
        text = f"{self.run_id}/{server_round}/{purpose}/{node!r}".encode()
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()

    # -- on the loop thread -------------------------------------------------------

    async def _expect(self, server_round: int, purpose: str, nodes: set[int | str]) -> None:
        gather = _Gather(server_round, purpose, nodes)
        self._gathers[(server_round, purpose)] = gather
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
        valid = (hello.get("kind") == _HELLO and type(node) in (int, str) and type(round_) is int
                 and purpose in ("train", "evaluate"))
        gather = self._gathers.get((round_, purpose)) if valid else None
        token = hello.get("token")
        if gather is None or gather.over or node not in gather.expected \
                or node in gather.sessions or not isinstance(token, str) \
                or not hmac.compare_digest(token, self._token(round_, purpose, node)):
            reason = ("not a link hello" if not valid else
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
                        s.downlinked.set_exception(LinkError(
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
                                                         "llmwire-link": "update"})
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
                    s.downlinked.set_exception(LinkError(
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

    async def _finish_pulls(self, server_round: int) -> dict[str, Any] | None:
        gather = self._gathers.pop((server_round, "evaluate"), None)
        if gather is None:
            return None
        sessions = await self._end(gather, set(gather.sessions), self.upload_timeout)
        failed = [(s.node, str(s.done.exception())) for s in sessions
                  if s.done.done() and s.done.exception() is not None]
        failed += [(node, "never connected") for node in sorted(gather.expected
                                                                - set(gather.sessions))]
        return self._record(server_round, "evaluate", sessions, failed, [], 0)

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
                s.downlinked.set_exception(LinkError(
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

class LinkClient:
    """A client's end of one round's link (a :meth:`LinkServer.link` dict).

    ``node``: this client, as the engine names it (checked against the
    link); ``state``: the model's own state dict (training changes it in
    place); ``cache``: where this client keeps the last global it received
    (a :class:`~llmwire.integrations.cache.GlobalCache` directory).
    :meth:`pull` fills ``state`` with the round's global (the cached copy
    plus the server's update, or whole), :meth:`push` sends ``state -
    global``, :meth:`receipt` says what moved. The connection stays open
    between them (a loop thread answers the server's pings while the app
    trains). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, link: Mapping[str, Any], node: int | str, state: Mapping[str, Any], *,
                 cache_dir: Any, timeout: float = 60.0, ssl: Any = None) -> None:
        if not isinstance(link, Mapping) or link.get("kind") != "link":
            raise LinkError("this message carries no llmwire link (is the server's "
                            "controller an out-of-band one?)")
        if link.get("tls") and ssl is None:
            raise LinkError("the llmwire server uses TLS: pass ssl= (a client context)")
        if link.get("node") not in (None, node):
            raise LinkError(f"this message is for node {link.get('node')!r}, this is node "
                            f"{node!r}")
        self.link, self.node, self.state = link, node, state
        self.cache = GlobalCache(cache_dir, str(link["run"]), node)
        self.timeout, self.ssl = timeout, ssl
        self._base: Any = None
        self.reference: Reference | None = None
        self.pulled: str = ""
        self.pushed: Any = None
        self.pull_seconds = 0.0
        self._loop = LoopThread("llmwire-link-client")
        self._transport: Any = None

    def __enter__(self) -> Self:
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
        if self.cache.reference_of(base) != self.reference:
            base.close()
            raise LinkError("the cached global changed under this client (another "
                            "process of this node and run?)")
        self._base = base
        self.pull_seconds = time.perf_counter() - started
        return self.reference

    async def _pull(self, have: Reference | None) -> Reference:
        link = self.link
        try:
            self._transport = await connect(str(link["host"]), int(link["port"]),
                                            secret=bytes.fromhex(str(link["secret"])),
                                            ssl=self.ssl, timeout=self.timeout)
        except (OSError, LlmwireError, asyncio.TimeoutError) as exc:
            raise LinkError(f"cannot reach the llmwire server at {link['host']}:"
                            f"{link['port']}: {exc}") from exc
        t = self._transport
        wait = float(link.get("gather_timeout", 30.0)) + 120.0
        try:
            await t.send_message({"kind": _HELLO, "node": self.node, "round": link["round"],
                                  "purpose": link["purpose"], "token": link.get("token"),
                                  "have": have.to_wire() if have is not None else None})
            stream = await asyncio.wait_for(t.accept_stream(), wait)
            return await self._receive(stream, have)
        except asyncio.TimeoutError:
            raise LinkError(f"node {self.node}: no downlink from the server in "
                            f"{wait:g} s") from None
        except LinkError:
            raise
        except LlmwireError as exc:
            raise LinkError(f"node {self.node}: the downlink failed: {exc}") from exc

    async def _receive(self, stream: Any, have: Reference | None) -> Reference:
        t = self._transport
        header = stream.header if isinstance(stream.header, dict) else {}
        if header.get("kind") == _REFUSED:
            await stream.read_all(64 * 1024)
            raise LinkError(f"the llmwire server refused node {self.node}: "
                            f"{header.get('reason')}")
        if header.get("kind") == _CURRENT:
            await stream.read_all(64 * 1024)
            self.pulled = "current"
            assert have is not None
            return have
        self.cache.remove()  # the state now changes: the old copy no longer describes it
        ref = await receive_update(stream, self.state, have, transport=t)
        self.pulled = "update" if header.get("llmwire-link") == "update" else "whole"
        return ref

    def push(self, weight: float) -> Any:
        """Send ``state - global`` (FedAvg weight ``weight``, e.g. the number
        of examples); returns once the server folded it into its sums."""
        if self.reference is None or self._transport is None or self._base is None:
            raise LinkError("pull() first (and push() once)")
        base, self._base = self._base, None
        try:
            self.pushed = self._loop.call(send_update(
                self._transport, self.state, base, self.reference, str(self.link["up"]),
                client=str(self.node), weight=weight))
        finally:
            base.close()
        return self.pushed

    def receipt(self) -> dict[str, Any]:
        """What moved, for the client's reply to its engine."""
        out: dict[str, Any] = {"layout": LAYOUT, "kind": "receipt",
                               "round": self.link["round"], "pulled": self.pulled,
                               "reference": str(self.reference) if self.reference else ""}
        if self.pushed is not None:
            out["up_bytes"] = int(self.pushed.wire_bytes)
        return out

    def close(self) -> None:
        base, self._base = self._base, None
        if base is not None:
            base.close()
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(Exception):
                self._loop.call(transport.close(), timeout=10)
        self._loop.close()
