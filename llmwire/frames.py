"""Frame layout: the fixed header and the payload of each frame type.

Pure functions, no I/O (docs/protocol.md is the spec; this module follows it).

Every frame is a 20-byte header followed by ``length`` payload bytes::

    offset  size  field
         0     1  type       FrameType
         1     1  flags      per type; undefined bits must be 0
         2     2  reserved   must be 0
         4     4  stream_id  0 for connection frames, >0 for stream frames
         8     4  length     payload length in bytes
        12     8  checksum   xxh3-64 (seed 0) of the payload

All integers are big-endian (network order). The header is parsed and its
``length`` checked against the receiver's limit before any payload buffer is
allocated.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, Union

import xxhash

from .errors import ChecksumMismatch, FrameTooLarge, MalformedFrame, UnknownFrameType

__all__ = [
    "HEADER_SIZE", "MAGIC", "PREFACE_SIZE", "FrameType", "Flag", "ErrorCode",
    "FrameHeader", "Frame", "encode_header", "encode_frame", "parse_header",
    "parse_frame", "encode_preface", "parse_preface", "payload_checksum",
    "encode_open", "parse_open", "encode_end", "parse_end", "encode_code_reason",
    "parse_code_reason", "encode_credit", "parse_credit", "encode_goaway", "parse_goaway",
    "MAX_FRAME_PAYLOAD_CAP", "MAX_REASON_BYTES", "digest_record",
]

Buffer = Union[bytes, bytearray, memoryview]

_HEADER = struct.Struct("!BBHIIQ")
HEADER_SIZE = _HEADER.size  # 20

#: First bytes each side sends. 0x89 and CR LF SUB catch text-mode mangling
#: and make a plain-text peer fail at the first byte (as PNG's signature does).
MAGIC = b"\x89LLMW\r\n\x1a"
_PREFACE = struct.Struct("!8sHH")
PREFACE_SIZE = _PREFACE.size  # 12: magic, min version, max version

#: No implementation may advertise a larger max frame payload than this.
MAX_FRAME_PAYLOAD_CAP = 16 * 1024 * 1024
#: Reasons in CANCEL / ERROR / GOAWAY are truncated to this many UTF-8 bytes.
MAX_REASON_BYTES = 1024

payload_checksum = xxhash.xxh3_64_intdigest


class FrameType(enum.IntEnum):
    """Frame type byte (docs/protocol.md, "Frame types")."""

    HELLO = 0x01    # handshake: settings and nonce (msgpack map)
    AUTH = 0x02     # handshake: HMAC-SHA256 proof (32 bytes)
    OPEN = 0x03     # open a stream: u64 offset + msgpack header
    DATA = 0x04     # stream bytes
    END = 0x05      # end a stream: u64 length + 16-byte stream digest
    CANCEL = 0x06   # abort a stream: u32 code + UTF-8 reason
    CREDIT = 0x07   # grant flow-control credit: u32 increment
    PING = 0x08     # keepalive: 8 opaque bytes; flag ACK marks the reply
    GOAWAY = 0x09   # no new streams: u32 last stream id + u32 code + reason
    ERROR = 0x0A    # fatal connection error: u32 code + reason


class Flag(enum.IntFlag):
    """Flag bits. Only PING defines one (ACK: this is the pong)."""

    NONE = 0
    ACK = 0x01


class ErrorCode(enum.IntEnum):
    """Codes carried by CANCEL, GOAWAY and ERROR frames."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    FRAME_SIZE_ERROR = 4
    UNKNOWN_FRAME_TYPE = 5
    CHECKSUM_ERROR = 6
    HANDSHAKE_ERROR = 7
    AUTH_FAILED = 8
    TIMEOUT = 9
    CANCEL = 10
    STREAM_CLOSED = 11
    INTEGRITY_ERROR = 12
    HEADER_TOO_LARGE = 13
    REFUSED = 14


# Which frame types live on stream 0 (connection) and which on a stream.
CONNECTION_FRAMES = frozenset({FrameType.HELLO, FrameType.AUTH, FrameType.PING,
                               FrameType.GOAWAY, FrameType.ERROR})
