"""Helpers for transport tests: open a connected pair over any transport kind,
and a misbehaving peer driven by hand over a raw socket."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from typing import Any

from llmwire.protocol import Connection, ConnectionState, Role, Settings
from llmwire.transport import connect, connect_unix, memory_pair, serve, serve_unix

SECRET = b"contract-secret"
KINDS = ["memory", "tcp", "unix", "tls"]


def tls_contexts(tmp: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    if not os.path.exists(cert):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=cert)
    return client, server


class PairHandle:
    def __init__(self, client: Any, server: Any, srv: Any) -> None:
        self.client, self.server, self.srv = client, server, srv

    async def close(self) -> None:
        await self.client.close()
        await self.server.close()
        if self.srv is not None:
            await self.srv.close()


async def open_pair(kind: str, tmp: str, settings: Settings | None = None) -> PairHandle:
    if kind == "memory":
        c, s = await memory_pair(SECRET, settings=settings)
        return PairHandle(c, s, None)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[Any] = loop.create_future()

    async def handler(t: Any) -> None:
        got.set_result(t)
        await t.wait_closed()

    if kind == "unix":
        path = os.path.join(tmp, "llmwire.sock")
        srv = await serve_unix(handler, path, secret=SECRET, settings=settings)
        c = await connect_unix(path, secret=SECRET, settings=settings, timeout=10)
    elif kind == "tls":
        cctx, sctx = tls_contexts(tmp)
        srv = await serve(handler, "127.0.0.1", 0, secret=SECRET, settings=settings, ssl=sctx)
        c = await connect("127.0.0.1", srv.port, secret=SECRET, settings=settings, ssl=cctx,
                          server_hostname="localhost", timeout=10)
    else:
        srv = await serve(handler, "127.0.0.1", 0, secret=SECRET, settings=settings)
        c = await connect("127.0.0.1", srv.port, secret=SECRET, settings=settings, timeout=10)
    s = await asyncio.wait_for(got, 10)
    return PairHandle(c, s, srv)


async def open_pairs(kind: str, n: int, tmp: str) -> tuple[list[PairHandle], list[Any],
                                                          list[Any]]:
    """``n`` pairs: (handles, their server ends, their client ends)."""
    handles = [await open_pair(kind, str(tmp)) for _ in range(n)]
    return handles, [h.server for h in handles], [h.client for h in handles]


async def close_pairs(handles: list[PairHandle]) -> None:
    for h in handles:
        await h.close()


class EvilPeer:
    """A client that does the handshake by the book, then sends what it likes."""

    def __init__(self, secret: bytes = SECRET, settings: Settings | None = None) -> None:
        self.conn = Connection(Role.CLIENT, secret, settings=settings)
        self.error: BaseException | None = None

    async def connect(self, port: int, handshake: bool = True) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if handshake:
            self._flush()
            while self.conn.state is not ConnectionState.OPEN:
                data = await asyncio.wait_for(self.reader.read(65536), 5)
                assert data, "server closed during handshake"
                self.conn.receive_data(data)
                self._flush()

    def _flush(self) -> None:
        for b in self.conn.data_to_send():
            self.writer.write(bytes(b))

    def write(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def read_until_closed(self) -> BaseException | None:
        """Feed what the server says until it closes; return what that raised."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), 5)
                if not data:
                    self.conn.receive_eof()
                    return None
                self.conn.receive_data(data)
                self._flush()
        except Exception as exc:  # the error the server's frames caused here
            return exc
        finally:
            self.writer.close()
