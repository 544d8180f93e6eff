"""The sans-I/O connection: handshake, streams, flow control, faults."""

from __future__ import annotations

import json
import pathlib

import msgpack
import pytest
import xxhash
from hypothesis import given, settings as hsettings, strategies as st

from conftest import Pair, frame_digest
from llmwire import events as E
from llmwire import frames as f
from llmwire.errors import (
    AuthenticationError,
    BadPreface,
    ChecksumMismatch,
    ConnectionClosed,
    ConnectionLost,
    FlowControlError,
    FrameTooLarge,
    HandshakeError,
    IntegrityError,
    LlmwireError,
    LocalProtocolError,
    MalformedFrame,
    PeerError,
    PeerTimeout,
    StreamCancelled,
    StreamClosedError,
    StreamError,
    StreamTimeout,
    UnknownFrameType,
    VersionMismatch,
)
from llmwire.frames import ErrorCode, FrameType
from llmwire.protocol import Connection, ConnectionState, Role, Settings, StreamState

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "frames.json").read_text())

SMALL = Settings(max_frame_payload=4096, stream_window=16384, connection_window=32768)


def kinds(events):
    return [type(e).__name__ for e in events]


def data_of(events, sid):
    return b"".join(bytes(e.data) for e in events if isinstance(e, E.DataReceived)
                    and e.stream_id == sid)


# --- handshake -------------------------------------------------------------------

def test_handshake_completes_both_sides():
    p = Pair(handshake=False)
    p.pump()
    for c in (p.a, p.b):
        assert c.state is ConnectionState.OPEN
        (ev,) = c.events_received()
        assert isinstance(ev, E.HandshakeComplete) and ev.version == 2


def test_secret_never_on_the_wire():
    secret = b"very-secret-value-123"
    a = Connection(Role.CLIENT, secret)
    b = Connection(Role.SERVER, secret)
    wire = b""
    for _ in range(5):
        for x, y in ((a, b), (b, a)):
            for buf in x.data_to_send():
                wire += bytes(buf)
                y.receive_data(buf)
    assert a.state is ConnectionState.OPEN
    assert secret not in wire


def test_wrong_secret_fails_on_both_sides():
    p = Pair(b"one", b"two", handshake=False)
    raised = {}
    for _ in range(5):  # the two sides exchange bytes in lock step
        outs = {c: c.data_to_send() for c in (p.a, p.b)}
        for src, dst in ((p.a, p.b), (p.b, p.a)):
            if dst in raised:
                continue
            try:
                for buf in outs[src]:
                    dst.receive_data(buf)
            except LlmwireError as exc:
                raised[dst] = exc
    assert isinstance(raised.get(p.a), AuthenticationError)
    assert isinstance(raised.get(p.b), AuthenticationError)
    assert isinstance(raised[p.a], PermissionError)
    assert p.a.state is ConnectionState.ERROR and p.b.state is ConnectionState.ERROR
    assert isinstance(p.a.error, AuthenticationError)
    with pytest.raises(ConnectionClosed):
        p.a.open_stream({})


def test_after_error_everything_says_closed():
    p = Pair(b"one", b"two", handshake=False)
    with pytest.raises(AuthenticationError):
        p.pump()
    failed = p.a if p.a.state is ConnectionState.ERROR else p.b
    assert failed.state is ConnectionState.ERROR
    with pytest.raises(ConnectionClosed) as info:
        failed.receive_data(b"x")
    assert isinstance(info.value.cause, AuthenticationError)
    with pytest.raises(ConnectionClosed):
        failed.ping()
    assert failed.get_timer() is None


def test_version_mismatch_on_both_sides():
    new = Connection(Role.CLIENT, b"s", versions=(3, 4))
    old = Connection(Role.SERVER, b"s")
    with pytest.raises(VersionMismatch) as e1:
        old.receive_data(b"".join(new.data_to_send()))
    with pytest.raises(VersionMismatch) as e2:
        new.receive_data(b"".join(old.data_to_send()))
    assert e1.value.local == (2, 2) and e1.value.remote == (3, 4)
    assert e2.value.remote == (2, 2)
    assert "no common protocol version" in str(e1.value)
    assert old.state is new.state is ConnectionState.ERROR


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"\x89LLMX", b"\x00" * 40])
def test_garbage_before_handshake(garbage):
    c = Connection(Role.SERVER, b"s")
    c.data_to_send()
    with pytest.raises(BadPreface):
        c.receive_data(garbage)
    assert c.state is ConnectionState.ERROR
    assert c.data_to_send() == []  # nothing to say to a non-llmwire peer


