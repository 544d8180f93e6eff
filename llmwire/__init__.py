"""llmwire: move very large model state between machines.

Quantized, streamed, with bounded memory. This module holds the public API
and nothing else; see docs/ for the guides.
"""

from ._version import __version__
from .quant import (
    FORMATS,
    IMPLEMENTATION,
    QuantizedTensor,
    TensorSpec,
    decode_slice,
    dequantize,
    dequantize_state_dict,
    encode_slice_into,
    iter_slices,
    make_spec,
    quantize,
    quantize_state_dict,
)
from .errors import (
    LlmwireError, LocalProtocolError, ManifestError, NonFiniteError, PayloadError,
    ProtocolError, QuantizationError, RemoteProtocolError, TargetMismatch,
    FileIntegrityError, FileTransferError, FileWriteError, ResumeMismatch, SourceChanged,
    TargetExists,
    TransferInterrupted, TransferRefused, UnsafeFileName, CheckpointError, PayloadRefused,
    TargetBusy,
    AuthenticationError, BadPreface, ChecksumMismatch, ConnectionClosed, ConnectionLost,
    FlowControlError, FrameError, FrameTooLarge, HandshakeError, IntegrityError,
    MalformedFrame, PeerError, PeerTimeout, StreamCancelled, StreamClosedError,
    StreamError, StreamTimeout, UnknownFrameType, VersionMismatch,
)
from .payloads import (
    FileResult, receive_file, send_file,
    InPlaceSink, Manifest, MemorySink, SafetensorsSink, ShardedSink, StateDictSink,
    TransferResult,
    iter_state_dict, plan_state_dict, receive_object, receive_state_dict, send_object,
    send_state_dict,
)
from .checkpoints import Checkpoint, FileTensor, open_checkpoint
from .protocol import Settings
from .transport import (
    Message, RecvStream, SendStream, Server, Transport, connect, connect_unix,
    memory_pair, run, serve, serve_unix,
)

__all__ = [
    "__version__",
    "FORMATS",
    "IMPLEMENTATION",
    "QuantizedTensor",
    "TensorSpec",
    "decode_slice",
    "dequantize",
    "dequantize_state_dict",
    "encode_slice_into",
    "iter_slices",
    "make_spec",
    "quantize",
    "quantize_state_dict",
    "LlmwireError",
    "LocalProtocolError",
    "NonFiniteError",
    "ProtocolError",
    "QuantizationError",
    "RemoteProtocolError",
    # wire: errors, settings, transports
    "AuthenticationError", "BadPreface", "ChecksumMismatch", "ConnectionClosed",
    "ConnectionLost", "FlowControlError", "FrameError", "FrameTooLarge", "HandshakeError",
    "IntegrityError", "MalformedFrame", "PeerError", "PeerTimeout", "StreamCancelled",
    "StreamClosedError", "StreamError", "StreamTimeout", "UnknownFrameType",
    "VersionMismatch", "Settings", "Message", "RecvStream", "SendStream", "Server",
    "Transport", "connect", "connect_unix", "memory_pair", "run", "serve", "serve_unix",
    # payloads
    "PayloadError", "ManifestError", "TargetMismatch", "InPlaceSink", "Manifest",
    "MemorySink", "SafetensorsSink", "ShardedSink", "StateDictSink", "TransferResult",
    "iter_state_dict",
    "plan_state_dict", "receive_state_dict", "send_state_dict", "receive_object",
    "send_object", "FileResult", "receive_file", "send_file", "FileIntegrityError",
    "FileTransferError", "FileWriteError", "SourceChanged", "ResumeMismatch", "TargetExists",
    "TransferInterrupted", "TransferRefused", "UnsafeFileName", "CheckpointError",
    "PayloadRefused", "TargetBusy",
    # checkpoint files, read lazily
    "Checkpoint", "FileTensor", "open_checkpoint",
]
