"""Transports: the :class:`Transport` interface and its asyncio implementations."""

from .base import Message, RecvStream, SendStream, Transport
from .connection import WireRecvStream, WireSendStream, WireTransport
from .memory import memory_pair
from .sockets import Server, connect, connect_unix, new_event_loop, run, serve, serve_unix

__all__ = [
    "Transport", "SendStream", "RecvStream", "Message", "WireTransport",
    "WireSendStream", "WireRecvStream", "memory_pair", "connect", "serve",
    "connect_unix", "serve_unix", "Server", "run", "new_event_loop",
]
