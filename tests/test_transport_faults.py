"""Faults over real loopback sockets: each error is raised where it should be,
and the other connections (and streams) are unharmed."""

from __future__ import annotations

import asyncio
import struct

import pytest

from conftest import arun
from llmwire import (
    AuthenticationError,
    BadPreface,
    ConnectionClosed,
    ConnectionLost,
    FlowControlError,
    FrameTooLarge,
    HandshakeError,
    MalformedFrame,
    PeerError,
    PeerTimeout,
    Settings,
    UnknownFrameType,
    VersionMismatch,
    connect,
    serve,
)
from llmwire import frames as f
from llmwire.frames import ErrorCode, FrameType
from transport_helpers import SECRET, EvilPeer

SMALL = Settings(max_frame_payload=16 * 1024, stream_window=64 * 1024,
                 connection_window=128 * 1024)


class Recorder:
    """A server handler that echoes messages and records how each connection ended."""

    def __init__(self) -> None:
        self.ended: list[BaseException | None] = []
        self.stream_errors: list[BaseException] = []

    async def __call__(self, t) -> None:
        try:
            async for rs in t:
                try:
                    body = await rs.read_all()
                except ConnectionClosed:
                    raise
                except Exception as exc:
                    self.stream_errors.append(exc)
                    continue
                await t.send_message({"echo": rs.header}, body)
        except ConnectionClosed:
            pass
        await t.wait_closed()
        self.ended.append(t.error)


@pytest.fixture
def against_server():
    """The scaffold of these tests: ``against_server(body, settings=None,
    timeout=15, handler=None)`` starts a server on a free loopback port whose
    handler is ``handler`` or an echoing :class:`Recorder`, runs ``await
    body(srv, handler)``, and always closes it."""
    def run(body, settings: Settings | None = None, timeout: float = 15.0, handler=None):
        async def main():
            rec = Recorder() if handler is None else handler
            srv = await serve(rec, "127.0.0.1", 0, secret=SECRET, settings=settings)
            try:
                return await body(srv, rec)
            finally:
                await srv.close()
        return arun(main(), timeout)
    return run


async def good_client_works(port: int, settings: Settings | None = None) -> None:
    c = await connect("127.0.0.1", port, secret=SECRET, settings=settings, timeout=5)
    await c.send_message({"probe": 1}, b"ping")
    m = await asyncio.wait_for(c.receive_message(), 5)
    assert m.header == {"echo": {"probe": 1}} and m.payload == b"ping"
    await c.close()


async def wait_ended(rec: Recorder, n: int = 1) -> None:
    for _ in range(500):
        if len(rec.ended) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("server connection did not end")


async def first_handshake_failure(srv) -> None:
    """Wait (bounded, 1 s) until the server has logged a failed handshake."""
    for _ in range(100):
        if srv.handshake_failures:
            return
        await asyncio.sleep(0.01)


def test_wrong_secret_both_sides_and_others_unharmed(against_server):
    async def body(srv, rec):
        with pytest.raises(AuthenticationError):
            await connect("127.0.0.1", srv.port, secret=b"wrong", timeout=5)
        await good_client_works(srv.port)
        await first_handshake_failure(srv)
        assert isinstance(srv.handshake_failures[0], AuthenticationError)
    against_server(body)


def test_version_mismatch_both_sides(against_server):
    async def body(srv, rec):
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(f.encode_preface(7, 9))
        reply = await asyncio.wait_for(r.read(100), 5)
        assert reply[:8] == f.MAGIC  # the server said which versions it speaks
        assert f.parse_preface(reply[:12]) == (2, 2)
        assert await asyncio.wait_for(r.read(100), 5) == b""  # then closed
        w.close()
        # And an llmwire client meeting a newer-only server says so.
        async def fake_server(reader, writer):
            writer.write(f.encode_preface(7, 9))
            await reader.read(100)
            writer.close()
        fake = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        with pytest.raises(VersionMismatch):
            await connect("127.0.0.1", port, secret=SECRET, timeout=5)
        fake.close()
        await first_handshake_failure(srv)
        assert isinstance(srv.handshake_failures[0], VersionMismatch)
        await good_client_works(srv.port)
    against_server(body)


