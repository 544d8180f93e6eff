"""A receiver's verdict on a payload, and the error a sender raises for it.

Every payload that lands somewhere (a file, a state dict) ends with the
receiver telling the sender what happened, so a sender never returns as if
done when the receiver refused or failed. A failure travels as a few header
fields (docs/streaming.md, "Verdicts")::

    {"error": "TargetMismatch",       # the receiver's exception class
     "category": "refused",           # refused | integrity | write | cancelled | error
     "reason": "...",                 # its message, one line, at most 500 characters
     "errno": 28}                     # write failures only: the OSError's errno

and :func:`raise_failure` turns them back into the exception the sender
raises: the same refusal classes the receiver raised (``TargetExists``,
``TargetBusy``, ``UnsafeFileName``) or :class:`~llmwire.PayloadRefused`,
``IntegrityError`` (``FileIntegrityError`` for files), ``FileWriteError``
(an ``OSError`` with the receiver's errno), ``StreamCancelled``, or
:class:`~llmwire.PayloadError`.
"""

from __future__ import annotations

import asyncio
import errno as errno_codes
from typing import Any, NoReturn

from ..errors import (
    ConnectionClosed, FileIntegrityError, FileTransferError, FileWriteError, IntegrityError,
    LocalProtocolError, ManifestError, PayloadError, PayloadRefused, SourceChanged,
    StreamCancelled, StreamError, TargetBusy, TargetExists, TargetMismatch, TransferRefused,
    UnsafeFileName,
)
from ..transport.base import RecvStream, Transport

__all__ = ["failure_fields", "category_of", "raise_failure", "receive_control", "send_control",
           "refuse_stream", "FAILED_REPLY",
           "CATEGORIES", "MAX_CONTROL", "REPLY_WAIT", "QUEUED_REPLY_WAIT"]

CATEGORIES = ("refused", "integrity", "write", "cancelled", "changed", "error")
#: control messages carry everything in their header
MAX_CONTROL = 64 * 1024
#: seconds a side waits for the peer's reason after a stream was cancelled
REPLY_WAIT = 10.0
#: seconds a sender waits for a reason its peer sent *before* cancelling the
#: stream (it arrived first, so this only covers the event loop's turns)
QUEUED_REPLY_WAIT = 1.0
_MAX_REASON = 500
#: stream kinds whose sender waits for a verdict -> the kind of a failed one
FAILED_REPLY = {"state_dict": "state_dict-failed"}
_REFUSALS: dict[str, type[TransferRefused]] = {
    cls.__name__: cls for cls in (TransferRefused, UnsafeFileName, TargetExists, TargetBusy)}


def category_of(exc: BaseException) -> str:
    """Which kind of failure ``exc`` is, as a sender sees it."""
    if isinstance(exc, (PayloadRefused, TargetMismatch, ManifestError)):
        return "refused"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, SourceChanged):
        return "changed"
    if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)):
        return "write"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, StreamCancelled)):
        return "cancelled"
    return "error"


def _reason_of(exc: BaseException) -> str:
    if isinstance(exc, PayloadRefused):
        text = exc.reason
    elif isinstance(exc, FileWriteError):
        text = exc.reason
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    elif isinstance(exc, GeneratorExit):
        text = "the receiver stopped reading"
    elif isinstance(exc, asyncio.CancelledError):
        text = "the receiver was cancelled"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:_MAX_REASON]


def failure_fields(exc: BaseException) -> dict[str, Any]:
    """The header fields that tell a sender why a payload failed."""
    # a refusal may name its own kind (e.g. "StaleRound") for the sender
    kind = getattr(exc, "remote_error", None) if isinstance(exc, PayloadRefused) else None
    fields: dict[str, Any] = {"error": kind or type(exc).__name__, "category": category_of(exc),
                              "reason": _reason_of(exc)}
    if fields["category"] == "write" and isinstance(exc, OSError) and exc.errno:
        fields["errno"] = int(exc.errno)
    if isinstance(exc, IntegrityError):
        fields["expected"], fields["actual"] = str(exc.expected), str(exc.actual)
    return fields


