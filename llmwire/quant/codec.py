"""Quantize and restore tensors, whole or one block-aligned slice at a time.

A tensor's encoding is described by a :class:`TensorSpec` (format, original
dtype, shape, block size, nested flag) and carried in named *parts*:

=============  ==========================================================
format         parts (in wire order)
=============  ==========================================================
raw            ``data``: the tensor's bytes
fp16, bf16     ``data``: one uint16 per element
block formats  ``codes`` (uint8; two per byte for 4-bit), ``absmax``
               (float32 per block)
nested         ``codes``, ``absmax_codes`` (uint8 per block),
               ``absmax_scale``, ``absmax_offset`` (float32 per group of
               :data:`~llmwire.quant.formats.NESTED_GROUP` blocks)
=============  ==========================================================

Every part of a slice ``[start, stop)`` is a contiguous range of the whole
part, so slices can be encoded independently (on a thread pool, or while
streaming) into views of one output, and decoded into views of one tensor.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import msgpack
import numpy as np

from ..errors import NonFiniteError, QuantizationError
from ..tensors import DTYPES, TensorView, empty_like_spec, view_tensor
from . import _kernels
from .formats import BLOCK_SIZES, FLOAT_DTYPES, NESTED_FORMAT, NESTED_GROUP, get_format

__all__ = [
    "TensorSpec",
    "QuantizedTensor",
    "make_spec",
    "quantize",
    "dequantize",
    "quantize_state_dict",
    "dequantize_state_dict",
    "MIN_ELEMENTS",
    "encode_slice_into",
    "decode_slice",
    "iter_slices",
]

NONFINITE_POLICIES = ("saturate", "raise")

#: Tensors smaller than this (elements) are done on the calling thread; larger
#: ones are cut into one piece per core (the kernels release the GIL).
PARALLEL_MIN_ELEMENTS = 1 << 20

_CAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
_HEADER_KEYS = ("format", "dtype", "shape", "block_size", "nested")


@dataclass(frozen=True)
class TensorSpec:
    """Everything a receiver needs to restore a tensor, and nothing else."""

    format: str
    dtype: str
    shape: tuple[int, ...]
    block_size: int = 0
    nested: bool = False

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def alignment(self) -> int:
        """Slices must start at multiples of this many elements."""
        if self.block_size:
            return self.block_size * (NESTED_GROUP if self.nested else 1)
        return 1

    def part_layout(self, count: int) -> list[tuple[str, np.dtype, int]]:
        """``(name, dtype, length)`` of each part for ``count`` elements
        starting at an aligned offset."""
        fmt = get_format(self.format)
        if fmt.kind == "raw":
            return [("data", np.dtype(np.uint8), count * DTYPES[self.dtype].itemsize)]
        if fmt.kind == "cast":
            return [("data", np.dtype(np.uint16), count)]
        blocks = -(-count // self.block_size)
        codes = count if fmt.bits == 8 else (count + 1) // 2
        layout = [("codes", np.dtype(np.uint8), codes)]
        if self.nested:
            groups = -(-blocks // NESTED_GROUP)
            layout += [("absmax_codes", np.dtype(np.uint8), blocks),
                       ("absmax_scale", np.dtype(np.float32), groups),
                       ("absmax_offset", np.dtype(np.float32), groups)]
        else:
            layout.append(("absmax", np.dtype(np.float32), blocks))
        return layout

    def part_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Where the parts of elements ``[start, stop)`` lie in the parts of
        the whole tensor (``start`` aligned)."""
        before = self.part_layout(start)
        upto = self.part_layout(stop)
        return [(b[2], u[2]) for b, u in zip(before, upto)]

    def payload_nbytes(self) -> int:
        return sum(dtype.itemsize * length for _, dtype, length in self.part_layout(self.numel))

    def to_header(self) -> dict[str, Any]:
        """A msgpack-ready dict (the inverse of :meth:`from_header`)."""
        return {"format": self.format, "dtype": self.dtype, "shape": list(self.shape),
                "block_size": self.block_size, "nested": self.nested}

    @classmethod
    def from_header(cls, header: Any) -> "TensorSpec":
        """Validate a header from a peer or a file; :class:`QuantizationError`
        if it does not describe a tensor llmwire can restore."""
        if not isinstance(header, dict) or set(header) != set(_HEADER_KEYS):
            raise QuantizationError(f"bad tensor header {header!r:.200}")
        shape = header["shape"]
        if (not isinstance(shape, (list, tuple)) or len(shape) > 64
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62
                           for d in shape)):
            raise QuantizationError(f"bad shape {shape!r:.200}")
        block_size, nested = header["block_size"], header["nested"]
        if not isinstance(block_size, int) or not isinstance(nested, bool):
            raise QuantizationError("bad block_size or nested flag")
        spec = make_spec(header["dtype"], tuple(shape), header["format"],
                         block_size=block_size or None, nested=nested)
        if spec.format != header["format"] or spec.block_size != block_size:
            raise QuantizationError(f"inconsistent tensor header {header!r:.200}")
        if spec.numel >= 2**62:
            raise QuantizationError(f"tensor too large: shape {shape}")
        return spec


