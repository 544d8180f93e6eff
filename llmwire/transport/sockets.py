"""TCP, TLS and Unix-socket endpoints: :func:`connect`, :func:`serve` and friends.

Thin: they make asyncio connections whose protocol is a
:class:`~llmwire.transport.connection.WireTransport`, and wait for the
handshake. uvloop is used by :func:`run` when it is installed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from ..errors import LlmwireError
from ..protocol import Role, Settings
from .connection import WireTransport

__all__ = ["connect", "serve", "connect_unix", "serve_unix", "Server", "run",
           "new_event_loop", "Handler"]

log = logging.getLogger("llmwire.transport")
T = TypeVar("T")
Handler = Callable[[WireTransport], Awaitable[Any]]


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


class Server:
    """A listening llmwire server; each authenticated connection runs ``handler``.

    A connection that fails its handshake is closed and logged; it never
    reaches the handler and does not disturb other connections. When the
    handler returns, its connection is closed.
    """

    def __init__(self, handler: Handler, secret: bytes | str, settings: Settings | None,
                 handshake_timeout: float | None) -> None:
        self._handler = handler
        self._secret = secret
        self._settings = settings
        self._timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[WireTransport] = set()
        self.handshake_failures: list[BaseException] = []

    def _protocol(self) -> WireTransport:
        loop = asyncio.get_running_loop()
        conn = WireTransport(Role.SERVER, self._secret, self._settings, loop)
        task = loop.create_task(self._serve_one(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _serve_one(self, conn: WireTransport) -> None:
        self._connections.add(conn)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(conn.wait_handshake()), self._timeout)
            except (LlmwireError, OSError, asyncio.TimeoutError) as exc:
                self.handshake_failures.append(exc)
                log.info("llmwire handshake with %s failed: %s", conn.peer_name, exc)
                return
            try:
                await self._handler(conn)
            except LlmwireError as exc:
                log.info("llmwire connection with %s ended: %s", conn.peer_name, exc)
            except Exception:
                log.exception("llmwire handler failed for %s", conn.peer_name)
        finally:
            self._connections.discard(conn)
            await conn.close()

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
        """Connections currently served."""
        return frozenset(self._connections)

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
                handshake_timeout: float | None = 30.0, backlog: int = 128) -> Server:
    """Listen on TCP (TLS when ``ssl`` is given); run ``await handler(transport)``
    for each authenticated connection. Returns a started :class:`Server`."""
    loop = asyncio.get_running_loop()
    server = Server(handler, secret, settings, handshake_timeout)
    server._server = await loop.create_server(server._protocol, host, port, ssl=ssl,
                                              backlog=backlog)
    return server


async def serve_unix(handler: Handler, path: str, *, secret: bytes | str,
                     settings: Settings | None = None, ssl: _ssl.SSLContext | None = None,
                     handshake_timeout: float | None = 30.0, backlog: int = 128) -> Server:
    """Like :func:`serve`, on a Unix domain socket at ``path``."""
    loop = asyncio.get_running_loop()
    server = Server(handler, secret, settings, handshake_timeout)
    server._server = await loop.create_unix_server(server._protocol, path, ssl=ssl,
                                                   backlog=backlog)
    return server