def test_only_handshake_frames_before_auth():
    c = Connection(Role.SERVER, b"s")
    c.receive_data(f.encode_preface(2, 2))
    with pytest.raises(HandshakeError, match="before authentication"):
        c.receive_data(f.encode_frame(FrameType.OPEN, 0, 1, f.encode_open(0, b"\x80")))


def test_data_before_auth_after_hello_rejected():
    a = Connection(Role.CLIENT, b"s")
    b = Connection(Role.SERVER, b"s")
    b.receive_data(b"".join(a.data_to_send()))    # preface
    a.receive_data(b"".join(b.data_to_send()))    # preface + HELLO -> a sends HELLO + AUTH
    out = b"".join(a.data_to_send())
    # Deliver a's HELLO only, then a forged DATA instead of AUTH.
    hello_end = len(out) - (f.HEADER_SIZE + 32)
    b.receive_data(out[:hello_end])
    with pytest.raises(HandshakeError):
        b.receive_data(f.encode_frame(FrameType.DATA, 0, 1, b"x"))


def test_handshake_frame_size_limited_before_auth():
    c = Connection(Role.SERVER, b"s")
    c.receive_data(f.encode_preface(2, 2))
    with pytest.raises(FrameTooLarge):
        c.receive_data(f.encode_header(FrameType.HELLO, 0, 0, b"x" * 5000))


def test_hello_garbage_is_handshake_error():
    c = Connection(Role.SERVER, b"s")
    c.receive_data(f.encode_preface(2, 2))
    with pytest.raises(HandshakeError):
        c.receive_data(f.encode_frame(FrameType.HELLO, 0, 0, b"\xc1garbage"))
    c2 = Connection(Role.SERVER, b"s")
    c2.receive_data(f.encode_preface(2, 2))
    bad = msgpack.packb({"role": "client", "nonce": b"n" * 32, "max_frame_payload": 1})
    with pytest.raises(HandshakeError, match="max_frame_payload"):
        c2.receive_data(f.encode_frame(FrameType.HELLO, 0, 0, bad))


def test_handshake_timeout():
    c = Connection(Role.CLIENT, b"s", settings=Settings(handshake_timeout=5.0), now=100.0)
    assert c.get_timer() == 105.0
    c.handle_timer(104.0)
    with pytest.raises(PeerTimeout):
        c.handle_timer(105.0)
    assert c.state is ConnectionState.ERROR


# --- streams ---------------------------------------------------------------------

def test_stream_round_trip_with_offset_and_digest(pair):
    sid = pair.a.open_stream({"name": "w", "shape": [2, 3]}, offset=1234)
    assert sid == 1
    body = bytes(range(256)) * 100
    assert Pair.send_all(pair.a, sid, body) == len(body)
    digest = pair.a.end_stream(sid)
    pair.pump()
    ev = pair.b.events_received()
    assert isinstance(ev[0], E.StreamOpened)
    assert ev[0].header == {"name": "w", "shape": [2, 3]} and ev[0].offset == 1234
    assert data_of(ev, sid) == body
    assert ev[-1] == E.StreamEnded(sid, len(body), digest)
    assert digest == frame_digest(body, pair.a.max_send_frame)
    assert pair.a.open_streams == {} and pair.b.open_streams == {}


def test_server_streams_are_even_and_concurrent(pair):
    s1, s2 = pair.b.open_stream({}), pair.b.open_stream({})
    c1 = pair.a.open_stream({})
    assert (s1, s2, c1) == (2, 4, 1)
    pair.b.send_data(s2, b"two")
    pair.b.send_data(s1, b"one")
    pair.a.send_data(c1, b"uno")
    pair.pump()
    ev_a, ev_b = pair.a.events_received(), pair.b.events_received()
    assert data_of(ev_a, 2) == b"one" and data_of(ev_a, 4) == b"two"
    assert data_of(ev_b, 1) == b"uno"


