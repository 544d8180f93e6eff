"""TCP, TLS and Unix-socket endpoints: :func:`connect`, :func:`serve` and friends.

Thin: they make asyncio connections whose protocol is a
:class:`~llmwire.transport.connection.WireTransport`, and wait for the
handshake. uvloop is used by :func:`run` when it is installed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as _ssl
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from ..errors import ConnectionClosed, LlmwireError
from ..protocol import Role, Settings
from .connection import WireTransport

__all__ = ["connect", "serve", "connect_unix", "serve_unix", "Server", "run",
           "new_event_loop", "Handler"]

log = logging.getLogger("llmwire.transport")
T = TypeVar("T")
Handler = Callable[[WireTransport], Awaitable[Any]]

#: How many handshake failures a :class:`Server` keeps (the most recent ones).
HANDSHAKE_FAILURES_KEPT = 32
#: The kind :attr:`Server.handshake_failures_by_kind` counts evicted connections under.
EVICTED = "evicted"


def _default_pending() -> int:
    """256 connections in their handshake at once (about 20 KiB each before
    authentication), fewer where the process may open few files: a quarter of
    the soft ``RLIMIT_NOFILE``, so the cap evicts idle peers before the
    server runs out of descriptors."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(8, min(256, soft // 4))


#: The default ``max_pending_handshakes`` (see :func:`_default_pending`).
DEFAULT_PENDING = _default_pending()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is importable, else a plain asyncio one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Like :func:`asyncio.run`, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


async def _handshake(transport: WireTransport, timeout: float | None) -> WireTransport:
    try:
        await asyncio.wait_for(asyncio.shield(transport.wait_handshake()), timeout)
    except BaseException:
        if transport._transport is not None:
            transport._transport.close()
        raise
    return transport


async def connect(host: str, port: int, *, secret: bytes | str,
                  settings: Settings | None = None, ssl: _ssl.SSLContext | None = None,
                  server_hostname: str | None = None,
                  timeout: float | None = 30.0) -> WireTransport:
    """Connect over TCP (TLS when ``ssl`` is given) and authenticate.

    Raises the handshake's error: AuthenticationError, VersionMismatch,
    BadPreface, PeerTimeout, ConnectionClosed, or OSError from the socket.
    """
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(
        lambda: WireTransport(Role.CLIENT, secret, settings, loop), host, port, ssl=ssl,
        server_hostname=server_hostname if ssl is not None else None), timeout)
    return await _handshake(proto, timeout)


async def connect_unix(path: str, *, secret: bytes | str, settings: Settings | None = None,
                       ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None,
                       timeout: float | None = 30.0) -> WireTransport:
    """Connect over a Unix domain socket and authenticate."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_unix_connection(
        lambda: WireTransport(Role.CLIENT, secret, settings, loop), path, ssl=ssl,
        server_hostname=server_hostname if ssl is not None else None), timeout)
    return await _handshake(proto, timeout)


def _detached(exc: BaseException) -> BaseException:
    """``exc`` (changed in place) without what would keep its dead connection alive.

    A traceback holds the frames that raised it, and they hold the connection
    with its receive buffers (a few hundred KiB); ``__cause__``,
    ``__context__`` and ``ConnectionClosed.cause`` can hold more tracebacks.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current.__cause__ = None
        current.__context__ = None
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else None
    return exc


class _ServerConnection(WireTransport):
    """The server's side of one connection; the server may evict it before its handshake.

    Eviction can come before asyncio calls ``connection_made`` (connections
    accepted in one burst, or still in their TLS handshake); the socket is
    then closed as soon as it is handed over.
    """

    _evicted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._evicted:
            transport.close()
            return
        super().connection_made(transport)


