"""Checkpoints, read lazily: ``.safetensors``, torch checkpoints, and
Hugging Face model directories of sharded files with an index.

:func:`open_checkpoint` reads a checkpoint's *layout* (names, dtypes, shapes,
where each tensor's bytes lie in the file) and nothing else. Its values are
:class:`FileTensor` objects that :func:`~llmwire.send_state_dict` streams
slice by slice, reading each slice with ``pread`` into a reused buffer: a
checkpoint of any size costs the sender a few slices of memory, the file is
never mapped (so a file that shrinks meanwhile is an error, not SIGBUS), and
before the stream ends the sender checks that the file did not change
(:class:`~llmwire.SourceChanged` otherwise; see :mod:`llmwire.payloads.source`).

A ``.safetensors`` header is checked against the format's specification
before anything is read: 8-byte little-endian header length (at most
100,000,000 and inside the file), a UTF-8 JSON object starting with ``{``
(trailing spaces allowed), no duplicate keys, ``__metadata__`` a map of
strings, each tensor a known dtype, a shape of at most 64 non-negative
integer dimensions, ``data_offsets`` two integers whose range holds exactly
``numel * itemsize`` bytes, and the tensors tiling the data region exactly
(no holes, no overlaps, nothing after the last). Anything else raises
:class:`~llmwire.CheckpointError` naming the file and the entry.

Torch checkpoints (``torch.save``'s zip format) are read with
``torch.load(map_location="meta", weights_only=True)``, which gives every
storage's offset in the file without reading its data. Legacy (non-zip)
checkpoints cannot be read lazily and are loaded into memory.

A directory (or its ``*.index.json``) is a sharded checkpoint
(:mod:`llmwire.sharding`): every shard is opened as above, its tensors must be
exactly those the index maps to it, and the tensors come shard by shard in
the shards' order (each file read front to back), under the names of the
index. Nothing is mapped, so memory stays at a few slices whatever the
checkpoint's size, also on tmpfs, where mapped pages would all be resident.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import threading
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import CheckpointError, SourceChanged
from .payloads.source import FileIdentity, check_unchanged, read_or_changed
from .tensors import DTYPES, TensorView, torch_module

__all__ = ["open_checkpoint", "checkpoint_kind", "Checkpoint", "FileTensor",
           "SAFETENSORS_DTYPES", "MAX_SAFETENSORS_HEADER", "MAX_DIMS"]

#: safetensors dtype tag -> llmwire dtype name (the tags llmwire can send)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                      "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                      "BOOL": "bool"}
#: tags the format defines that llmwire does not send as tensors
_OTHER_SAFETENSORS_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2",
                                       "F4", "C64"})
#: the reference implementation's limit on the JSON header
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_DIMS = 64
_MAX_ELEMENTS = 1 << 62
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def checkpoint_kind(path: str | os.PathLike[str]) -> str | None:
    """``"safetensors"``, ``"torch"``, ``"sharded"`` or None (not a checkpoint
    by its name and magic).

    ``.safetensors`` by name; ``.pt``/``.pth`` by name; ``.bin`` only when it
    starts like a torch checkpoint (a zip archive, or a legacy pickle);
    ``"sharded"`` for a directory or a ``*.index.json`` file.
    """
    lower = os.fspath(path).lower()
    if lower.endswith(".index.json") or os.path.isdir(path):
        return "sharded"
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith((".pt", ".pth")):
        return "torch"
    if lower.endswith(".bin"):
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            return "torch"  # let the loader say why it is unreadable
        if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
            return "torch"
    return None


class _File:
    """One open checkpoint file: reads at offsets, and says whether it changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(path, "not a regular file")
            self.identity = FileIdentity.of(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.identity.size

    def read(self, view: Any, offset: int) -> None:
        fd = self.fd
        if fd < 0:
            raise CheckpointError(self.path, "the checkpoint was closed")
        read_or_changed(fd, view, offset, self.path)

    def check_unchanged(self) -> None:
        if self.fd >= 0:
            check_unchanged(self.fd, self.identity, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class FileTensor:
    """A tensor whose bytes lie in a checkpoint file, read only when needed.

    ``dtype`` (llmwire's name, e.g. ``"bfloat16"``), ``shape``, ``numel`` and
    ``nbytes`` describe it; :meth:`load` reads it into memory. Handing it to
    :func:`~llmwire.send_state_dict` streams it slice by slice instead.
    ``strides`` (in elements) are None for a contiguous tensor.
    """

    __slots__ = ("file", "name", "dtype", "shape", "offset", "strides", "span", "storage")

    def __init__(self, file: _File, name: str, dtype: str, shape: tuple[int, ...],
                 offset: int, strides: tuple[int, ...] | None = None, span: int = 0,
                 storage: tuple[int, int] | None = None) -> None:
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.offset = offset          # file offset of element 0 (of the storage span)
        self.strides = strides        # None: contiguous
        self.span = span              # strided: elements of storage the tensor spans
        # the stored region the tensor is a view of, (file offset, bytes):
        # tensors of one storage share it
        self.storage = storage if storage is not None else (offset, self.nbytes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def __repr__(self) -> str:
        return (f"FileTensor({self.name!r}, {self.dtype}, {self.shape}, "
                f"{self.file.path!r} @ {self.offset})")

    def _read_array(self) -> np.ndarray:
        """The values as a NumPy array (bfloat16 as uint16 bits), read now."""
        info = DTYPES[self.dtype]
        if self.strides is None:
            out = np.empty(self.numel, info.numpy)
            self.file.read(out.view(np.uint8), self.offset)
            return out.reshape(self.shape)
        storage = np.empty(self.span, info.numpy)
        self.file.read(storage.view(np.uint8), self.offset)
        itemsize = info.itemsize
        return np.lib.stride_tricks.as_strided(
            storage, self.shape, tuple(s * itemsize for s in self.strides), writeable=False)

    def load(self, container: str = "torch") -> Any:
        """Read the tensor into memory: a torch tensor (``container="torch"``)
        or a NumPy array (bfloat16 as uint16 bit patterns)."""
        array = self._read_array()
        self.file.check_unchanged()  # one version of the file, not a torn mix
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray makes scalars 1-d)
        if container == "numpy":
            return array
        torch = torch_module()
        if torch is None:
            raise CheckpointError(self.file.path, "torch is not installed", self.name)
        if self.dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    def _llmwire_view(self) -> "FileTensorView":
        return FileTensorView(self)


class FileTensorView:
    """How the state-dict sender sees a :class:`FileTensor` (like a
    :class:`~llmwire.tensors.TensorView` with no memory of its own)."""

    container = "file"
    flat = None
    array = None

    def __init__(self, tensor: FileTensor) -> None:
        self.source = tensor
        self.owner = tensor.file
        self.dtype = tensor.dtype
        self.shape = tensor.shape
        self.numel = tensor.numel
        self._itemsize = DTYPES[tensor.dtype].itemsize
        self._strided: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def storage_key(self) -> tuple[Any, ...]:
        t = self.source
        return ("file", id(t.file), t.offset, t.shape, t.strides, t.dtype)

    def check_unchanged(self) -> None:
        self.owner.check_unchanged()

    def slice(self, start: int, stop: int, scratch: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` as a contiguous 1-D array in ``scratch``
        (bytes, at least ``(stop - start) * itemsize``; a new array without
        it), read from the file. A strided tensor's storage span is read
        once, at its first slice, and dropped after its last."""
        info = DTYPES[self.dtype]
        nbytes = (stop - start) * self._itemsize
        out = scratch[:nbytes] if scratch is not None else np.empty(nbytes, np.uint8)
        if self.source.strides is not None:
            out.view(info.numpy)[...] = self._strided_slice(start, stop)
        else:
            self.source.file.read(out, self.source.offset + start * self._itemsize)
        return out.view(info.numpy)

    def _strided_slice(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            array = self._strided
            if array is None:
                array = self._strided = self.source._read_array()
            if stop >= self.numel:
                self._strided = None
        view = TensorView(array, self.dtype, self.shape, "numpy", array)
        return view.slice(start, stop)


class Checkpoint(Mapping[str, Any]):
    """A checkpoint opened lazily: a mapping of names to :class:`FileTensor`
    (or, for legacy torch files, tensors in memory), in the file's order.

    ``path``, ``format`` (``"safetensors"`` or ``"torch"``) and ``metadata``
    (safetensors' ``__metadata__``, else empty) describe it. Close it (or use
    it as a context manager) to release the file; tensors read after that
    raise :class:`~llmwire.CheckpointError`.
    """

    def __init__(self, path: str, format: str, tensors: dict[str, Any],
                 metadata: dict[str, str], files: list[_File]) -> None:
        self.path, self.format, self.metadata = path, format, metadata
        #: the files the tensors are read from (one, or a sharded checkpoint's shards)
        self.shards: tuple[str, ...] = (path,)
        self._tensors = tensors
        self._files = files

    def __getitem__(self, name: str) -> Any:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (tied ones once per name)."""
        return sum(DTYPES[_dtype_of(t)].itemsize * _numel_of(t) for t in self._tensors.values())

    def distinct(self) -> list[Any]:
        """The tensors, each stored run of elements once: a weight tied under
        two names counts once, even when one name holds it transposed."""
        seen: dict[Any, Any] = {}
        for name, tensor in self._tensors.items():
            if isinstance(tensor, FileTensor) and tensor.numel:
                key: tuple[Any, ...] = ("file", id(tensor.file), tensor.offset, tensor.numel,
                                        tensor.dtype)
            elif not isinstance(tensor, FileTensor) and tensor.numel():
                key = ("memory", tensor.untyped_storage().data_ptr(),
                       tensor.storage_offset(), tensor.numel(), tensor.dtype)
            else:
                key = ("name", name)
            seen.setdefault(key, tensor)
        return list(seen.values())

    def load(self) -> dict[str, Any]:
        """Every tensor read into memory as torch tensors, in order. Tensors
        that are views of one storage in the file (tied weights, a transpose,
        a slice) are views of one storage in memory too, with their strides."""
        torch = torch_module()
        if torch is None:
            raise CheckpointError(self.path, "torch is not installed")
        storages: dict[tuple[int, int, int], Any] = {}  # (file, offset, bytes): a shard's
        out = {}
        for name, tensor in self._tensors.items():
            if not isinstance(tensor, FileTensor):
                out[name] = tensor
                continue
            if not tensor.numel:
                out[name] = tensor.load()
                continue
            key = (id(tensor.file), *tensor.storage)
            storage = storages.get(key)
            if storage is None:
                start, nbytes = tensor.storage
                data = np.empty(nbytes, np.uint8)
                tensor.file.read(data, start)
                storage = storages[key] = torch.from_numpy(data).untyped_storage()
            itemsize = DTYPES[tensor.dtype].itemsize
            strides = tensor.strides
            if strides is None:
                strides = tuple(int(np.prod(tensor.shape[i + 1:], dtype=np.int64))
                                for i in range(len(tensor.shape)))
            out[name] = torch.empty(0, dtype=getattr(torch, tensor.dtype)).set_(
                storage, (tensor.offset - tensor.storage[0]) // itemsize, tensor.shape, strides)
        self.check_unchanged()  # what was read is one version of the file, not a torn mix
        return out

    def fingerprint(self) -> str:
        """The identity of the files as opened (device, inode, size, mtime,
        ctime of each): a resumed send compares it with the interrupted one's."""
        import xxhash

        ids = [[f.path.rsplit(os.sep, 1)[-1], *dataclasses.astuple(f.identity)]
               for f in self._files]
        return xxhash.xxh3_128_hexdigest(json.dumps(ids).encode())

    def check_unchanged(self) -> None:
        """Raise :class:`~llmwire.SourceChanged` if a file changed since it was opened."""
        for file in self._files:
            file.check_unchanged()

    def close(self) -> None:
        for file in self._files:
            file.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {self.format}, {len(self)} tensors)"


def _dtype_of(value: Any) -> str:
    if isinstance(value, FileTensor):
        return value.dtype
    return str(value.dtype).removeprefix("torch.")


def _numel_of(value: Any) -> int:
    return value.numel if isinstance(value, FileTensor) else int(value.numel())


def open_checkpoint(path: str | os.PathLike[str], format: str | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file, a torch checkpoint, or a model directory
    (sharded with an index, or one weights file) without reading its data.

    ``format`` (``"safetensors"``, ``"torch"`` or ``"sharded"``) defaults to
    what :func:`checkpoint_kind` says of the path. A sharded checkpoint's
    ``format`` is that of its shards and its ``shards`` the shard paths. A
    torch checkpoint holding
    ``{"state_dict": {...}}`` or ``{"model": {...}}`` gives the inner dict.
    Raises :class:`~llmwire.CheckpointError` for a malformed file or one that
    holds no state dict, ``OSError`` for one that cannot be read.
    """
    fspath = os.fspath(path)
    kind = format or checkpoint_kind(fspath)
    if kind == "safetensors":
        return _open_safetensors(fspath)
    if kind == "torch":
        return _open_torch(fspath)
    if kind == "sharded":
        return _open_sharded(fspath)
    raise CheckpointError(fspath, "not a checkpoint (.safetensors, a torch .pt/.pth/.bin, or "
                                  "a model directory)")


# ---------------------------------------------------------------- sharded


def _open_sharded(path: str) -> Checkpoint:
    from .sharding import read_index, weights_of

    if os.path.isdir(path):
        weights = weights_of(path)
        if weights.index is None:  # one weights file in a model directory
            single = open_checkpoint(weights.files[0], weights.format)
            single.shards = weights.files
            return single
        index, fmt = weights.index, weights.format
    else:
        index, fmt = path, "torch" if path.lower().endswith(".bin.index.json") else "safetensors"
    weight_map, shards = read_index(index)
    directory = os.path.dirname(index)
    opened: list[Checkpoint] = []
    tensors: dict[str, Any] = {}
    try:
        for shard in shards:
            part = open_checkpoint(os.path.join(directory, shard), fmt)
            opened.append(part)
            mapped = {name for name, file in weight_map.items() if file == shard}
            extra = [name for name in part if name not in mapped]
            if extra:
                raise CheckpointError(part.path, f"holds {len(extra)} tensor(s) the index does "
                                                 f"not map to it", extra[0])
            missing = sorted(mapped.difference(part))
            if missing:
                raise CheckpointError(part.path, f"lacks {len(missing)} tensor(s) the index "
                                                 f"maps to it", missing[0])
            tensors.update(part._tensors)
    except BaseException:
        for part in opened:
            part.close()
        raise
    metadata = opened[0].metadata if opened else {}
    files = [f for part in opened for f in part._files]
    checkpoint = Checkpoint(index, fmt, tensors, metadata, files)
    checkpoint.shards = tuple(part.path for part in opened)
    return checkpoint


# ---------------------------------------------------------------- safetensors


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object as parsed; ``duplicate`` is a key it held twice (or None)."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object()
    for key, value in pairs:
        if key in out and out.duplicate is None:
            out.duplicate = key
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _open_safetensors(path: str) -> Checkpoint:
    file = _File(path)
    try:
        tensors, metadata = _safetensors_layout(file)
    except SourceChanged as exc:
        file.close()
        raise CheckpointError(path, f"the file changed while its header was read: {exc}"
                              ) from None
    except BaseException:
        file.close()
        raise
    return Checkpoint(path, "safetensors", tensors, metadata, [file])


def _safetensors_layout(file: _File) -> tuple[dict[str, FileTensor], dict[str, str]]:
    path, size = file.path, file.size

    def bad(reason: str, entry: str | None = None) -> CheckpointError:
        return CheckpointError(path, reason, entry)

    if size < 8:
        raise bad(f"not a safetensors file: {size} bytes, shorter than the 8-byte header "
                  "length")
    head = bytearray(8)
    file.read(head, 0)
    length = int.from_bytes(head, "little")
    if length == 0:
        raise bad("not a safetensors file: the header length is 0")
    if length > MAX_SAFETENSORS_HEADER:
        raise bad(f"not a safetensors file: header length {length} is over the format's limit of "
                  f"{MAX_SAFETENSORS_HEADER} bytes")
    if 8 + length > size:
        raise bad(f"not a safetensors file: header length {length} runs past the end of the "
                  f"file ({size} bytes)")
    raw = bytearray(length)
    file.read(raw, 8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the header is not UTF-8") from None
    if not text.startswith("{"):
        raise bad("the header does not start with '{'")
    if not text.rstrip(" ").endswith("}"):
        raise bad("the header does not end with '}' (only spaces may pad it)")
    try:
        header = json.loads(text, object_pairs_hook=_object, parse_constant=_no_constants)
    except RecursionError:
        raise bad("the header is nested too deeply") from None
    except ValueError as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    if header.duplicate is not None:
        raise bad("the header names it twice", header.duplicate)
    data_start = 8 + length
    data_size = size - data_start
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must be a map of strings to strings")
    if isinstance(metadata, _Object) and metadata.duplicate is not None:
        raise bad(f"__metadata__ holds the key {metadata.duplicate!r} twice")
    for string in (*header, *metadata, *metadata.values()):
        if not _utf8(string):
            raise bad(f"the header holds {string!r:.60}, which is not valid Unicode "
                      "(a lone surrogate escape)")
    metadata = dict(metadata)
    ranges: list[tuple[int, int, str]] = []
    tensors: dict[str, FileTensor] = {}
    for name, info in header.items():
        dtype, shape, begin, end = _safetensors_entry(name, info, bad)
        nbytes = DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != nbytes:
            raise bad(f"shape {list(shape)} of {info['dtype']} takes {nbytes} bytes, its "
                      f"data_offsets [{begin}, {end}] hold {end - begin}", name)
        if end > data_size:
            raise bad(f"data_offsets [{begin}, {end}] run past the end of the data "
                      f"({data_size} bytes)", name)
        ranges.append((begin, end, name))
        tensors[name] = FileTensor(file, name, dtype, shape, data_start + begin)
    position, previous = 0, None
    for begin, end, name in sorted(ranges):
        if begin > position:
            raise bad(f"a hole in the data: bytes [{position}, {begin}) belong to no tensor",
                      name)
        if begin < position:
            raise bad(f"data_offsets [{begin}, {end}] overlap those of {previous!r}", name)
        position, previous = end, name
    if position != data_size:
        raise bad(f"{data_size - position} bytes after the last tensor belong to no tensor")
    return tensors, metadata


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safetensors_entry(name: str, info: Any, bad: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise bad("not an object with dtype, shape and data_offsets", name)
    if isinstance(info, _Object) and info.duplicate is not None:
        raise bad(f"the field {info.duplicate!r} appears twice", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise bad(f"no {', '.join(missing)}", name)
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str):
        raise bad(f"dtype {tag!r:.50} is not a string", name)
    if tag not in SAFETENSORS_DTYPES:
        if tag in _OTHER_SAFETENSORS_DTYPES:
            raise bad(f"dtype {tag} is not one llmwire sends as a tensor (send the file "
                      "as a plain file)", name)
        raise bad(f"unknown dtype {tag!r:.50}", name)
    if not isinstance(shape, list):
        raise bad(f"shape {shape!r:.80} is not a list", name)
    if len(shape) > MAX_DIMS:
        raise bad(f"shape has {len(shape)} dimensions, more than {MAX_DIMS}", name)
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r:.80} is not a list of non-negative integers", name)
    numel = math.prod(shape)
    if numel >= _MAX_ELEMENTS:
        raise bad(f"shape {shape!r:.80} has {numel} elements, an impossible size", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"data_offsets {offsets!r:.80} is not a list of two integers", name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] is not a range (0 <= begin <= end)", name)
    return SAFETENSORS_DTYPES[tag], tuple(shape), begin, end


# ---------------------------------------------------------------- torch


def _open_torch(path: str) -> Checkpoint:
    torch = torch_module()
    if torch is None:
        raise CheckpointError(path, "a torch checkpoint, and torch is not installed")
    file = _File(path)
    try:
        zipped = os.pread(file.fd, 4, 0).startswith(b"PK\x03\x04")
        obj = _torch_load(torch, file, "meta" if zipped else "cpu")
        state = _state_dict_in(torch, obj, path)
        if zipped:
            _check_stored(path)
            tensors = {name: _torch_file_tensor(file, name, t, path)
                       for name, t in state.items()}
            files = [file]
        else:
            file.check_unchanged()  # loaded whole: it must not have changed while it was read
            for name, t in state.items():
                if str(t.dtype).removeprefix("torch.") not in DTYPES:
                    raise CheckpointError(path, f"dtype {t.dtype} is not one llmwire sends",
                                          name)
            tensors, files = dict(state), []
            file.close()
    except SourceChanged as exc:
        file.close()
        raise CheckpointError(path, f"the file changed while it was read: {exc}") from None
    except BaseException:
        file.close()
        raise
    return Checkpoint(path, "torch", tensors, {}, files)


def _torch_load(torch: Any, file: _File, where: str) -> Any:
    """``torch.load`` of the very file we hold open (a path could by now name
    another), quietly: torch's warnings would add lines to one-line errors."""
    import warnings

    with os.fdopen(os.dup(file.fd), "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(f, map_location=where, weights_only=True)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise CheckpointError(file.path, "not a loadable torch checkpoint: "
                                  + (text[0] if text else type(exc).__name__)) from None


def _state_dict_in(torch: Any, obj: Any, path: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v)
                                                         for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                            for k, v in obj.items()):
        raise CheckpointError(path, "does not hold a state dict (a mapping of names to "
                                    "tensors)")
    for name, tensor in obj.items():
        if tensor.layout != torch.strided:
            raise CheckpointError(path, f"a {tensor.layout} tensor; llmwire sends dense "
                                        "(strided) tensors", name)
        if name == "__metadata__":
            raise CheckpointError(path, "a tensor named '__metadata__' cannot travel "
                                        "(safetensors reserves the name)", name)
    return obj


def _check_stored(path: str) -> None:
    """torch.save stores tensor data uncompressed; a recompressed archive has
    no byte ranges to read lazily."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if "/data/" in info.filename and info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(path, f"{info.filename} is compressed; re-save the "
                                                "checkpoint with torch.save")
    except zipfile.BadZipFile as exc:
        raise CheckpointError(path, f"not a valid torch zip archive ({exc})") from None


def _torch_file_tensor(file: _File, name: str, t: Any, path: str) -> FileTensor:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CheckpointError(path, f"dtype {t.dtype} is not one llmwire sends", name)
    base = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if not _is_int(base):
        raise CheckpointError(path, "torch did not say where its data lies", name)
    itemsize = DTYPES[dtype].itemsize
    shape = tuple(int(d) for d in t.shape)
    offset = base + int(t.storage_offset()) * itemsize
    if t.is_contiguous():
        strides, span = None, t.numel()
    else:
        strides = tuple(int(s) for s in t.stride())
        span = 1 + sum((d - 1) * s for d, s in zip(shape, strides)) if t.numel() else 0
    storage_bytes = int(t.untyped_storage().nbytes())
    if base + storage_bytes > file.size or (t.numel() and offset + span * itemsize
                                            > base + storage_bytes):
        raise CheckpointError(path, "its data lies past the end of the file", name)
    return FileTensor(file, name, dtype, shape, offset, strides, span,
                      storage=(base, storage_bytes))
