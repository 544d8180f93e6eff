"""One contract, every transport: memory pair, TCP, Unix socket, TLS over TCP."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import xxhash

from conftest import arun, frame_digest
from llmwire import (
    ConnectionClosed,
    IntegrityError,
    RecvStream,
    SendStream,
    Settings,
    StreamCancelled,
    Transport,
)
from transport_helpers import KINDS, open_pair

SMALL = Settings(max_frame_payload=16 * 1024, stream_window=64 * 1024,
                 connection_window=128 * 1024)


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param == "tls" and shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    return request.param


def contract(kind, tmp_path, settings=None, timeout=20.0):
    """Decorator-free helper: run ``body(client, server)`` on a fresh pair."""
    def wrap(body):
        async def main():
            h = await open_pair(kind, str(tmp_path), settings)
            try:
                assert isinstance(h.client, Transport) and isinstance(h.server, Transport)
                return await body(h.client, h.server)
            finally:
                await h.close()
        return arun(main(), timeout)
    return wrap


def test_message_both_ways(kind, tmp_path):
    @contract(kind, tmp_path)
    async def _(c, s):
        await c.send_message({"round": 1, "op": "fit"}, b"weights")
        m = await s.receive_message()
        assert m.header == {"round": 1, "op": "fit"} and m.payload == b"weights"
        await s.send_message({"ok": True}, b"")
        m = await c.receive_message()
        assert m.header == {"ok": True} and m.payload == b""


def test_concurrent_streams_interleaved(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        bodies = {i: bytes([i]) * (50_000 + 1000 * i) for i in range(8)}
        streams = [await c.open_stream({"i": i}) for i in range(8)]
        assert all(isinstance(x, SendStream) for x in streams)

        async def send(i, st):
            body = memoryview(bodies[i])
            for k in range(0, len(body), 7000):
                await st.send(body[k:k + 7000])
            await st.end()

        async def recv():
            out = {}
            for _ in range(8):
                rs = await s.accept_stream()
                assert isinstance(rs, RecvStream)
                out[rs.header["i"]] = rs
            return {i: await rs.read_all() for i, rs in out.items()}

        got, *_ = await asyncio.gather(recv(), *(send(i, st) for i, st in enumerate(streams)))
        assert got == bodies


def test_offset_and_digest(kind, tmp_path):
    @contract(kind, tmp_path)
    async def _(c, s):
        st = await c.open_stream({"file": "a.bin"}, offset=4096)
        await st.send(b"tail of the file")
        digest = await st.end()
        rs = await s.accept_stream()
        assert rs.offset == 4096 and await rs.read_all() == b"tail of the file"
        assert digest == rs.digest == frame_digest(b"tail of the file")


def test_slow_consumer_bounds_memory(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        body = bytes(range(256)) * 4096  # 1 MiB, 16x the stream window
        st = await c.open_stream({})
        sender = asyncio.ensure_future(st.send(body))
        rs = await s.accept_stream()
        await asyncio.sleep(0.2)  # the consumer is busy
        buffered = sum(len(x) for x in rs._chunks)
        assert buffered <= SMALL.stream_window
        assert not sender.done()  # the sender is held back, not buffering
        got = bytearray()
        while len(got) < len(body):
            got += await rs.read()
        await sender
        await st.end()
        assert await rs.read() == b""
        assert bytes(got) == body


def test_numpy_array_is_sent_as_is(kind, tmp_path):
    np = pytest.importorskip("numpy")

    @contract(kind, tmp_path)
    async def _(c, s):
        arr = np.arange(300_000, dtype=np.float32).reshape(600, 500)
        await c.send_message({"dtype": "float32", "shape": [600, 500]}, arr)
        m = await s.receive_message()
        back = np.frombuffer(m.payload, dtype=np.float32).reshape(m.header["shape"])
        assert np.array_equal(back, arr)


def test_receiver_cancel_stops_sender_other_stream_fine(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        doomed, fine = await c.open_stream({"n": "doomed"}), await c.open_stream({"n": "fine"})
        await doomed.send(b"x" * 1000)
        r1, r2 = await s.accept_stream(), await s.accept_stream()
        await r1.cancel(reason="not wanted")
        with pytest.raises(StreamCancelled) as info:
            for _ in range(200):
                await doomed.send(b"y" * 10_000)
        assert info.value.remote and info.value.reason == "not wanted"
        await fine.send(b"ok")
        await fine.end()
        assert await r2.read_all() == b"ok"


def test_sender_cancel_reaches_receiver(kind, tmp_path):
    @contract(kind, tmp_path)
    async def _(c, s):
        st = await c.open_stream({})
        await st.send(b"partial")
        await st.cancel(reason="source vanished")
        rs = await s.accept_stream()
        assert await rs.read() == b"partial"
        with pytest.raises(StreamCancelled, match="source vanished"):
            await rs.read()
        await c.send_message({"after": 1}, b"x")
        assert (await s.receive_message()).header == {"after": 1}


def test_integrity_error_raised_at_end(kind, tmp_path):
    @contract(kind, tmp_path)
    async def _(c, s):
        bad = await c.open_stream({"n": "bad"})
        await bad.send(b"some bytes")
        c.connection._streams[bad.stream_id].hasher.update(b"corrupt")  # forge the digest
        await bad.end()
        rs = await s.accept_stream()
        assert await rs.read() == b"some bytes"
        with pytest.raises(IntegrityError):
            await rs.read()
        await c.send_message({"n": "next"}, b"fine")
        assert (await s.receive_message()).payload == b"fine"


def test_iterate_streams_and_chunks_then_clean_close(kind, tmp_path):
    @contract(kind, tmp_path)
    async def _(c, s):
        for i in range(3):
            await c.send_message({"i": i}, b"p" * i)
        seen = []

        async def consume():
            async for rs in s:
                seen.append((rs.header["i"], b"".join([bytes(x) async for x in rs])))

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        await c.close()
        await asyncio.wait_for(task, 5)  # the iterator ends cleanly on GOAWAY + EOF
        assert seen == [(0, b""), (1, b"p"), (2, b"pp")]
        assert c.is_closed
        with pytest.raises(ConnectionClosed):
            await c.open_stream({})
        await asyncio.wait_for(s.wait_closed(), 5)


def test_readinto_fills_buffers_across_frames(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        body = bytes(range(256)) * 2000  # 512 000 bytes, many frames and windows
        st = await c.open_stream({})
        sender = asyncio.ensure_future(st.send(body))
        rs = await s.accept_stream()
        first = bytearray(10)  # smaller than a frame: the rest stays queued
        assert await rs.readinto(first) == 10
        big = bytearray(300_000)
        assert await rs.readinto(memoryview(big)) == len(big)
        got = bytes(first) + bytes(big)
        got += bytes(await rs.read())  # read() and readinto() mix
        while len(got) < len(body):
            rest = bytearray(min(77_777, len(body) - len(got)))
            assert await rs.readinto(rest) == len(rest)
            got += rest
        await sender
        await st.end()
        assert await rs.readinto(bytearray(5)) == 0  # verified end
        assert got == body


def test_readinto_numpy_and_short_at_end(kind, tmp_path):
    np = pytest.importorskip("numpy")

    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        values = np.arange(50_000, dtype=np.float32)
        st = await c.open_stream({})

        async def send():
            await st.send(values)
            await st.end()
        sender = asyncio.ensure_future(send())
        rs = await s.accept_stream()
        out = np.zeros(60_000, dtype=np.float32)
        assert await rs.readinto(out) == values.nbytes  # the stream ended first
        await sender
        assert (out[:50_000] == values).all() and not out[50_000:].any()


def test_readinto_raises_stream_errors_and_cancel_while_waiting(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        st = await c.open_stream({})
        await st.send(b"x" * 1000)
        rs = await s.accept_stream()
        buf = bytearray(100_000)
        reader = asyncio.ensure_future(rs.readinto(buf))
        await asyncio.sleep(0.05)  # posted, waiting for more
        assert not reader.done()
        await rs.cancel(reason="enough")
        with pytest.raises(StreamCancelled):
            await reader
        buf[:] = b"\0" * len(buf)
        with pytest.raises(StreamCancelled):
            await st.send(b"y" * 200_000)
        await asyncio.sleep(0.05)
        assert not any(buf)  # nothing landed after the cancel
        # the connection goes on
        await c.send_message({"after": 1}, b"ok")
        assert (await s.receive_message()).payload == b"ok"


def test_readinto_task_cancelled_then_read_continues(kind, tmp_path):
    @contract(kind, tmp_path, SMALL)
    async def _(c, s):
        st = await c.open_stream({})
        rs = await s.accept_stream()
        buf = bytearray(50_000)
        reader = asyncio.ensure_future(rs.readinto(buf))
        await asyncio.sleep(0.05)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        buf[:] = b"\0" * len(buf)
        await st.send(b"after" * 1000)
        await st.end()
        got = b""
        async for chunk in rs:
            got += bytes(chunk)
        assert got == b"after" * 1000 and not any(buf)
