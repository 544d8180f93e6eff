"""Object payloads ("regular" mode): one Python value, serialized whole.

The value (dicts, lists, tuples, numbers, strings, bytes, None, NumPy
arrays, torch tensors, NumPy scalars) is packed with msgpack into one
message and sent as one stream. Simple, and the right tool for small
messages; for a large state dict it holds a serialized copy of everything
on both sides, which is exactly the cost container streaming removes (the
memory profiler compares the two).

Arrays and tensors travel as msgpack extension types::

    ext 1 (NumPy array) / ext 2 (torch tensor):
        u32 little-endian header length H, then a msgpack header
        [dtype name, shape], then the C-order bytes

bfloat16 tensors keep their dtype; tuples come back as lists.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping

import msgpack
import numpy as np

from ..errors import LocalProtocolError, ManifestError, PayloadError
from ..tensors import DTYPES, torch_module, view_tensor
from ..transport.base import RecvStream, Transport
from .verdict import refuse_stream

__all__ = ["send_object", "receive_object", "pack_object", "unpack_object", "STREAM_KIND",
           "DEFAULT_MAX_OBJECT_BYTES"]

STREAM_KIND = "object"
DEFAULT_MAX_OBJECT_BYTES = 4 * 1024**3
_EXT_NUMPY, _EXT_TORCH = 1, 2
_U32 = struct.Struct("<I")


def _pack_array(code: int, dtype: str, shape: tuple[int, ...], data: Any) -> msgpack.ExtType:
    header = msgpack.packb([dtype, list(shape)])
    return msgpack.ExtType(code, _U32.pack(len(header)) + header + bytes(data))


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("torch"):
        if not isinstance(value, np.ndarray) and not hasattr(value, "detach"):
            raise TypeError(f"cannot serialize {type(value).__name__}")
        view = view_tensor(value)
        code = _EXT_TORCH if view.container == "torch" else _EXT_NUMPY
        return _pack_array(code, view.dtype, view.shape, np.ascontiguousarray(view.array))
    raise TypeError(f"cannot serialize {type(value).__name__}")


def pack_object(value: Any) -> bytes:
    """Serialize ``value`` to bytes; :class:`PayloadError` for unsupported types."""
    try:
        return msgpack.packb(value, default=_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"cannot send this object: {exc}") from None


def _ext_hook(code: int, data: bytes) -> Any:
    if code not in (_EXT_NUMPY, _EXT_TORCH):
        raise ManifestError(f"unknown msgpack extension type {code}")
    try:
        (length,) = _U32.unpack_from(data)
        dtype, shape = msgpack.unpackb(data[4:4 + length])
        info = DTYPES[dtype]
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError("negative dimension")
        array = np.frombuffer(data, dtype=info.numpy, offset=4 + length).reshape(shape).copy()
    except (KeyError, ValueError, TypeError, struct.error, msgpack.ExtraData) as exc:
        raise ManifestError(f"bad array in object payload: {exc}") from None
    if code == _EXT_NUMPY:
        return array
    torch = torch_module()
    if torch is None:
        return array
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def unpack_object(data: bytes | memoryview) -> Any:
    """Inverse of :func:`pack_object`; :class:`ManifestError` for bad input."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"undecodable object payload: {exc}") from None


async def send_object(transport: Transport, value: Any, *,
                      header: Mapping[str, Any] | None = None) -> int:
    """Send ``value`` whole as one stream; returns the bytes sent."""
    data = pack_object(value)
    await transport.send_message({**(header or {}), "kind": STREAM_KIND}, data)
    return len(data)


async def receive_object(source: Transport | RecvStream, *,
                         max_size: int = DEFAULT_MAX_OBJECT_BYTES) -> Any:
    """Receive one object sent by :func:`send_object` (the transport's next
    stream, or a stream already accepted); bodies over ``max_size`` bytes are
    refused before they are buffered."""
    stream = source if isinstance(source, RecvStream) else await source.accept_stream()
    if not isinstance(stream.header, dict) or stream.header.get("kind") != STREAM_KIND:
        kind = stream.header.get("kind") if isinstance(stream.header, dict) else None
        error = ManifestError(f"stream {stream.stream_id} carries {kind!r}, not an object")
        await refuse_stream(stream, error)
        raise error
    try:
        data = await stream.read_all(max_size)
    except LocalProtocolError:
        raise PayloadError(f"object on stream {stream.stream_id} is larger than "
                           f"max_size={max_size}; refused") from None
    return unpack_object(data)