def make_spec(dtype: str, shape: tuple[int, ...], fmt: str, *, block_size: int | None = None,
              nested: bool = False) -> TensorSpec:
    """Decide how a tensor of ``dtype`` is encoded when ``fmt`` is asked for.

    Integer and bool tensors pass through as ``raw`` whatever ``fmt`` says;
    float formats accept float32, float16 and bfloat16 sources.
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise QuantizationError(f"unsupported dtype {dtype!r}")
    format_ = get_format(fmt)
    # options are checked against the format first, so a mistake is reported
    # even when this particular tensor would pass through raw
    if format_.kind != "block" and (nested or block_size):
        raise QuantizationError(f"{format_.name!r} takes no block_size or nested option "
                                "(they apply to blockwise8, fp4 and nf4)")
    block = format_.default_block_size if block_size is None else block_size
    if format_.kind == "block" and block not in BLOCK_SIZES:
        raise QuantizationError(f"block_size must be one of {BLOCK_SIZES}, got {block!r}")
    if format_.kind == "raw" or not DTYPES[dtype].is_float:
        return TensorSpec("raw", dtype, tuple(shape))
    if dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"format {format_.name!r} does not take {dtype} tensors "
            f"(supported: {', '.join(FLOAT_DTYPES)}; use 'raw' to send them as they are)")
    if format_.kind == "cast":
        return TensorSpec(format_.name, dtype, tuple(shape))
    return TensorSpec(format_.name, dtype, tuple(shape), block, bool(nested))


@dataclass(eq=False)
class QuantizedTensor:
    """A tensor in its wire encoding: a :class:`TensorSpec` plus its parts.

    ``nbytes`` is what it costs on the wire: the parts and the msgpack header.
    ``nonfinite`` counts the NaN/±inf inputs that the block rule mapped
    (see docs/quantization.md). ``container`` says what :func:`dequantize`
    returns by default (``"torch"`` or ``"numpy"``).
    """

    spec: TensorSpec
    parts: dict[str, np.ndarray]
    nonfinite: int = 0
    container: str = "numpy"
    _header: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        layout = self.spec.part_layout(self.spec.numel)
        if list(self.parts) != [name for name, _, _ in layout]:
            raise QuantizationError(
                f"parts {list(self.parts)} do not match format {self.spec.format!r}")
        for name, dtype, length in layout:
            part = self.parts[name]
            if part.dtype != dtype or part.ndim != 1 or part.size != length:
                raise QuantizationError(
                    f"part {name!r} must be {length} x {dtype}, got {part.size} x {part.dtype}")
        self._header = msgpack.packb(self.spec.to_header())

    @property
    def format(self) -> str:
        return self.spec.format

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def header(self) -> bytes:
        """The spec as msgpack bytes, as it travels."""
        return self._header

    @property
    def nbytes(self) -> int:
        return len(self._header) + sum(part.nbytes for part in self.parts.values())

    def absmax(self) -> np.ndarray:
        """The float32 scale of every block (restored, for nested), e.g. to
        build a bitsandbytes ``QuantState``; block formats only."""
        if not self.spec.block_size:
            raise QuantizationError(f"format {self.spec.format!r} has no absmax")
        if self.spec.nested:
            return _restore_absmax(self.parts["absmax_codes"], self.parts["absmax_scale"],
                                   self.parts["absmax_offset"])
        return self.parts["absmax"]

    def buffers(self) -> list[memoryview]:
        """The parts in wire order, as flat byte views (no copies)."""
        return [memoryview(part).cast("B") for part in self.parts.values()]

    @classmethod
    def from_buffers(cls, header: bytes | dict, buffers: Sequence[Any],
                     container: str = "numpy") -> "QuantizedTensor":
        """Rebuild from a header and part buffers (views are kept, not copied)."""
        if isinstance(header, (bytes, bytearray, memoryview)):
            try:
                header = msgpack.unpackb(header)
            except Exception as exc:
                raise QuantizationError(f"undecodable tensor header: {exc}") from None
        spec = TensorSpec.from_header(header)
        layout = spec.part_layout(spec.numel)
        if len(buffers) != len(layout):
            raise QuantizationError(f"expected {len(layout)} part buffers, got {len(buffers)}")
        parts = {}
        for (name, dtype, length), buffer in zip(layout, buffers):
            try:
                raw = np.frombuffer(buffer, dtype=np.uint8)
            except (TypeError, ValueError) as exc:
                raise QuantizationError(f"part {name!r} is not a buffer: {exc}") from None
            if raw.size != length * dtype.itemsize:
                raise QuantizationError(
                    f"part {name!r} holds {raw.size} bytes, expected {length * dtype.itemsize}")
            parts[name] = raw.view(dtype)
        return cls(spec, parts, 0, container)


def iter_slices(numel: int, alignment: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``[0, numel)``; each start is a
    multiple of ``alignment`` and each slice holds at most
    ``max(max_elements, alignment)`` elements (rounded down to alignment)."""
    step = max(alignment, max_elements // alignment * alignment)
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def _as_kernel_input(src: np.ndarray, dtype: str) -> np.ndarray:
    info = DTYPES[dtype]
    src = np.ascontiguousarray(src).reshape(-1)
    if src.dtype != info.numpy:
        src = src.view(info.numpy)
    return src


def _check_outputs(arrays: Sequence[np.ndarray], what: str) -> None:
    """Kernels write straight into these: a copy would silently lose the
    result, so anything but a writable contiguous array is refused."""
    for array in arrays:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous \
                or not array.flags.writeable:
            raise QuantizationError(f"{what} must be writable C-contiguous NumPy arrays")


def encode_slice_into(spec: TensorSpec, src: np.ndarray, parts: Sequence[np.ndarray], *,
                      bypass_cache: bool = False) -> int:
    """Encode the 1-D contiguous elements ``src`` (held as ``spec.dtype``)
    into the part views ``parts`` (laid out by ``spec.part_layout(src.size)``).

    ``src`` must start at an aligned offset of its tensor. Returns the number
    of non-finite inputs (block formats; 0 otherwise). ``bypass_cache=True``
    writes cast outputs past the CPU caches: right for a large result kept for
    later, wrong for a buffer about to be sent (the default).
    """
    fmt = get_format(spec.format)
    src = _as_kernel_input(src, spec.dtype)
    _check_outputs(parts, "parts")
    if fmt.kind == "raw":
        parts[0][...] = src.view(np.uint8)
        return 0
    if fmt.kind == "cast":
        _kernels.cast_into(src, spec.dtype, parts[0], _CAST_DTYPES[fmt.name],
                           bypass_cache=bypass_cache)
        return 0
    if not spec.nested:
        return _kernels.quantize_into(src, spec.dtype, fmt, spec.block_size, parts[0], parts[1])
    codes, absmax_codes, scale, offset = parts
    absmax = np.empty(absmax_codes.size, dtype=np.float32)
    nonfinite = _kernels.quantize_into(src, spec.dtype, fmt, spec.block_size, codes, absmax)
    _quantize_absmax(absmax, absmax_codes, scale, offset)
    return nonfinite


def _quantize_absmax(absmax: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                     offset: np.ndarray) -> None:
    """Nested quantization: each group of NESTED_GROUP absmax values is
    centred on its mean (float64 sum, rounded once to float32) and stored as
    ``blockwise8`` with one block per group."""
    groups = offset.size
    padded = np.zeros(groups * NESTED_GROUP, dtype=np.float64)
    padded[: absmax.size] = absmax
    counts = np.full(groups, NESTED_GROUP, dtype=np.float64)
    counts[-1] = absmax.size - (groups - 1) * NESTED_GROUP
    offset[...] = (padded.reshape(groups, NESTED_GROUP).sum(axis=1) / counts).astype(np.float32)
    centred = absmax - np.repeat(offset, NESTED_GROUP)[: absmax.size]
    _kernels.quantize_into(centred, "float32", NESTED_FORMAT, NESTED_GROUP, codes, scale)


def _restore_absmax(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    absmax = np.empty(codes.size, dtype=np.float32)
    _kernels.dequantize_into(codes, scale, codes.size, NESTED_FORMAT, NESTED_GROUP, absmax,
                             "float32")
    absmax += np.repeat(offset, NESTED_GROUP)[: codes.size]
    return absmax


def decode_slice(spec: TensorSpec, parts: Sequence[np.ndarray], out: np.ndarray, *,
                 bypass_cache: bool = False) -> None:
    """Restore the elements encoded in ``parts`` into the 1-D contiguous
    ``out`` (held as ``spec.dtype``; its length is the slice's count).
    ``bypass_cache`` as for :func:`encode_slice_into`."""
    fmt = get_format(spec.format)
    _check_outputs([out], "out")
    count = out.size
    out = _as_kernel_input(out, spec.dtype)
    if fmt.kind == "raw":
        out.view(np.uint8)[...] = parts[0]
        return
    if fmt.kind == "cast":
        _kernels.cast_into(parts[0], _CAST_DTYPES[fmt.name], out, spec.dtype,
                           bypass_cache=bypass_cache)
        return
    if spec.nested:
        absmax = _restore_absmax(parts[1], parts[2], parts[3])
    else:
        absmax = parts[1]
    _kernels.dequantize_into(parts[0], absmax, count, fmt, spec.block_size, out, spec.dtype,
                             bypass_cache=bypass_cache)


_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="llmwire-quant")
    return _pool


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


def _ranges(spec: TensorSpec, item: int | None = None) -> list[tuple[int, int]]:
    """Work items for one tensor: one per core by default, or pieces of about
    ``item`` elements (at least PARALLEL_MIN_ELEMENTS) when many tensors
    share the pool."""
    numel = spec.numel
    if numel < PARALLEL_MIN_ELEMENTS:
        return [(0, numel)] if numel else []
    size = -(-numel // _workers()) if item is None else max(item, PARALLEL_MIN_ELEMENTS)
    return list(iter_slices(numel, spec.alignment, size))


def _run(tasks: list[Any]) -> list[Any]:
    """Run the tasks, all but the first on the pool and the first here."""
    if len(tasks) <= 1:
        return [task() for task in tasks]
    futures = [_executor().submit(task) for task in tasks[1:]]
    first = tasks[0]()
    return [first] + [future.result() for future in futures]


def _run_pooled(tasks: list[Any]) -> list[Any]:
    """Run many tasks on the pool with no hand-off per task on the caller's
    critical path (for batches of tensors)."""
    if len(tasks) <= 1:
        return [task() for task in tasks]
    futures = [_executor().submit(task) for task in tasks]
    return [future.result() for future in futures]


def _part_views(spec: TensorSpec, parts: Sequence[np.ndarray], start: int, stop: int
                ) -> list[np.ndarray]:
    return [part[lo:hi] for part, (lo, hi) in zip(parts, spec.part_ranges(start, stop))]


def _encode_plan(tensor: Any, fmt: str, block_size: int | None, nested: bool, item: int | None
                 ) -> tuple[TensorView, TensorSpec, dict[str, np.ndarray], list[Any]]:
    view = view_tensor(tensor)
    spec = make_spec(view.dtype, view.shape, fmt, block_size=block_size, nested=nested)
    parts = {name: np.empty(length, dtype=dtype)
             for name, dtype, length in spec.part_layout(spec.numel)}
    arrays = list(parts.values())

    def task(start: int, stop: int) -> int:
        # a whole-tensor result is kept for later, not sent right away
        return encode_slice_into(spec, view.slice(start, stop),
                                 _part_views(spec, arrays, start, stop), bypass_cache=True)

    tasks = [lambda a=a, b=b: task(a, b) for a, b in _ranges(spec, item)]
    return view, spec, parts, tasks


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise QuantizationError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


def quantize(tensor: Any, fmt: str, *, block_size: int | None = None, nested: bool = False,
             nonfinite: str = "saturate") -> QuantizedTensor:
    """Quantize a torch tensor or NumPy array into ``fmt``.

    ``fmt`` is one of ``fp16``, ``bf16``, ``blockwise8``, ``fp4``, ``nf4`` or
    ``raw``. Integer and bool tensors pass through unchanged (``raw``).
    ``block_size`` overrides the format's default (4096 for blockwise8, 64
    for fp4/nf4); ``nested=True`` quantizes the absmax values too.
    ``nonfinite="raise"`` refuses tensors holding NaN/±inf
    (:class:`~llmwire.NonFiniteError`); the default maps them by the
    documented rule. Large tensors are split over a thread pool.
    """
    _check_policy(nonfinite)
    view, spec, parts, tasks = _encode_plan(tensor, fmt, block_size, nested, None)
    found = sum(_run(tasks))
    if found and nonfinite == "raise":
        raise NonFiniteError(found)
    return QuantizedTensor(spec, parts, found, view.container)


#: quantize_state_dict sends tensors with fewer elements than this as they
#: are: norms and biases are tiny, sensitive, and gain nothing worth the error.
MIN_ELEMENTS = 4096


def quantize_state_dict(state_dict: Mapping[str, Any], fmt: str, *,
                        block_size: int | None = None, nested: bool = False,
                        nonfinite: str = "saturate",
                        min_elements: int = MIN_ELEMENTS) -> dict[str, QuantizedTensor]:
    """:func:`quantize` every tensor of a state dict, keeping its order.

    Tensors with fewer than ``min_elements`` elements (norm weights, biases)
    are kept as they are (``raw``); pass 0 to quantize everything. Float
    tensors ``fmt`` cannot take (float64: the formats take float32, float16
    and bfloat16) are kept as they are too, as :func:`~llmwire.send_state_dict`
    does. All
    tensors' pieces go to the thread pool at once, so small tensors do not
    each pay a thread hand-off. Same arguments and errors as
    :func:`quantize`; with ``nonfinite="raise"`` the error names the first
    tensor holding NaN/±inf.
    """
    _check_policy(nonfinite)
    if not isinstance(min_elements, int) or min_elements < 0:
        raise QuantizationError(f"min_elements must be a non-negative int, got {min_elements!r}")

    get_format(fmt)  # a bad name is an error even if every tensor would be kept

    def plan(tensor: Any) -> Any:
        view = view_tensor(tensor)
        keep = view.numel < min_elements or (DTYPES[view.dtype].is_float
                                             and view.dtype not in FLOAT_DTYPES)
        return _encode_plan(tensor, "raw" if keep else fmt, None if keep else block_size,
                            False if keep else nested, PARALLEL_MIN_ELEMENTS)

    plans = {name: plan(t) for name, t in state_dict.items()}
    flat = [(name, task) for name, plan in plans.items() for task in plan[3]]
    counts = _run_pooled([task for _, task in flat])
    found: dict[str, int] = dict.fromkeys(plans, 0)
    for (name, _), count in zip(flat, counts):
        found[name] += count
    result = {}
    for name, (view, spec, parts, _) in plans.items():
        if found[name] and nonfinite == "raise":
            raise NonFiniteError(found[name], name)
        result[name] = QuantizedTensor(spec, parts, found[name], view.container)
    return result


def _decode_plan(q: Any, out: Any, container: str | None, item: int | None
                 ) -> tuple[Any, list[Any]]:
    if not isinstance(q, QuantizedTensor):
        raise QuantizationError(f"expected a QuantizedTensor, got {type(q).__name__}")
    spec = q.spec
    if out is not None:
        target: TensorView = view_tensor(out)
        if (target.shape != spec.shape or target.dtype != spec.dtype or target.flat is None
                or not target.array.flags.writeable):
            raise QuantizationError(
                f"out must be a writable contiguous {spec.dtype} tensor of shape "
                f"{spec.shape}, got {target.dtype} {target.shape}")
        result, flat = out, target.flat
    else:
        result, flat = empty_like_spec(spec.shape, spec.dtype, container or q.container)
    arrays = list(q.parts.values())

    def task(start: int, stop: int) -> None:
        decode_slice(spec, _part_views(spec, arrays, start, stop), flat[start:stop],
                     bypass_cache=True)

    return result, [lambda a=a, b=b: task(a, b) for a, b in _ranges(spec, item)]


def dequantize(q: QuantizedTensor, *, out: Any = None, container: str | None = None) -> Any:
    """Restore a :class:`QuantizedTensor` to its original dtype and shape.

    Returns a torch tensor if the original was one (or ``container="torch"``),
    else a NumPy array (a NumPy bfloat16 result is held as its uint16 bit
    patterns, NumPy having no bfloat16). With ``out=``, writes into that
    existing tensor (same shape and dtype, contiguous) and returns it.
    """
    result, tasks = _decode_plan(q, out, container, None)
    _run(tasks)
    return result


def dequantize_state_dict(quantized: Mapping[str, QuantizedTensor], *,
                          out: Mapping[str, Any] | None = None,
                          container: str | None = None) -> dict[str, Any]:
    """:func:`dequantize` a dict of :class:`QuantizedTensor`. With ``out=`` (for
    example a model's own ``state_dict()``), every entry is written in place
    into the tensor of the same name, which must exist."""
    if out is not None:
        missing = [name for name in quantized if name not in out]
        if missing:
            raise QuantizationError(f"out has no tensor for {missing[:5]}")
    plans = {name: _decode_plan(q, None if out is None else out[name], container,
                                PARALLEL_MIN_ELEMENTS)
             for name, q in quantized.items()}
    _run_pooled([task for _, tasks in plans.values() for task in tasks])
    return {name: result for name, (result, _) in plans.items()}
