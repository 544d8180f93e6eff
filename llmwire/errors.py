"""llmwire's exceptions: one tree, rooted at :class:`LlmwireError`.

Errors are sorted by *fault* (the caller misused the API, or the peer broke
the protocol) and by *scope* (one frame, one stream, the whole connection).
Where callers would reasonably catch a builtin, the error mixes it in.

.. code-block:: text

    LlmwireError
    ├── QuantizationError (ValueError)       bad dtype, format or option
    │   └── NonFiniteError                   NaN/inf met with nonfinite="raise"
    ├── ProtocolError                        abstract: see its two kinds
    │   ├── LocalProtocolError               you misused the API; nothing changed
    │   └── RemoteProtocolError              the peer broke the protocol
    │       ├── FrameError                   frame scope: one frame is bad
    │       │   ├── FrameTooLarge (ValueError)   declared length over the limit
    │       │   ├── UnknownFrameType         type byte not in the spec
    │       │   ├── MalformedFrame           bad flags, stream id or payload
    │       │   └── ChecksumMismatch         payload xxh3-64 differs
    │       ├── HandshakeError               before authentication
    │       │   ├── BadPreface               not an llmwire peer (bad magic)
    │       │   ├── VersionMismatch          no common protocol version
    │       │   └── AuthenticationError (PermissionError)   wrong secret
    │       ├── FlowControlError             peer overran the credit we granted
    │       ├── StreamClosedError *          data on a closed stream
    │       └── IntegrityError *             end-of-stream digest differs
    ├── StreamError                          stream scope: that stream failed,
    │   │                                    the connection goes on
    │   ├── StreamCancelled                  cancelled (code, reason)
    │   ├── StreamTimeout (TimeoutError)     no progress for progress_timeout
    │   ├── StreamClosedError *
    │   └── IntegrityError *
    │       └── FileIntegrityError **        whole-file digest differs
    ├── ConnectionClosed                     connection scope: it is over
    │   ├── PeerError                        the peer sent ERROR (code, reason)
    │   ├── PeerTimeout (TimeoutError)       nothing heard for idle_timeout
    │   └── ConnectionLost (ConnectionError) transport gone (e.g. mid-frame)
    └── PayloadError                         payload scope: one object, state
        │                                    dict or file transfer failed
        ├── ManifestError (RemoteProtocolError)  peer's manifest invalid
        ├── TargetMismatch (ValueError)      receiving tensors do not fit
        ├── CheckpointError (ValueError)     a checkpoint file is malformed (.path, .entry)
        ├── PayloadRefused                   the receiver refused it before writing
        │   │                                anything (.reason, .remote_error)
        │   └── TransferRefused ***
        └── FileTransferError                file payload: one file failed (.name);
            │                                raised itself when the peer broke the
            │                                file protocol
            ├── TransferRefused ***          the receiver refused the offer (.reason)
            │   ├── UnsafeFileName (ValueError)  absolute, "..", NUL, link, escaping name
            │   ├── TargetExists (FileExistsError)   final file exists, no overwrite
            │   └── TargetBusy               another transfer is receiving that name
            ├── TransferInterrupted          cancel or lost connection mid-file;
            │                                .part kept for resume (.offset)
            ├── FileWriteError (OSError)     receiver's disk write failed (ENOSPC)
            ├── SourceChanged                the sent file changed under the sender
            │   └── ResumeMismatch           a resumed state dict's source is not the
            │                                interrupted transfer's (receiver keeps its part)
            └── FileIntegrityError **

    * listed twice: both a remote violation and a stream-scoped failure.
    ** listed twice: an IntegrityError and a FileTransferError.
    *** listed twice: a PayloadRefused and a FileTransferError.

Every RemoteProtocolError except the two starred ones fails the whole
connection: the sans-I/O :class:`~llmwire.protocol.Connection` is then in
``ConnectionState.ERROR`` and keeps the error in ``.error``.

Each class says, in its docstring, what state the object that raised it is in
afterwards; docs/errors.md collects the same facts in one table.
"""

from __future__ import annotations