class Server:
    """A listening llmwire server; each authenticated connection runs ``handler``.

    A connection that fails its handshake is closed and logged; it never
    reaches the handler and does not disturb other connections. When the
    handler returns, its connection is closed.

    What unauthenticated peers can make the server hold is bounded:

    - at most ``max_pending_handshakes`` connections wait for their handshake
      at once (None: no cap). A new connection beyond the cap evicts the
      connection that has waited longest, so idle or slow connections cannot
      lock out a real peer (whose handshake takes milliseconds). Authenticated
      connections do not count.
    - of failed handshakes the server keeps counts and the last
      :data:`HANDSHAKE_FAILURES_KEPT` errors, without their tracebacks.
    - rejected connections are logged one line each (logger
      ``llmwire.transport``, INFO), at most :attr:`rejected_log_burst` lines per
      :attr:`rejected_log_interval` seconds; the rest are summed up in one line
      when the interval ends or the server closes.

    Attributes:
        handshake_failures: the most recent failures, oldest first (a
            ``collections.deque`` with ``maxlen``), each an exception without
            traceback, ``__cause__`` or ``__context__``.
        handshake_failure_count: failed handshakes since the server started.
        handshake_failures_by_kind: those failures counted by the error's class
            name, and evicted connections under :data:`EVICTED`.
    """

    #: Rejected connections logged one line each per interval.
    rejected_log_burst: int = 5
    #: The interval, in seconds, for :attr:`rejected_log_burst`.
    rejected_log_interval: float = 10.0

    def __init__(self, handler: Handler, secret: bytes | str, settings: Settings | None,
                 handshake_timeout: float | None, *,
                 max_pending_handshakes: int | None = DEFAULT_PENDING) -> None:
        if max_pending_handshakes is not None and max_pending_handshakes < 1:
            raise ValueError(f"max_pending_handshakes must be at least 1 or None, "
                             f"not {max_pending_handshakes!r}")
        self._handler = handler
        self._secret = secret
        self._settings = settings
        self._timeout = handshake_timeout
        self._max_pending = max_pending_handshakes
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[WireTransport] = set()
        # Connections still in their handshake, oldest first (dicts keep order).
        self._pending: dict[_ServerConnection, None] = {}
        self.handshake_failures: collections.deque[BaseException] = \
            collections.deque(maxlen=HANDSHAKE_FAILURES_KEPT)
        self.handshake_failure_count = 0
        self.handshake_failures_by_kind: dict[str, int] = {}
        # The current log interval: when it began (loop time), lines logged
        # in it, rejections not logged (by kind), the timer that ends it.
        self._log_began: float | None = None
        self._log_lines = 0
        self._log_quiet: collections.Counter[str] = collections.Counter()
        self._log_timer: asyncio.TimerHandle | None = None

    def _protocol(self) -> WireTransport:
        loop = asyncio.get_running_loop()
        if self._max_pending is not None:
            while len(self._pending) >= self._max_pending:
                self._evict(next(iter(self._pending)))
        conn = _ServerConnection(Role.SERVER, self._secret, self._settings, loop)
        self._pending[conn] = None
        task = loop.create_task(self._serve_one(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    def _evict(self, conn: _ServerConnection) -> None:
        del self._pending[conn]
        conn._evicted = True
        # Fails its handshake at once (its _serve_one records it) and closes
        # its socket, or has connection_made close it when it comes.
        conn._fatal(ConnectionClosed(
            f"evicted before its handshake completed: {self._max_pending} connections "
            f"were waiting for theirs (max_pending_handshakes) and it had waited longest"))

    async def _serve_one(self, conn: _ServerConnection) -> None:
        self._connections.add(conn)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(conn.wait_handshake()), self._timeout)
            except (LlmwireError, OSError, asyncio.TimeoutError) as exc:
                self._failed_handshake(conn, exc)
                return
            finally:
                self._pending.pop(conn, None)
            try:
                await self._handler(conn)
            except LlmwireError as exc:
                log.info("llmwire connection with %s ended: %s", conn.peer_name, exc)
            except Exception:
                log.exception("llmwire handler failed for %s", conn.peer_name)
        finally:
            self._connections.discard(conn)
            await conn.close()

    def _failed_handshake(self, conn: _ServerConnection, exc: BaseException) -> None:
        exc = _detached(exc)
        kind = EVICTED if conn._evicted else type(exc).__name__
        self.handshake_failures.append(exc)
        self.handshake_failure_count += 1
        self.handshake_failures_by_kind[kind] = self.handshake_failures_by_kind.get(kind, 0) + 1
        if not log.isEnabledFor(logging.INFO):
            return
        if self._log_began is None:
            loop = asyncio.get_running_loop()
            self._log_began = loop.time()
            self._log_timer = loop.call_later(self.rejected_log_interval, self._end_log_interval)
        if self._log_lines < self.rejected_log_burst:
            self._log_lines += 1
            log.info("llmwire handshake with %s failed: %s", conn.peer_name, exc)
        else:
            self._log_quiet[kind] += 1

    def _end_log_interval(self) -> None:
        """Sum up the rejections of this interval that were not logged one by one."""
        if self._log_timer is not None:
            self._log_timer.cancel()
            self._log_timer = None
        if self._log_quiet and self._log_began is not None:
            seconds = asyncio.get_running_loop().time() - self._log_began
            kinds = ", ".join(f"{n} {kind}" for kind, n in self._log_quiet.most_common())
            log.info("llmwire: %d more rejected connections in the last %s s "
                     "(handshake failed: %s; not logged one by one)",
                     sum(self._log_quiet.values()), f"{seconds:.3g}", kinds)
        self._log_began = None
        self._log_lines = 0
        self._log_quiet.clear()

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets."""
        return tuple(self._server.sockets) if self._server is not None else ()

    @property
    def port(self) -> int:
        """The TCP port of the first listening socket (handy with port 0)."""
        return self.sockets[0].getsockname()[1]

    @property
    def connections(self) -> frozenset[WireTransport]:
        """Connections currently served (authenticated or still in their handshake)."""
        return frozenset(self._connections)

    @property
    def pending_handshakes(self) -> int:
        """Connections still in their handshake (at most ``max_pending_handshakes``)."""
        return len(self._pending)

    async def close(self) -> None:
        """Stop listening, close every connection and wait for the handlers."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.close("server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._end_log_interval()

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        assert self._server is not None
        await self._server.serve_forever()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def serve(handler: Handler, host: str | None, port: int, *, secret: bytes | str,
                settings: Settings | None = None, ssl: _ssl.SSLContext | None = None,
                handshake_timeout: float | None = 30.0, backlog: int = 128,
                max_pending_handshakes: int | None = DEFAULT_PENDING) -> Server:
    """Listen on TCP (TLS when ``ssl`` is given); run ``await handler(transport)``
    for each authenticated connection. Returns a started :class:`Server`.

    At most ``max_pending_handshakes`` connections wait for their handshake at
    once (None: no cap); beyond it, a new connection evicts the one that has
    waited longest (see :class:`Server`).
    """
    loop = asyncio.get_running_loop()
    server = Server(handler, secret, settings, handshake_timeout,
                    max_pending_handshakes=max_pending_handshakes)
    server._server = await loop.create_server(server._protocol, host, port, ssl=ssl,
                                              backlog=backlog)
    return server


async def serve_unix(handler: Handler, path: str, *, secret: bytes | str,
                     settings: Settings | None = None, ssl: _ssl.SSLContext | None = None,
                     handshake_timeout: float | None = 30.0, backlog: int = 128,
                     max_pending_handshakes: int | None = DEFAULT_PENDING) -> Server:
    """Like :func:`serve`, on a Unix domain socket at ``path``."""
    loop = asyncio.get_running_loop()
    server = Server(handler, secret, settings, handshake_timeout,
                    max_pending_handshakes=max_pending_handshakes)
    server._server = await loop.create_unix_server(server._protocol, path, ssl=ssl,
                                                   backlog=backlog)
    return server
