"""Hugging Face sharded checkpoints: the index file, shard names, the shard plan.

A model directory as ``transformers`` writes it holds its weights either in
one ``model.safetensors`` or in shards ``model-00001-of-00004.safetensors``
... with an index ``model.safetensors.index.json``::

    {"metadata": {"total_size": <bytes of all tensors>},
     "weight_map": {"<tensor name>": "<shard file name>", ...}}

(torch checkpoints the same way: ``pytorch_model.bin`` or
``pytorch_model-00001-of-00002.bin`` with ``pytorch_model.bin.index.json``).
This module reads and checks an index (:func:`read_index`), finds the weights
of a directory (:func:`weights_of`), and plans the shards a state dict is
written as (:func:`plan_shards`, Hugging Face's rule: tensors in order, a new
shard when the next tensor would take the current one over the limit, a
tensor larger than the limit alone in its shard). Reading and writing the
shards themselves is :mod:`llmwire.checkpoints` and
:mod:`llmwire.payloads.shards`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import CheckpointError

__all__ = ["SAFETENSORS_INDEX", "SAFETENSORS_WEIGHTS", "TORCH_INDEX", "TORCH_WEIGHTS",
           "DEFAULT_MAX_SHARD_SIZE", "MAX_INDEX_BYTES", "Weights", "weights_of", "read_index",
           "plan_shards", "shard_name", "index_bytes", "parse_size"]

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
#: transformers' own default for ``save_pretrained(max_shard_size=...)`` (5.x)
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9
#: an index larger than this is refused before it is parsed
MAX_INDEX_BYTES = 64 * 1024 * 1024
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"500MiB"`` -> 500 * 2**20, ``123`` -> 123 (as
    ``transformers`` reads ``max_shard_size``); ValueError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"expected a size such as 5GB or 500MiB, got {text!r}")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"the size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class Weights:
    """Where a model directory keeps its weights: ``format`` ("safetensors"
    or "torch"), ``index`` (the index file's path, None for one file) and
    ``files`` (the weight files, in the order they are read)."""

    format: str
    index: str | None
    files: tuple[str, ...]


def weights_of(directory: str) -> Weights:
    """The weights of a model directory: a safetensors index, else one
    ``model.safetensors``, else a torch index, else one ``pytorch_model.bin``.
    :class:`~llmwire.CheckpointError` if it holds none of them."""
    for fmt, index, single in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS),
                               ("torch", TORCH_INDEX, TORCH_WEIGHTS)):
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            shards = read_index(index_path)[1]
            return Weights(fmt, index_path, tuple(os.path.join(directory, s) for s in shards))
        single_path = os.path.join(directory, single)
        if os.path.isfile(single_path):
            return Weights(fmt, None, (single_path,))
    raise CheckpointError(directory, f"a directory without model weights (no {SAFETENSORS_INDEX}, "
                                     f"{SAFETENSORS_WEIGHTS}, {TORCH_INDEX} or {TORCH_WEIGHTS})")


def read_index(path: str) -> tuple[dict[str, str], list[str]]:
    """Read and check an index: returns its weight map (tensor name -> shard
    file name) and the shard names in order (sorted, as ``transformers``
    numbers them). A shard name must be a plain file name in the index's
    directory (no ``/``, ``..`` or hidden name), and it must exist."""
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(path, f"an index of {size} bytes, over the limit of "
                                        f"{MAX_INDEX_BYTES}")
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"the index is not valid JSON ({exc})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(path, "the index has no weight_map (a map of tensor names to "
                                    "shard files)")
    directory = os.path.dirname(path)
    shards: set[str] = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard \
                or shard.startswith(".") or "\x00" in shard:
            raise CheckpointError(path, f"the shard {shard!r:.100} is not a file name in the "
                                        "index's directory", name)
        shards.add(shard)
    ordered = sorted(shards)
    for shard in ordered:
        if not os.path.isfile(os.path.join(directory, shard)):
            raise CheckpointError(path, f"the shard {shard!r} it names is missing")
    return dict(weight_map), ordered


def shard_name(number: int, count: int, stem: str = "model", suffix: str = ".safetensors"
               ) -> str:
    """``model-00002-of-00005.safetensors`` (1-based), as ``transformers`` names shards;
    one shard is ``model.safetensors``."""
    if count == 1:
        return stem + suffix
    return f"{stem}-{number:05d}-of-{count:05d}{suffix}"


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group tensors (name, bytes, in order) into shards of at most
    ``max_shard_size`` bytes each; a larger tensor gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def index_bytes(shards: Sequence[tuple[str, Sequence[str]]], total_size: int) -> bytes:
    """The index file for ``shards`` ((file name, tensor names) in order), as
    ``transformers`` writes it: the weight map sorted by tensor name."""
    weight_map = {name: file for file, names in shards for name in names}
    body = {"metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(body, indent=2, sort_keys=False) + "\n").encode()
