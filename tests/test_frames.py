"""Frame layout: golden bytes, round trips, limits before allocation, fuzz."""

from __future__ import annotations

import json
import pathlib
import struct
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from llmwire import frames as f
from llmwire.errors import (
    ChecksumMismatch,
    FrameTooLarge,
    LlmwireError,
    MalformedFrame,
    UnknownFrameType,
)

VECTORS = json.loads((pathlib.Path(__file__).parent / "vectors" / "frames.json").read_text())


def test_header_is_20_bytes():
    assert f.HEADER_SIZE == 20
    assert f.PREFACE_SIZE == 12


def test_preface_vector():
    assert f.encode_preface(1, 1).hex() == VECTORS["preface_v1"]
    assert f.parse_preface(bytes.fromhex(VECTORS["preface_v1"])) == (1, 1)
    assert f.encode_preface(2, 2).hex() == VECTORS["preface_v2"]


@pytest.mark.parametrize("vec", VECTORS["frames"], ids=lambda v: v["name"])
def test_golden_vectors(vec):
    raw = bytes.fromhex(vec["bytes"])
    frame, used = f.parse_frame(raw, max_payload=1 << 20)
    assert used == len(raw)
    assert frame.type is f.FrameType[vec["type"]]
    assert frame.flags == vec["flags"]
    assert frame.stream_id == vec["stream_id"]
    assert frame.payload == bytes.fromhex(vec["payload"])
    assert f.encode_frame(frame.type, frame.flags, frame.stream_id, frame.payload) == raw


def test_xxh3_known_value():
    # XXH3-64 of b"abc" and b"" as published by the xxHash project.
    assert f.payload_checksum(b"abc") == 0x78AF5F94892F3950
    assert f.payload_checksum(b"") == 0x2D06800538D394C2


def test_incomplete_returns_none():
    raw = f.encode_frame(f.FrameType.DATA, 0, 1, b"hello")
    for cut in range(len(raw)):
        assert f.parse_frame(raw[:cut], 100) is None


def test_payload_codecs_round_trip():
    assert f.parse_open(f.encode_open(2**64 - 1, b"\x80")) == (2**64 - 1, b"\x80")
    assert f.parse_end(f.encode_end(12, b"d" * 16)) == (12, b"d" * 16)
    assert f.parse_code_reason(f.encode_code_reason(3, "é" * 2000)) [0] == 3
    assert len(f.encode_code_reason(3, "é" * 2000)) <= 4 + f.MAX_REASON_BYTES
    assert f.parse_credit(f.encode_credit(7)) == 7
    assert f.parse_goaway(f.encode_goaway(9, 0, "bye")) == (9, 0, "bye")


@pytest.mark.parametrize("payload,parser", [
    (b"", f.parse_open), (b"123", f.parse_end), (b"12", f.parse_code_reason),
    (b"\0\0\0\0", f.parse_credit), (b"123", f.parse_credit), (b"1234567", f.parse_goaway)])
def test_bad_payloads_raise_malformed(payload, parser):
    with pytest.raises(MalformedFrame):
        parser(payload)


def _header(t=4, flags=0, reserved=0, sid=1, length=0, checksum=0):
    return struct.pack("!BBHIIQ", t, flags, reserved, sid, length, checksum)


def test_huge_length_allocates_nothing():
    raw = _header(length=0xFFFFFFFF)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge) as info:
            f.parse_frame(raw, max_payload=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.length == 0xFFFFFFFF
    assert isinstance(info.value, ValueError)
    assert peak < 64 * 1024


def test_header_errors():
    with pytest.raises(UnknownFrameType) as info:
        f.parse_header(_header(t=0x7F), 100)
    assert info.value.frame_type == 0x7F
    with pytest.raises(MalformedFrame):
        f.parse_header(_header(reserved=1), 100)
    with pytest.raises(MalformedFrame):
        f.parse_header(_header(flags=1), 100)  # DATA defines no flags
    with pytest.raises(MalformedFrame):
        f.parse_header(_header(t=f.FrameType.PING, sid=3), 100)
    with pytest.raises(MalformedFrame):
        f.parse_header(_header(t=f.FrameType.DATA, sid=0), 100)


def test_checksum_mismatch():
    raw = bytearray(f.encode_frame(f.FrameType.DATA, 0, 5, b"payload"))
    raw[-1] ^= 1
    with pytest.raises(ChecksumMismatch) as info:
        f.parse_frame(bytes(raw), 100)
    assert info.value.stream_id == 5


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 1 << 21))
def test_fuzz_parse_frame(data, limit):
    try:
        f.parse_frame(data, limit)
    except LlmwireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(f.FrameType)), st.integers(0, 2**32 - 1), st.binary(max_size=300))
def test_round_trip_any_frame(ftype, sid, payload):
    flags = 0
    raw = f.encode_frame(ftype, flags, sid, payload)
    try:
        frame, used = f.parse_frame(raw, 1024)
    except MalformedFrame:
        return  # stream id that does not fit the type
    assert (frame.type, frame.stream_id, frame.payload, used) == (ftype, sid, payload, len(raw))