def test_garbage_before_handshake(against_server):
    async def body(srv, rec):
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(r.read(), 5)  # the server hangs up
        assert data.startswith(f.MAGIC) and len(data) == f.PREFACE_SIZE
        w.close()
        await first_handshake_failure(srv)
        assert isinstance(srv.handshake_failures[0], BadPreface)
        # An llmwire client that meets a non-llmwire server:
        async def http_server(reader, writer):
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await writer.drain()
            writer.close()
        fake = await asyncio.start_server(http_server, "127.0.0.1", 0)
        with pytest.raises(BadPreface):
            await connect("127.0.0.1", fake.sockets[0].getsockname()[1], secret=SECRET,
                          timeout=5)
        fake.close()
        await good_client_works(srv.port)
    against_server(body)


@pytest.mark.parametrize("evil,server_error,code", [
    (lambda sid: struct.pack("!BBHIIQ", FrameType.DATA, 0, 0, sid, 2**32 - 1, 0),
     FrameTooLarge, ErrorCode.FRAME_SIZE_ERROR),
    (lambda sid: struct.pack("!BBHIIQ", 0x42, 0, 0, 0, 0, 0),
     UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE),
    (lambda sid: f.encode_frame(FrameType.DATA, 0, sid, b"z" * 16 * 1024) * 5,
     FlowControlError, ErrorCode.FLOW_CONTROL_ERROR),
    (lambda sid: f.encode_frame(FrameType.DATA, 0, 99, b"never opened"),
     MalformedFrame, ErrorCode.PROTOCOL_ERROR),
    (lambda sid: f.encode_frame(FrameType.HELLO, 0, 0, b"again"),
     MalformedFrame, ErrorCode.PROTOCOL_ERROR),
], ids=["oversized", "unknown-type", "credit-overrun", "idle-stream", "hello-again"])
def test_misbehaving_peer(evil, server_error, code, against_server):
    async def body(srv, rec):
        bystander = await connect("127.0.0.1", srv.port, secret=SECRET, settings=SMALL,
                                  timeout=5)
        peer = EvilPeer(settings=SMALL)
        await peer.connect(srv.port)
        sid = peer.conn.open_stream({"evil": True})
        peer._flush()
        peer.write(evil(sid))
        err = await peer.read_until_closed()
        assert isinstance(err, PeerError) and err.code == code
        await wait_ended(rec)
        assert isinstance(rec.ended[0], server_error)
        # The other connection, opened before, still works; so do new ones.
        await bystander.send_message({"still": "here"}, b"x" * 100_000)
        m = await asyncio.wait_for(bystander.receive_message(), 5)
        assert m.payload == b"x" * 100_000
        await bystander.close()
        await good_client_works(srv.port, SMALL)
    against_server(body, SMALL)


def test_data_on_closed_stream_only_fails_that_stream(against_server):
    async def body(srv, rec):
        peer = EvilPeer()
        await peer.connect(srv.port)
        sid = peer.conn.open_stream({"n": 1})
        peer.conn.send_data(sid, b"abc")
        peer.conn.end_stream(sid)
        peer._flush()
        peer.write(f.encode_frame(FrameType.DATA, 0, sid, b"late"))
        s2 = peer.conn.open_stream({"n": 2})
        peer.conn.send_data(s2, b"second")
        peer.conn.end_stream(s2)
        peer._flush()
        echoes = []
        for _ in range(200):
            data = await asyncio.wait_for(peer.reader.read(65536), 5)
            peer.conn.receive_data(data)
            peer._flush()
            echoes += [e for e in peer.conn.events_received()
                       if type(e).__name__ == "StreamOpened"]
            if len(echoes) == 2:
                break
        assert [e.header["echo"]["n"] for e in echoes] == [1, 2]
        assert rec.ended == []  # the connection survived
        peer.writer.close()
    against_server(body)