def test_send_misuse_is_local_error(pair):
    with pytest.raises(LocalProtocolError):
        pair.a.send_data(99, b"x")
    sid = pair.a.open_stream({})
    with pytest.raises(LocalProtocolError, match="max frame"):
        pair.a.send_data(sid, b"x" * (pair.a.max_send_frame + 1))
    pair.a.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        pair.a.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError, match="msgpack"):
        pair.a.open_stream({"x": object()})
    with pytest.raises(LocalProtocolError, match="limit"):
        pair.a.open_stream({"x": b"y" * 70000})
    assert pair.a.state is ConnectionState.OPEN  # misuse changes nothing


def test_numpy_buffers_not_copied_into_bytes(pair):
    np = pytest.importorskip("numpy")
    arr = np.arange(1000, dtype=np.float32)
    sid = pair.a.open_stream({})
    pair.a.send_data(sid, arr)
    out = pair.a.data_to_send()
    assert isinstance(out[-1], memoryview) and out[-1].obj is arr
    for b in out:
        pair.b.receive_data(b)
    assert data_of(pair.b.events_received(), sid) == arr.tobytes()


def test_credit_is_granted_on_consumption_not_arrival():
    p = Pair(settings_a=SMALL, settings_b=SMALL)
    sid = p.a.open_stream({})
    body = b"z" * 100_000
    sent = Pair.send_all(p.a, sid, body)
    assert sent == SMALL.stream_window  # the window, no more
    p.pump()
    got = p.b.events_received()
    assert len(data_of(got, sid)) == sent
    assert p.a.send_credit(sid) == 0  # arrival granted nothing
    # The consumer takes the data: credit flows back and the sender resumes.
    p.b.consumed(sid, sent)
    p.pump()
    assert p.a.send_credit(sid) == SMALL.stream_window
    assert any(isinstance(e, E.CreditAvailable) for e in p.a.events_received())


def test_slow_consumer_bounds_buffered_bytes():
    p = Pair(settings_a=SMALL, settings_b=SMALL)
    sid = p.a.open_stream({})
    total, pending, peak = 0, 0, 0
    for _ in range(200):
        total += Pair.send_all(p.a, sid, b"q" * 10_000)
        p.pump()
        pending += len(data_of(p.b.events_received(), sid))
        peak = max(peak, pending)
        take = min(pending, 1000)  # consumer takes 1000 bytes per round
        p.b.consumed(sid, take)
        pending -= take
    assert peak <= SMALL.stream_window
    assert total > SMALL.stream_window  # progress was made


def test_connection_window_shared_by_streams():
    s = Settings(max_frame_payload=4096, stream_window=30000, connection_window=40000)
    p = Pair(settings_a=s, settings_b=s)
    s1, s2 = p.a.open_stream({}), p.a.open_stream({})
    a = Pair.send_all(p.a, s1, b"1" * 30000)
    b = Pair.send_all(p.a, s2, b"2" * 30000)
    assert (a, b) == (30000, 10000)


def test_max_streams_respected():
    s = Settings(max_streams=2)
    p = Pair(settings_a=s, settings_b=s)
    p.a.open_stream({}), p.a.open_stream({})
    assert not p.a.can_open_stream()
    with pytest.raises(LocalProtocolError):
        p.a.open_stream({})


# --- faults ----------------------------------------------------------------------

def _data_frames(conn, sid, parts):
    """The DATA frames ``conn`` emits for ``parts`` (one frame each), as bytes."""
    frames = []
    for part in parts:
        conn.send_data(sid, part)
        frames.append(b"".join(bytes(b) for b in conn.data_to_send()))
    return frames