__all__ = [
    "LlmwireError",
    "QuantizationError",
    "NonFiniteError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameError", "FrameTooLarge", "UnknownFrameType", "MalformedFrame", "ChecksumMismatch",
    "HandshakeError", "BadPreface", "VersionMismatch", "AuthenticationError",
    "FlowControlError", "StreamError", "StreamClosedError", "IntegrityError",
    "StreamCancelled", "StreamTimeout", "ConnectionClosed", "PeerError",
    "PeerTimeout", "ConnectionLost", "PayloadError", "ManifestError", "TargetMismatch",
    "CheckpointError", "PayloadRefused", "TargetBusy",
    "FileTransferError", "TransferRefused", "UnsafeFileName", "TargetExists",
    "TransferInterrupted", "FileWriteError", "SourceChanged", "ResumeMismatch",
    "FileIntegrityError",
]


class LlmwireError(Exception):
    """Root of every exception llmwire raises on purpose."""


class QuantizationError(LlmwireError, ValueError):
    """A tensor cannot be quantized or restored as asked.

    Raised for an unsupported dtype or format name, a bad option, or a
    :class:`~llmwire.QuantizedTensor` whose parts do not fit together. Nothing
    was allocated for the result; the input is untouched.
    """


class NonFiniteError(QuantizationError):
    """A tensor held NaN or ±inf and ``nonfinite="raise"`` was asked for.

    ``count`` is the number of non-finite elements found (in the slice or
    tensor that was being quantized).
    """

    def __init__(self, count: int, name: str | None = None) -> None:
        self.count = count
        self.name = name
        where = f" in {name!r}" if name else ""
        super().__init__(f"{count} non-finite value(s){where}; "
                         "pass nonfinite='saturate' to quantize them by the documented rule")


class ProtocolError(LlmwireError):
    """Abstract: the connection cannot go on as asked. See the two kinds."""

    def __init__(self, *args: object) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError "
                            "or RemoteProtocolError")
        super().__init__(*args)


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# --- wire protocol (docs/protocol.md, docs/errors.md) -----------------------

class FrameError(RemoteProtocolError):
    """A received frame is invalid. The connection is in ERROR afterwards."""


class FrameTooLarge(FrameError, ValueError):
    """A frame header declared more payload than allowed; nothing was allocated."""

    def __init__(self, length: int, limit: int) -> None:
        self.length, self.limit = length, limit
        super().__init__(f"frame payload of {length} bytes exceeds the limit of {limit}")


class UnknownFrameType(FrameError):
    """A frame header carried a type byte this protocol version does not define."""

    def __init__(self, frame_type: int) -> None:
        self.frame_type = frame_type
        super().__init__(f"unknown frame type 0x{frame_type:02x}")


class MalformedFrame(FrameError):
    """Bad flags, reserved bits, stream id or payload layout in a frame."""


class ChecksumMismatch(FrameError):
    """A frame payload's xxh3-64 differs from the checksum in its header."""

    def __init__(self, stream_id: int, expected: int, actual: int) -> None:
        self.stream_id, self.expected, self.actual = stream_id, expected, actual
        super().__init__(f"frame checksum mismatch on stream {stream_id}: "
                         f"header says {expected:016x}, payload hashes to {actual:016x}")


class HandshakeError(RemoteProtocolError):
    """The handshake failed. The connection is in ERROR; no stream was opened."""


class BadPreface(HandshakeError):
    """The peer's first bytes are not the llmwire preface (not an llmwire peer)."""


class VersionMismatch(HandshakeError):
    """The two sides support no common protocol version (raised on both sides)."""

    def __init__(self, local: tuple[int, int], remote: tuple[int, int]) -> None:
        self.local, self.remote = local, remote
        super().__init__(f"no common protocol version: we speak {local[0]}..{local[1]}, "
                         f"the peer speaks {remote[0]}..{remote[1]}")


class AuthenticationError(HandshakeError, PermissionError):
    """The peer's HMAC proof is wrong: the two sides hold different secrets."""


class FlowControlError(RemoteProtocolError):
    """The peer sent more than the credit granted to it (or overflowed a window)."""


