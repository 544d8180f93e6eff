"""An in-memory pair of connected transports, for tests (no sockets at all)."""

from __future__ import annotations

import asyncio
from typing import Any

from ..protocol import Role, Settings
from .connection import WireTransport

__all__ = ["memory_pair"]


class _MemoryTransport(asyncio.Transport):
    """One end of an in-memory byte pipe. Bytes are copied on write and
    delivered on a later loop iteration, in order."""

    _llmwire_memory = True

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: WireTransport) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._peer: _MemoryTransport | None = None
        self._closing = False
        self._eof_sent = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": "memory"}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        if self._closing or self._peer is None:
            return
        self._loop.call_soon(self._peer._deliver, bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._eof_sent and self._peer is not None:
            self._eof_sent = True
            self._loop.call_soon(self._peer._eof)

    def close(self) -> None:
        if self._closing:
            return
        self.write_eof()
        self._closing = True
        self._loop.call_soon(self._protocol.connection_lost, None)
        if self._peer is not None:
            self._loop.call_soon(self._peer._peer_closed)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closing

    def _deliver(self, data: bytes) -> None:
        if self._closing:
            return
        mv = memoryview(data)
        while len(mv) and not self._closing:
            buf = self._protocol.get_buffer(len(mv))
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            self._protocol.buffer_updated(n)
            mv = mv[n:]

    def _eof(self) -> None:
        if not self._closing:
            self._protocol.eof_received()
            self.close()

    def _peer_closed(self) -> None:
        if not self._closing:
            self.close()


async def memory_pair(secret: bytes | str = b"llmwire-memory-pair", *,
                      settings: Settings | None = None,
                      server_settings: Settings | None = None,
                      server_secret: bytes | str | None = None,
                      ) -> tuple[WireTransport, WireTransport]:
    """Return ``(client, server)``: two authenticated transports joined in memory.

    ``server_settings`` / ``server_secret`` default to ``settings`` / ``secret``
    (give a different secret to test authentication failures).
    """
    loop = asyncio.get_running_loop()
    client = WireTransport(Role.CLIENT, secret, settings, loop)
    server = WireTransport(Role.SERVER, secret if server_secret is None else server_secret,
                           server_settings or settings, loop)
    ct, st = _MemoryTransport(loop, client), _MemoryTransport(loop, server)
    ct._peer, st._peer = st, ct
    client.connection_made(ct)
    server.connection_made(st)
    results = await asyncio.gather(client.wait_handshake(), server.wait_handshake(),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            await client.close()
            await server.close()
            raise r
    return client, server