@pytest.mark.parametrize("tamper", ["drop", "swap", "duplicate", "resplit"])
def test_digest_from_frame_checksums_still_catches_lost_reordered_or_extra_frames(pair, tamper):
    """Version 2's digest is built from the frames' checksums, not the bytes:
    each frame's payload is still checked by its own checksum, and a frame
    lost, swapped, repeated, or the same bytes framed otherwise, fails the
    stream (the receiver's credit is large enough for every variant)."""
    sid = pair.a.open_stream({})
    pair.pump()
    pair.b.events_received()
    parts = [b"a" * 100, b"b" * 100, b"c" * 100]
    frames = _data_frames(pair.a, sid, parts)
    pair.a.end_stream(sid)
    end = b"".join(bytes(b) for b in pair.a.data_to_send())
    if tamper == "drop":
        frames = [frames[0], frames[2]]
    elif tamper == "swap":
        frames = [frames[1], frames[0], frames[2]]          # same length, same bytes multiset
    elif tamper == "duplicate":
        frames = [frames[0], frames[0], frames[2]]          # same length
    else:
        whole = b"".join(parts)
        frames = [f.encode_frame(FrameType.DATA, 0, sid, whole[:150]),
                  f.encode_frame(FrameType.DATA, 0, sid, whole[150:])]
    for frame in frames:
        pair.b.receive_data(frame)
    pair.b.receive_data(end)
    ev = pair.b.events_received()[-1]
    assert isinstance(ev, E.StreamFailed) and isinstance(ev.error, IntegrityError), tamper
    assert pair.b.state is ConnectionState.OPEN


def test_stream_digest_vector():
    """The stored digest of stored frames (tests/vectors/frames.json), by the
    receiving side's computation."""
    vec = VECTORS["stream_digest_v2"]
    p = Pair()
    sid = p.a.open_stream({})
    p.pump()
    p.b.events_received()
    for hex_part in vec["payloads"]:
        p.b.receive_data(f.encode_frame(FrameType.DATA, 0, sid, bytes.fromhex(hex_part)))
    total = sum(len(bytes.fromhex(x)) for x in vec["payloads"])
    p.b.receive_data(f.encode_frame(FrameType.END, 0, sid,
                                    f.encode_end(total, bytes.fromhex(vec["digest"]))))
    assert p.b.events_received()[-1] == E.StreamEnded(sid, total, bytes.fromhex(vec["digest"]))


def test_integrity_mismatch_fails_stream_connection_survives(pair):
    bad, good = pair.a.open_stream({}), pair.a.open_stream({})
    pair.a.send_data(bad, b"hello")
    pair.a.send_data(good, b"world")
    pair.pump()
    pair.b.events_received()
    # A misbehaving sender claims another digest for `bad`.
    pair.b.receive_data(f.encode_frame(FrameType.END, 0, bad, f.encode_end(5, b"\0" * 16)))
    (ev,) = pair.b.events_received()
    assert isinstance(ev, E.StreamFailed) and isinstance(ev.error, IntegrityError)
    assert isinstance(ev.error, StreamError) and ev.error.stream_id == bad
    pair.a._streams.pop(bad)  # the forger forgets it too
    pair.a._send_streams -= 1
    pair.a.end_stream(good)
    pair.pump()
    assert kinds(pair.b.events_received()) == ["StreamEnded"]
    assert pair.b.state is ConnectionState.OPEN


def test_data_on_closed_stream_fails_that_stream_only(pair):
    s1, s2 = pair.a.open_stream({}), pair.a.open_stream({})
    pair.a.send_data(s1, b"abc")
    pair.a.end_stream(s1)
    pair.pump()
    pair.b.events_received()
    pair.b.receive_data(f.encode_frame(FrameType.DATA, 0, s1, b"late"))
    (ev,) = pair.b.events_received()
    assert isinstance(ev.error, StreamClosedError) and ev.stream_id == s1
    pair.a.send_data(s2, b"still fine")
    pair.a.end_stream(s2)
    pair.pump()
    ev = pair.b.events_received()
    assert data_of(ev, s2) == b"still fine" and isinstance(ev[-1], E.StreamEnded)


def test_data_on_never_opened_stream_is_connection_error(pair):
    with pytest.raises(MalformedFrame, match="never opened"):
        pair.b.receive_data(f.encode_frame(FrameType.DATA, 0, 41, b"x"))
    assert pair.b.state is ConnectionState.ERROR