class StreamError(LlmwireError):
    """One stream failed; the connection and its other streams go on.

    ``stream_id`` names the stream. The stream is closed afterwards: no more
    data is delivered on it and sending on it raises LocalProtocolError.
    """

    def __init__(self, stream_id: int, message: str) -> None:
        self.stream_id = stream_id
        super().__init__(f"stream {stream_id}: {message}")


class StreamClosedError(RemoteProtocolError, StreamError):
    """The peer sent data or an end on a stream that was already closed."""


class IntegrityError(RemoteProtocolError, StreamError):
    """The end-of-stream digest (or length) differs from what arrived."""

    def __init__(self, stream_id: int, expected: str, actual: str) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(stream_id, f"integrity check failed: sender's digest {expected}, "
                                    f"received data hashes to {actual}")


class StreamCancelled(StreamError):
    """The stream was cancelled, by the peer (``remote=True``) or locally."""

    def __init__(self, stream_id: int, code: int, reason: str, remote: bool = True) -> None:
        self.code, self.reason, self.remote = code, reason, remote
        who = "peer" if remote else "local side"
        super().__init__(stream_id, f"cancelled by the {who} (code {code}: {reason or '-'})")


class StreamTimeout(StreamError, TimeoutError):
    """A stream with credit outstanding received nothing for ``progress_timeout``."""


class ConnectionClosed(LlmwireError):
    """The connection is over; ``cause`` holds the error that ended it, if any."""

    def __init__(self, message: str = "connection closed", cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message if cause is None else f"{message}: {cause}")


class PeerError(ConnectionClosed):
    """The peer ended the connection with an ERROR frame (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"peer closed the connection with error code {code} ({reason or '-'})")


class PeerTimeout(ConnectionClosed, TimeoutError):
    """Nothing was heard from the peer for ``idle_timeout`` (or the handshake took too long)."""


class ConnectionLost(ConnectionClosed, ConnectionError):
    """The byte stream ended without a GOAWAY (for instance in the middle of a frame)."""


class PayloadError(LlmwireError):
    """A payload (object, state dict or file) could not be sent or received.

    The stream that carried it is over (cancelled if it was still open); the
    connection and its other streams go on. Nothing is presented as complete:
    no dict is returned, no file is renamed into place.
    """


class ManifestError(PayloadError, RemoteProtocolError):
    """The peer's description of a payload (a state-dict manifest, an object
    or file header) is malformed, inconsistent or over a limit. Raised before
    any of the payload's data is written anywhere."""


class TargetMismatch(PayloadError, ValueError):
    """The tensors asked to receive a state dict in place do not fit what the
    sender announced (a missing or unexpected name, another shape or dtype).
    Raised after the manifest and before any tensor is touched."""


class CheckpointError(PayloadError, ValueError):
    """A checkpoint file (``.safetensors``, torch) is malformed or cannot be sent.

    ``path`` is the file, ``entry`` the tensor at fault (or None), ``reason``
    what is wrong. The message is one line. Raised by
    :func:`~llmwire.open_checkpoint` before anything is sent.
    """

    def __init__(self, path: str, reason: str, entry: str | None = None) -> None:
        self.path, self.reason, self.entry = str(path), reason, entry
        where = f"{self.path}: " + (f"entry {entry!r:.200}: " if entry is not None else "")
        super().__init__(" ".join((where + reason).split()))


class PayloadRefused(PayloadError):
    """The receiver refused a payload before writing anything of it.

    ``reason`` is the receiver's, ``remote_error`` the name of the error it
    raised (e.g. ``"TargetMismatch"``), when it said. The connection goes on.
    """

    def __init__(self, reason: str, remote_error: str | None = None) -> None:
        self.reason, self.remote_error = reason, remote_error
        super().__init__(f"the receiver refused it: {reason}")


# --- file payload (docs/streaming.md, llmwire/payloads/files.py) --------------

class FileTransferError(PayloadError):
    """One file transfer failed; the connection goes on (unless it is what failed).

    Subclasses say why. Raised itself when the peer broke the file protocol
    (an unexpected message, more bytes than offered). Nothing is ever left at
    the final name unless its whole-file digest matched.
    """

    name: str | None = None


