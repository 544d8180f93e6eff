"""Payloads: objects, state dicts (container streaming) and files, over a
:class:`~llmwire.Transport`; sinks that place what arrives."""

from .files import FileResult, receive_file, send_file
from .manifest import Entry, Manifest
from .objects import pack_object, receive_object, send_object, unpack_object
from .filesinks import SafetensorsSink, ShardedSink
from .sinks import InPlaceSink, MemorySink, StateDictSink
from .statedict import (
    TransferResult, iter_state_dict, plan_state_dict, receive_state_dict, send_state_dict,
)

__all__ = [
    "Entry", "Manifest", "InPlaceSink", "MemorySink", "SafetensorsSink", "ShardedSink",
    "StateDictSink",
    "TransferResult", "iter_state_dict", "plan_state_dict", "receive_state_dict",
    "send_state_dict", "pack_object", "receive_object", "send_object", "unpack_object",
    "FileResult", "receive_file", "send_file",
]