def test_stream_credit_overrun_is_flow_control_error():
    p = Pair(settings_a=SMALL, settings_b=SMALL)
    sid = p.a.open_stream({})
    Pair.send_all(p.a, sid, b"x" * SMALL.stream_window)
    p.pump()
    # The misbehaving peer sends one more frame beyond its credit.
    with pytest.raises(FlowControlError):
        p.b.receive_data(f.encode_frame(FrameType.DATA, 0, sid, b"y" * 10))
    assert p.b.state is ConnectionState.ERROR
    out = b"".join(p.b.data_to_send())
    with pytest.raises(PeerError) as info:  # the culprit is told why
        p.a.receive_data(out)
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_connection_credit_overrun_checked_before_allocation():
    p = Pair(settings_a=SMALL, settings_b=SMALL)
    sid = p.a.open_stream({})
    p.pump()
    header = f.encode_header(FrameType.DATA, 0, sid, b"") [:8] + \
        (SMALL.connection_window + 1).to_bytes(4, "big") + b"\0" * 8
    with pytest.raises((FlowControlError, FrameTooLarge)):
        p.b.receive_data(header)


def test_oversized_frame_rejected_from_header(pair):
    sid = pair.a.open_stream({})
    pair.pump()
    header = bytes([FrameType.DATA, 0, 0, 0]) + sid.to_bytes(4, "big") + \
        (2**32 - 1).to_bytes(4, "big") + b"\0" * 8
    with pytest.raises(FrameTooLarge):
        pair.b.receive_data(header)
    out = b"".join(pair.b.data_to_send())
    with pytest.raises(PeerError) as info:
        pair.a.receive_data(out)
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_unknown_frame_type(pair):
    with pytest.raises(UnknownFrameType):
        pair.b.receive_data(bytes([0x55]) + b"\0" * 19)
    assert pair.b.state is ConnectionState.ERROR
    assert isinstance(pair.b.error, UnknownFrameType)


def test_truncated_mid_frame(pair):
    sid = pair.a.open_stream({})
    pair.a.send_data(sid, b"x" * 50_000)
    raw = b"".join(bytes(b) for b in pair.a.data_to_send())
    pair.b.receive_data(raw[:-10])
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        pair.b.receive_eof()
    assert pair.b.state is ConnectionState.ERROR


def test_eof_without_goaway_is_lost_and_with_goaway_clean(pair):
    with pytest.raises(ConnectionLost, match="without GOAWAY"):
        pair.b.receive_eof()
    p = Pair()
    p.a.goaway(reason="done")
    p.pump()
    (ev,) = p.b.events_received()
    assert isinstance(ev, E.GoAwayReceived) and ev.reason == "done"
    p.b.receive_eof()
    assert p.b.state is ConnectionState.CLOSED and p.b.error is None


def test_goaway_refuses_new_streams_existing_finish(pair):
    sid = pair.a.open_stream({})
    pair.pump()
    pair.b.goaway()
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.a.open_stream({})
    pair.a.send_data(sid, b"finish")
    pair.a.end_stream(sid)
    pair.pump()
    assert "StreamEnded" in kinds(pair.b.events_received())


def test_cancel_by_sender(pair):
    sid = pair.a.open_stream({})
    pair.a.send_data(sid, b"part")
    pair.a.cancel_stream(sid, ErrorCode.CANCEL, "changed my mind")
    pair.pump()
    ev = pair.b.events_received()
    err = ev[-1].error
    assert isinstance(err, StreamCancelled) and err.reason == "changed my mind" and err.remote


def test_cancel_by_receiver_discards_in_flight_and_returns_credit():
    p = Pair(settings_a=SMALL, settings_b=SMALL)
    sid = p.a.open_stream({})
    p.pump()
    p.b.events_received()
    p.b.cancel_stream(sid, ErrorCode.CANCEL, "no thanks")
    assert p.b.open_streams == {sid: StreamState.CANCEL_SENT}
    Pair.send_all(p.a, sid, b"x" * 10000)   # in flight when the cancel arrives
    p.pump()
    (failed,) = [e for e in p.a.events_received() if isinstance(e, E.StreamFailed)]
    assert isinstance(failed.error, StreamCancelled)
    assert kinds(p.b.events_received()) == []  # nothing delivered after our cancel
    assert p.a.open_streams == {} and p.b.open_streams == {}
    # Connection credit came back: a new stream can use the whole window.
    s2 = p.a.open_stream({})
    p.pump()
    assert Pair.send_all(p.a, s2, b"y" * SMALL.stream_window) == SMALL.stream_window