def test_truncated_mid_frame(against_server):
    async def body(srv, rec):
        peer = EvilPeer()
        await peer.connect(srv.port)
        sid = peer.conn.open_stream({})
        peer.conn.send_data(sid, b"q" * 100_000)
        raw = b"".join(bytes(b) for b in peer.conn.data_to_send())
        peer.write(raw[:-5000])
        await peer.writer.drain()
        peer.writer.close()
        await wait_ended(rec)
        assert isinstance(rec.ended[0], ConnectionLost)
        assert "middle of a frame" in str(rec.ended[0])
        await good_client_works(srv.port)
    against_server(body)


def test_peer_vanishes_idle_timeout(against_server):
    # Generous against a loaded machine: the live client must answer a ping
    # within the idle timeout for the test to pass.
    quick = Settings(keepalive_interval=0.1, idle_timeout=1.0)

    async def body(srv, rec):
        peer = EvilPeer()
        await peer.connect(srv.port)  # then never answers the pings
        live = await connect("127.0.0.1", srv.port, secret=SECRET, settings=quick,
                             timeout=5)
        await wait_ended(rec)
        assert isinstance(rec.ended[0], PeerTimeout)
        assert isinstance(rec.ended[0], TimeoutError)
        err = await peer.read_until_closed()
        assert isinstance(err, PeerError) and err.code == ErrorCode.TIMEOUT
        # The live client answered pings throughout and still works.
        await live.send_message({"alive": True}, b"")
        m = await asyncio.wait_for(live.receive_message(), 5)
        assert m.header == {"echo": {"alive": True}}
        await live.close()
    against_server(body, quick)


def test_client_sees_server_vanish():
    async def main():
        async def silent(reader, writer):  # accepts, then says nothing at all
            await reader.read()
            writer.close()
        fake = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            with pytest.raises(PeerTimeout):
                await connect("127.0.0.1", fake.sockets[0].getsockname()[1], secret=SECRET,
                              settings=Settings(handshake_timeout=0.2), timeout=5)
        finally:
            fake.close()
    arun(main())


def test_handshake_frames_only_before_auth_over_socket(against_server):
    async def body(srv, rec):
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(f.encode_preface(2, 2) + f.encode_frame(FrameType.OPEN, 0, 1,
                                                        f.encode_open(0, b"\x80")))
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await first_handshake_failure(srv)
        assert isinstance(srv.handshake_failures[0], HandshakeError)
    against_server(body)


def test_32_concurrent_clients(against_server):
    async def body(srv, rec):
        async def client(i):
            c = await connect("127.0.0.1", srv.port, secret=SECRET, timeout=10)
            for k in range(3):
                payload = bytes([i]) * (10_000 * (k + 1))
                await c.send_message({"c": i, "k": k}, payload)
                m = await asyncio.wait_for(c.receive_message(), 10)
                assert m.header == {"echo": {"c": i, "k": k}} and m.payload == payload
            await c.close()
            return i
        done = await asyncio.gather(*(client(i) for i in range(32)))
        assert sorted(done) == list(range(32))
        await wait_ended(rec, 32)
        assert all(e is None for e in rec.ended)
    against_server(body, timeout=30)


def test_memory_pair_wrong_secret():
    from llmwire import memory_pair

    async def main():
        with pytest.raises(AuthenticationError):
            await memory_pair(b"one", server_secret=b"two")
    arun(main())


def test_connection_error_fails_pending_stream_ops(against_server):
    """A pending read on one stream sees ConnectionClosed with the cause."""
    rec_streams = []

    async def handler(t):
        rec_streams.append(await t.accept_stream())
        await t.wait_closed()

    async def body(srv, _):
        peer = EvilPeer()
        await peer.connect(srv.port)
        peer.conn.open_stream({})
        peer._flush()
        for _ in range(100):
            if rec_streams:
                break
            await asyncio.sleep(0.01)
        reader = asyncio.ensure_future(rec_streams[0].read())
        await asyncio.sleep(0.02)
        peer.write(bytes([0x42]) + b"\0" * 19)  # unknown frame type
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(reader, 5)
        assert isinstance(info.value.cause, UnknownFrameType)
        peer.writer.close()
    against_server(body, handler=handler)
