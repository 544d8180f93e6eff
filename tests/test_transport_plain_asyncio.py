"""The same transports on the plain asyncio event loop (no uvloop)."""

from __future__ import annotations

import asyncio
import os

import pytest

from llmwire import connect, connect_unix, serve, serve_unix
from transport_helpers import SECRET


async def _exchange(kind: str, tmp: str) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)

    async def handler(t):
        async for rs in t:
            data = await rs.read_all()
            await t.send_message({"n": len(data)}, data[::-1])

    if kind == "tcp":
        srv = await serve(handler, "127.0.0.1", 0, secret=SECRET)
        c = await connect("127.0.0.1", srv.port, secret=SECRET, timeout=5)
    else:
        path = os.path.join(tmp, "plain.sock")
        srv = await serve_unix(handler, path, secret=SECRET)
        c = await connect_unix(path, secret=SECRET, timeout=5)
    try:
        for _ in range(2):
            await c.send_message({"k": 1}, body)
            m = await c.receive_message()
            assert m.header == {"n": len(body)} and m.payload == body[::-1]
    finally:
        await c.close()
        await srv.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_plain_asyncio_loop(kind, tmp_path):
    loop = asyncio.new_event_loop()
    try:
        assert not type(loop).__module__.startswith("uvloop")
        loop.run_until_complete(asyncio.wait_for(_exchange(kind, str(tmp_path)), 20))
    finally:
        loop.close()