def test_oversized_stream_header_fails_stream_only():
    p = Pair(settings_b=Settings(max_header_size=64))
    sid = p.a.open_stream({"k": "v" * 40})  # fits the limit a knows
    p.pump()
    p.b.events_received()
    p.b.receive_data(f.encode_frame(FrameType.OPEN, 0, 3, f.encode_open(0, msgpack.packb({"k": "v" * 100}))))
    (ev,) = p.b.events_received()
    assert isinstance(ev.error, StreamCancelled) and ev.error.code == ErrorCode.HEADER_TOO_LARGE
    assert p.b.state is ConnectionState.OPEN
    assert sid in p.b.open_streams


def test_keepalive_and_idle_timeout():
    s = Settings(keepalive_interval=5.0, idle_timeout=12.0)
    p = Pair(settings_a=s, settings_b=s)
    assert p.a.get_timer() == 5.0
    p.a.handle_timer(5.0)
    ping = p.a.data_to_send()
    assert ping and ping[0][0] == FrameType.PING
    for b in ping:
        p.b.receive_data(b, now=5.0)
    for b in p.b.data_to_send():
        p.a.receive_data(b, now=5.5)       # the pong keeps a alive
    assert kinds(p.a.events_received()) == ["PingAcknowledged"]
    p.a.handle_timer(17.0)                  # 11.5 s after the pong: still fine
    with pytest.raises(PeerTimeout):
        p.a.handle_timer(17.5)              # the peer vanished
    assert p.a.state is ConnectionState.ERROR


def test_progress_timeout_fails_only_the_stalled_stream():
    s = Settings(progress_timeout=3.0, keepalive_interval=None, idle_timeout=None)
    p = Pair(settings_a=s, settings_b=s)
    stalled, alive = p.a.open_stream({}), p.a.open_stream({})
    p.pump(now=0.0)
    p.b.events_received()
    p.a.send_data(alive, b"tick")
    p.pump(now=2.0)
    p.b.events_received()
    p.b.handle_timer(3.0)
    (ev,) = p.b.events_received()
    assert ev.stream_id == stalled and isinstance(ev.error, StreamTimeout)
    assert isinstance(ev.error, TimeoutError)
    assert alive in p.b.open_streams and p.b.state is ConnectionState.OPEN


def test_state_diagram_comes_from_the_table():
    from llmwire.protocol import STREAM_TRANSITIONS, stream_state_diagram

    text = stream_state_diagram()
    for (_, old, ev), new in STREAM_TRANSITIONS.items():
        assert f"{old.value} --> {new.value}: {ev.value}" in text


# --- fuzz ------------------------------------------------------------------------

def _handshaken_server() -> tuple[Connection, bytes]:
    p = Pair()
    sid = p.a.open_stream({"x": 1})
    p.a.send_data(sid, b"data")
    return p.b, b"".join(bytes(b) for b in p.a.data_to_send())


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 60))
def test_fuzz_after_handshake(noise, cut):
    conn, valid = _handshaken_server()
    try:
        conn.receive_data(valid[:cut] + noise)
        conn.receive_eof()
    except LlmwireError:
        pass
    for e in conn.events_received():
        if isinstance(e, E.StreamFailed):
            assert isinstance(e.error, LlmwireError)


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_before_handshake(noise):
    conn = Connection(Role.SERVER, b"s")
    try:
        conn.receive_data(f.encode_preface(2, 2) + noise)
    except LlmwireError:
        pass
    assert conn.state in (ConnectionState.HELLO, ConnectionState.ERROR)