class TransferRefused(FileTransferError, PayloadRefused):
    """The receiver refused a file offer (``name``, ``reason``); nothing was written.

    ``send_file`` raises it with the receiver's reason; ``receive_file`` raises
    it (or the subclass saying why) after telling the sender.
    """

    def __init__(self, name: str | None, reason: str, remote_error: str | None = None) -> None:
        self.name, self.reason, self.remote_error = name, reason, remote_error
        Exception.__init__(self, f"file {name!r} refused: {reason}")


class UnsafeFileName(TransferRefused, ValueError):
    """The offered name is absolute, has ``..``/empty/``.`` parts, NUL or control
    characters, a drive prefix, or passes through a symlink below the target
    directory (links are never followed; a planted ``<name>.part`` link
    included). Nothing was written."""


class TargetExists(TransferRefused, FileExistsError):
    """The final file exists and ``overwrite`` was not asked for. Nothing was written."""


class TargetBusy(TransferRefused):
    """Another transfer is receiving the same name right now (it holds the
    lock on ``<name>.part``). Nothing was written; try again once it ended."""

    def __init__(self, name: str | None, reason: str = "") -> None:
        super().__init__(name, reason or "another transfer is receiving this name right now "
                                         "(its .part is locked); try again when it has ended")


class TransferInterrupted(FileTransferError):
    """The file stream was cancelled (by either side) or the connection was lost.

    On the receiver, ``<name>.part`` and ``<name>.part.json`` hold the first
    ``offset`` bytes (fsynced): sending the same file again resumes there. On
    the sender, ``offset`` is how far it had sent. ``reason`` says what happened.
    """

    def __init__(self, name: str | None, offset: int, reason: str) -> None:
        self.name, self.offset, self.reason = name, offset, reason
        super().__init__(f"transfer of {name!r} interrupted at byte {offset}: {reason}")


class FileWriteError(FileTransferError, OSError):
    """The receiver could not write the file (disk full, I/O error...).

    ``errno``, ``strerror`` and ``filename`` are the OSError's. The stream was
    cancelled (the sender gets TransferInterrupted with this reason). The
    ``.part`` is kept for resume when its checkpoint could still be written,
    otherwise it and its sidecar are removed.
    """

    def __init__(self, name: str | None, error: OSError) -> None:
        self.name = name
        self.reason = str(error.strerror or error)  # the OSError's own words
        super().__init__(error.errno, f"cannot write received file {name!r}: "
                                      f"{self.reason}", error.filename)

    def __str__(self) -> str:
        return str(self.strerror)


class SourceChanged(FileTransferError):
    """The file being sent (a file, or the checkpoint a state dict is read
    from) changed while it was sent: its size, mtime, ctime or inode differ
    from when the send began, or it ended early. The stream was cancelled
    before its end, so the receiver keeps nothing of it."""

    def __init__(self, name: str | None, reason: str) -> None:
        self.name = name
        super().__init__(f"file {name!r} changed while being sent: {reason}")


class ResumeMismatch(SourceChanged):
    """A resumable state-dict send found, at the receiver, the landed part of
    an interrupted transfer of the same manifest whose source was another
    version: the fingerprint (a checkpoint's files' identity) differs, or the
    slices before the boundary encode to other bytes than those landed. The
    stream was cancelled before any new byte was sent; the receiver keeps
    what it holds for the original source. Send with ``restart=True``
    (``llmwire send --restart``) to discard it and start over."""

    def __init__(self, name: str | None, reason: str) -> None:
        self.name = name
        FileTransferError.__init__(self, f"{name or 'the state dict'}: cannot resume: {reason}")


class FileIntegrityError(IntegrityError, FileTransferError):
    """The whole-file xxh3-128 digests of sender and receiver differ.

    Raised on both sides. The receiver removed ``<name>.part`` and its sidecar
    (the data is bad); nothing is at the final name.
    """

    def __init__(self, stream_id: int, name: str | None, expected: str, actual: str) -> None:
        self.name = name
        super().__init__(stream_id, expected, actual)
        self.args = (f"file {name!r}: " + self.args[0],)