STREAM_FRAMES = frozenset({FrameType.OPEN, FrameType.DATA, FrameType.END, FrameType.CANCEL})
# CREDIT may be either: stream 0 grants connection credit.
_ALLOWED_FLAGS = {t: 0 for t in FrameType}
_ALLOWED_FLAGS[FrameType.PING] = Flag.ACK
_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class FrameHeader(NamedTuple):
    """A parsed, validated frame header."""

    type: FrameType
    flags: int
    stream_id: int
    length: int
    checksum: int


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame: header fields and its payload."""

    type: FrameType
    flags: int
    stream_id: int
    payload: bytes


def encode_header(frame_type: int, flags: int, stream_id: int, payload: Buffer,
                  checksum: int | None = None) -> bytes:
    """Return the 20-byte header for ``payload`` (its checksum computed here
    unless the caller computed it already)."""
    return _HEADER.pack(frame_type, flags, 0, stream_id, len(payload),
                        payload_checksum(payload) if checksum is None else checksum)


_DIGEST_RECORD = struct.Struct("!IQ")


def digest_record(length: int, checksum: int) -> bytes:
    """What one DATA frame adds to its stream's digest (protocol version 2):
    u32 payload length, u64 payload checksum (docs/protocol.md, section 5)."""
    return _DIGEST_RECORD.pack(length, checksum)


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: Buffer = b"") -> bytes:
    """Return header and payload as one ``bytes`` (for small frames)."""
    return encode_header(frame_type, flags, stream_id, payload) + bytes(payload)


def parse_header(data: Buffer, max_payload: int) -> FrameHeader:
    """Parse and validate the first ``HEADER_SIZE`` bytes of ``data``.

    Raises FrameTooLarge when the declared length exceeds ``max_payload``
    (before anything is allocated), UnknownFrameType for an undefined type
    byte, MalformedFrame for reserved bits, undefined flags or a stream id
    that does not fit the type.
    """
    if len(data) < HEADER_SIZE:
        raise ValueError("parse_header needs HEADER_SIZE bytes")
    ftype, flags, reserved, stream_id, length, checksum = _HEADER.unpack_from(data)
    if ftype not in _KNOWN_TYPES:
        raise UnknownFrameType(ftype)
    if length > max_payload:
        raise FrameTooLarge(length, max_payload)
    ftype = FrameType(ftype)
    if reserved:
        raise MalformedFrame(f"{ftype.name} frame has reserved bits set (0x{reserved:04x})")
    if flags & ~_ALLOWED_FLAGS[ftype]:
        raise MalformedFrame(f"{ftype.name} frame has undefined flags 0x{flags:02x}")
    if ftype in CONNECTION_FRAMES and stream_id != 0:
        raise MalformedFrame(f"{ftype.name} frame must be on stream 0, got {stream_id}")
    if ftype in STREAM_FRAMES and stream_id == 0:
        raise MalformedFrame(f"{ftype.name} frame needs a stream id, got 0")
    return FrameHeader(ftype, flags, stream_id, length, checksum)


def parse_frame(data: Buffer, max_payload: int) -> tuple[Frame, int] | None:
    """Parse one whole frame from the start of ``data``.

    Returns ``(frame, bytes_consumed)``, or None if ``data`` holds only part
    of a frame. Raises the errors of :func:`parse_header`, and
    ChecksumMismatch when the payload does not hash to the header's checksum.
    """
    if len(data) < HEADER_SIZE:
        return None
    header = parse_header(data, max_payload)
    end = HEADER_SIZE + header.length
    if len(data) < end:
        return None
    payload = bytes(data[HEADER_SIZE:end])
    actual = payload_checksum(payload)
    if actual != header.checksum:
        raise ChecksumMismatch(header.stream_id, header.checksum, actual)
    return Frame(header.type, header.flags, header.stream_id, payload), end


# --- preface ------------------------------------------------------------------

def encode_preface(min_version: int, max_version: int) -> bytes:
    """The 12 bytes each side sends first: magic, lowest and highest version."""
    return _PREFACE.pack(MAGIC, min_version, max_version)


def parse_preface(data: Buffer) -> tuple[int, int]:
    """Return ``(min_version, max_version)``; the caller has checked the magic."""
    _, lo, hi = _PREFACE.unpack_from(data)
    return lo, hi


# --- payloads -------------------------------------------------------------------

_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_END = struct.Struct("!Q16s")
_CODE = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return raw.decode("utf-8", "ignore").encode("utf-8")


def _reason_text(raw: bytes) -> str:
    return raw[:MAX_REASON_BYTES].decode("utf-8", "replace")


def encode_open(offset: int, header: bytes) -> bytes:
    """OPEN payload: u64 starting offset, then the msgpack stream header."""
    return _U64.pack(offset) + header


def parse_open(payload: Buffer) -> tuple[int, bytes]:
    """Return ``(offset, header_bytes)`` of an OPEN payload."""
    if len(payload) < _U64.size:
        raise MalformedFrame("OPEN payload shorter than its 8-byte offset")
    return _U64.unpack_from(payload)[0], bytes(payload[_U64.size:])


def encode_end(length: int, digest: bytes) -> bytes:
    """END payload: u64 bytes sent on the stream, 16-byte stream digest."""
    return _END.pack(length, digest)


def parse_end(payload: Buffer) -> tuple[int, bytes]:
    """Return ``(length, digest)`` of an END payload."""
    if len(payload) != _END.size:
        raise MalformedFrame(f"END payload must be {_END.size} bytes, got {len(payload)}")
    return _END.unpack_from(payload)


def encode_code_reason(code: int, reason: str) -> bytes:
    """CANCEL / ERROR payload: u32 code, UTF-8 reason (at most 1 KiB)."""
    return _CODE.pack(code) + _reason_bytes(reason)


def parse_code_reason(payload: Buffer) -> tuple[int, str]:
    """Return ``(code, reason)`` of a CANCEL or ERROR payload."""
    if len(payload) < _CODE.size:
        raise MalformedFrame("CANCEL/ERROR payload shorter than its 4-byte code")
    return _CODE.unpack_from(payload)[0], _reason_text(bytes(payload[_CODE.size:]))


def encode_credit(increment: int) -> bytes:
    """CREDIT payload: u32 increment (> 0)."""
    return _U32.pack(increment)


def parse_credit(payload: Buffer) -> int:
    """Return the increment of a CREDIT payload (must be 4 bytes, > 0)."""
    if len(payload) != _U32.size:
        raise MalformedFrame(f"CREDIT payload must be 4 bytes, got {len(payload)}")
    (inc,) = _U32.unpack_from(payload)
    if inc == 0:
        raise MalformedFrame("CREDIT increment must be > 0")
    return inc


def encode_goaway(last_stream_id: int, code: int, reason: str) -> bytes:
    """GOAWAY payload: u32 last peer stream processed, u32 code, reason."""
    return _GOAWAY.pack(last_stream_id, code) + _reason_bytes(reason)


def parse_goaway(payload: Buffer) -> tuple[int, int, str]:
    """Return ``(last_stream_id, code, reason)`` of a GOAWAY payload."""
    if len(payload) < _GOAWAY.size:
        raise MalformedFrame("GOAWAY payload shorter than 8 bytes")
    last, code = _GOAWAY.unpack_from(payload)
    return last, code, _reason_text(bytes(payload[_GOAWAY.size:]))