@hsettings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_any_split_of_the_byte_stream_gives_the_same_events(sizes):
    p = Pair()
    sid = p.a.open_stream({"n": 1})
    body = bytes(range(256)) * 40
    p.a.send_data(sid, body)
    p.a.end_stream(sid)
    raw = b"".join(bytes(b) for b in p.a.data_to_send())
    pos, i = 0, 0
    while pos < len(raw):
        n = sizes[i % len(sizes)]
        p.b.receive_data(raw[pos:pos + n])
        pos, i = pos + n, i + 1
    ev = p.b.events_received()
    assert data_of(ev, sid) == body and isinstance(ev[-1], E.StreamEnded)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_bit_flips_in_a_valid_stream(flips):
    p = Pair()
    s1, s2 = p.a.open_stream({"a": 1}), p.a.open_stream({"b": [1, 2]}, offset=9)
    p.a.send_data(s1, b"x" * 3000)
    p.a.send_data(s2, b"y" * 20_000)
    p.a.end_stream(s1)
    p.a.ping()
    p.a.cancel_stream(s2, ErrorCode.CANCEL, "bye")
    raw = bytearray(b"".join(bytes(b) for b in p.a.data_to_send()))
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    try:
        p.b.receive_data(bytes(raw))
    except LlmwireError:
        assert p.b.state is ConnectionState.ERROR
    for e in p.b.events_received():
        if isinstance(e, E.StreamFailed):
            assert isinstance(e.error, LlmwireError)


def test_huge_declared_length_allocates_nothing_in_the_connection(pair):
    import tracemalloc

    sid = pair.a.open_stream({})
    pair.pump()
    header = bytes([FrameType.DATA, 0, 0, 0]) + sid.to_bytes(4, "big") + \
        (2**32 - 1).to_bytes(4, "big") + b"\0" * 8
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            pair.b.receive_data(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_held_chunks_are_never_overwritten_and_dropped_ones_reused(pair):
    sid = pair.a.open_stream({})
    pair.pump()
    pair.b.events_received()
    held = []
    for k in range(12):  # more frames than the pool keeps
        body = bytes([k]) * 100_000
        pair.a.send_data(sid, body)
        for b in pair.a.data_to_send():
            pair.b.receive_data(b)
        (ev,) = [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]
        held.append(ev.data)
        pair.b.consumed(sid, len(ev.data))
        pair.pump()
    assert [bytes(v) == bytes([k]) * 100_000 for k, v in enumerate(held)] == [True] * 12
    pool_ids = {id(b) for b in pair.b._pool}
    del held, ev
    # Nothing holds a view now: the next large frame lands in a pooled buffer.
    pair.a.send_data(sid, b"z" * 100_000)
    for b in pair.a.data_to_send():
        pair.b.receive_data(b)
    (ev,) = [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]
    assert id(ev.data.obj) in pool_ids
    assert bytes(ev.data) == b"z" * 100_000


# --- posted receive ---------------------------------------------------------------

def _deliver(pair):
    for b in pair.a.data_to_send():
        pair.b.receive_data(b)


def _open_posted(pair, size):
    sid = pair.a.open_stream({})
    pair.pump()
    pair.b.events_received()
    dest = bytearray(size)
    pair.b.post_buffer(sid, dest)
    return sid, dest


def test_posted_buffer_receives_frames_in_place(pair):
    sid, dest = _open_posted(pair, 300_000)
    body = bytes(range(256)) * 1000 + b"tail"  # 256004 bytes in several frames
    pair.a.send_data(sid, body[:100_000])
    pair.a.send_data(sid, body[100_000:200_000])
    pair.a.send_data(sid, body[200_000:])
    _deliver(pair)
    evs = [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]
    assert [e.posted for e in evs] == [True, True, True]
    assert all(e.data.obj is dest for e in evs)  # views of the posted buffer, no copy
    assert bytes(dest[:len(body)]) == body
    assert pair.b.posted_space(sid) == 300_000 - len(body)
    assert not pair.b._pool  # no receive buffer was needed
    digest = pair.a.end_stream(sid)
    _deliver(pair)
    assert pair.b.events_received() == [E.StreamEnded(sid, len(body), digest)]


def test_posted_buffer_small_frames_and_any_split_of_the_bytes(pair):
    sid, dest = _open_posted(pair, 1000)
    pair.a.send_data(sid, b"a" * 10)
    pair.a.send_data(sid, b"b" * 20)
    wire = b"".join(bytes(b) for b in pair.a.data_to_send())
    for i in range(len(wire)):  # one byte at a time
        pair.b.receive_data(wire[i:i + 1])
    evs = pair.b.events_received()
    assert [(bytes(e.data), e.posted) for e in evs] == [(b"a" * 10, True), (b"b" * 20, True)]
    assert bytes(dest[:30]) == b"a" * 10 + b"b" * 20


def test_posted_buffer_smaller_than_a_frame_falls_back_to_the_pool(pair):
    sid, dest = _open_posted(pair, 50_000)
    pair.a.send_data(sid, b"x" * 40_000)   # fits
    pair.a.send_data(sid, b"y" * 20_000)   # does not fit the 10 000 left
    pair.a.send_data(sid, b"z" * 5_000)    # would fit, but the posting has ended
    _deliver(pair)
    evs = [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]
    assert [(len(e.data), e.posted) for e in evs] == [(40_000, True), (20_000, False),
                                                      (5_000, False)]
    assert evs[1].data.obj is not dest and bytes(evs[1].data) == b"y" * 20_000
    assert bytes(dest[40_000:]) == b"\0" * 10_000  # untouched
    assert pair.b.posted_space(sid) == 0


def test_posted_buffer_ends_when_full(pair):
    sid, dest = _open_posted(pair, 30_000)
    pair.a.send_data(sid, b"p" * 30_000)
    pair.a.send_data(sid, b"q" * 30_000)
    _deliver(pair)
    evs = [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]
    assert [e.posted for e in evs] == [True, False]
    assert bytes(dest) == b"p" * 30_000 and bytes(evs[1].data) == b"q" * 30_000


def test_posted_buffer_checksum_mismatch_is_the_same_error(pair):
    sid, dest = _open_posted(pair, 100_000)
    pair.a.send_data(sid, b"k" * 50_000)
    header, payload = pair.a.data_to_send()
    bad = bytearray(payload)
    bad[123] ^= 1
    with pytest.raises(ChecksumMismatch):
        pair.b.receive_data(bytes(header) + bytes(bad))
    assert pair.b.state is ConnectionState.ERROR
    assert not [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)]