def raise_failure(fields: Any, *, name: str | None, stream_id: int, file: bool,
                  cause: BaseException | None = None) -> NoReturn:
    """Raise, on the sender, the error a receiver's failure fields describe.

    ``file`` picks file-flavoured errors (``TransferRefused``,
    ``FileIntegrityError``, ``FileTransferError``) over state-dict ones.
    """
    fields = fields if isinstance(fields, dict) else {}
    category = fields.get("category")
    reason = str(fields.get("reason") or "-")[:_MAX_REASON]
    remote = fields.get("error") if isinstance(fields.get("error"), str) else None
    exc: BaseException
    if category == "refused":
        refusal = _REFUSALS.get(remote or "")
        if refusal is not None and refusal is not TransferRefused and name is not None:
            exc = refusal(name, reason)
            exc.remote_error = remote
        elif file:
            exc = TransferRefused(name, reason, remote)
        else:
            exc = PayloadRefused(reason, remote)
    elif category == "integrity":
        expected = str(fields.get("expected", "?"))
        actual = str(fields.get("actual", reason))
        exc = (FileIntegrityError(stream_id, name, expected, actual) if file
               else IntegrityError(stream_id, expected, actual))
        if fields.get("reason"):  # its own words say what failed where
            where = f"file {name!r}: " if file else ""
            exc.args = (f"{where}the receiver's integrity check failed: {reason}",)
    elif category == "write":
        code = fields.get("errno")
        code = code if type(code) is int and code > 0 else errno_codes.EIO
        exc = FileWriteError(name, OSError(code, f"on the receiver: {reason}"))
    elif category == "cancelled":
        exc = StreamCancelled(stream_id, 10, reason, remote=True)
    else:
        where = f"file {name!r}" if file else (f"state dict {name!r}" if name else "state dict")
        message = f"{where}: the receiver failed: {reason}"
        exc = FileTransferError(message) if file else PayloadError(message)
    if cause is not None:
        raise exc from cause
    raise exc


async def send_control(transport: Transport, kind: str, **fields: Any) -> None:
    """Send one control message (a stream with an empty body; all in its header)."""
    await transport.send_message({"kind": kind, **fields})


async def receive_control(transport: Transport, kinds: tuple[str, ...], key: str, *,
                          what: str, stream: RecvStream | None = None,
                          error: type[PayloadError] = PayloadError) -> dict[Any, Any]:
    """The next control message, which must be one of ``kinds`` for id ``key``.

    Anything else raises ``error`` (the peer broke the payload protocol).
    """
    if stream is None:
        msg = await transport.receive_message(MAX_CONTROL)
        header = msg.header
    else:
        await stream.read_all(MAX_CONTROL)
        header = stream.header
    if not isinstance(header, dict) or header.get("kind") not in kinds \
            or header.get("id") != key:
        got = header.get("kind") if isinstance(header, dict) else type(header).__name__
        raise error(f"{what}: expected a {' or '.join(kinds)} message for id {key}, "
                    f"got {got!r}")
    return header


async def reply_quietly(transport: Transport | None, kind: str, **fields: Any) -> None:
    """Best effort, bounded: the connection may be gone, or never drain."""
    if transport is None or transport.is_closed:
        return
    try:
        await asyncio.wait_for(send_control(transport, kind, **fields), REPLY_WAIT)
    except (asyncio.TimeoutError, ConnectionClosed, StreamError, LocalProtocolError):
        pass


async def refuse_stream(stream: RecvStream, error: BaseException, *,
                        transport: Transport | None = None) -> None:
    """Refuse a stream without reading it: if its sender waits for a verdict
    (a state dict), tell it why first, then cancel the stream. Any receiver
    that turns a stream away uses this, so no sender waits for ever."""
    header = stream.header if isinstance(stream.header, dict) else {}
    reply = FAILED_REPLY.get(header.get("kind")) if isinstance(header.get("id"), str) else None
    if reply is not None:
        await reply_quietly(transport or stream.transport, reply, id=header["id"],
                            **failure_fields(error))
    try:
        await stream.cancel(reason=_reason_of(error)[:200])
    except (ConnectionClosed, StreamError):
        pass