def test_unpost_mid_frame_moves_the_payload_out_of_the_buffer(pair):
    sid, dest = _open_posted(pair, 100_000)
    pair.a.send_data(sid, b"m" * 60_000)
    wire = b"".join(bytes(b) for b in pair.a.data_to_send())
    pair.b.receive_data(wire[:30_000])          # half the payload is in dest
    pair.b.unpost_buffer(sid)
    dest[:] = b"\xee" * len(dest)               # the caller reuses its buffer
    pair.b.receive_data(wire[30_000:])
    (ev,) = pair.b.events_received()
    assert not ev.posted and bytes(ev.data) == b"m" * 60_000
    assert bytes(dest) == b"\xee" * len(dest)   # never written after unpost


def test_cancel_while_posted_never_writes_the_buffer_again(pair):
    sid, dest = _open_posted(pair, 100_000)
    pair.a.send_data(sid, b"c" * 60_000)
    wire = b"".join(bytes(b) for b in pair.a.data_to_send())
    pair.b.receive_data(wire[:20_000])
    pair.b.cancel_stream(sid)
    dest[:] = b"\0" * len(dest)
    pair.b.receive_data(wire[20_000:])
    assert bytes(dest) == b"\0" * len(dest)
    assert [e for e in pair.b.events_received() if isinstance(e, E.DataReceived)] == []
    assert pair.b.posted_space(sid) == 0


def test_post_buffer_misuse_is_local_error(pair):
    sid = pair.a.open_stream({})
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.a.post_buffer(sid, bytearray(10))     # a stream we send on
    with pytest.raises(LocalProtocolError):
        pair.b.post_buffer(sid, b"read-only")
    with pytest.raises(LocalProtocolError):
        pair.b.post_buffer(99, bytearray(10))      # never opened
    pair.a.end_stream(sid)
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.b.post_buffer(sid, bytearray(10))     # closed
    pair.b.unpost_buffer(sid)                      # harmless
    assert pair.b.state is ConnectionState.OPEN
