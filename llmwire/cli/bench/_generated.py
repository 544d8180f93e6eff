"""A state dict with the shapes of a real model whose values are computed
slice by slice, never held whole, and a receiver that checks every slice
against them and keeps nothing (``llmwire bench scale``).

Values: a fixed table of ``PERIOD`` bfloat16 values drawn once from a normal
distribution (std 0.02, as initialised weights), laid out twice so that any
run of up to ``PERIOD`` elements is one contiguous copy; element ``i`` of a
tensor is ``table[(offset + i) % PERIOD]`` with the tensor's own ``offset``
(from its name). Producing a slice is a memory copy, so the benchmark
measures llmwire and not a random number generator, and any slice of any
tensor can be produced again, by the sender and by the checker alike.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import xxhash

from ...errors import PayloadError, TargetMismatch
from ...payloads.manifest import Entry, Manifest
from ...payloads.sinks import StateDictSink
from ...payloads.slices import carve
from ...quant import codec
from ...quant.codec import TensorSpec

__all__ = ["ARCHS", "Arch", "GeneratedTensor", "generated_state_dict", "VerifySink",
           "check_values", "PERIOD"]

#: elements before the values repeat (a prime, so that tensors' runs do not line up)
PERIOD = (1 << 20) + 7
#: windows per slice whose restored values are checked bit for bit against the
#: reference decoding of the generator's (lossy formats)
SAMPLES_PER_SLICE = 4


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder's shapes."""

    layers: int
    hidden: int
    ffn: int
    vocab: int
    kv: int          # key/value projection width (kv heads x head dim)
    tied: bool = False

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        h = self.hidden
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (self.kv, h)
            yield p + "self_attn.v_proj.weight", (self.kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate_proj.weight", (self.ffn, h)
            yield p + "mlp.up_proj.weight", (self.ffn, h)
            yield p + "mlp.down_proj.weight", (h, self.ffn)
        yield "model.norm.weight", (h,)
        if not self.tied:
            yield "lm_head.weight", (self.vocab, h)

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes())


#: the shapes of real models (Llama 3.x; SmolLM2-135M for quick runs; 16M, a
#: small Llama-shaped model, for the tests)
ARCHS = {
    "16M": Arch(4, 512, 1536, 8192, 128, tied=True),
    "135M": Arch(30, 576, 1536, 49152, 192, tied=True),
    "1B": Arch(16, 2048, 8192, 128256, 512, tied=True),
    "3B": Arch(28, 3072, 8192, 128256, 1024, tied=True),
    "8B": Arch(32, 4096, 14336, 128256, 1024),
    "70B": Arch(80, 8192, 28672, 128256, 1024),
    "405B": Arch(126, 16384, 53248, 128256, 1024),
}

_tables: dict[int, np.ndarray] = {}
_tables_lock = threading.Lock()


def _table(seed: int) -> np.ndarray:
    """The value table, twice over (bfloat16 bit patterns)."""
    with _tables_lock:
        table = _tables.get(seed)
        if table is None:
            values = np.random.default_rng(seed).standard_normal(PERIOD, np.float32) * 0.02
            bits = values.view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # RNE
            table = _tables[seed] = np.concatenate([rounded, rounded])
        return table


def fill(offset: int, start: int, out: np.ndarray, seed: int) -> np.ndarray:
    """Elements ``[start, start + len(out))`` of the tensor at ``offset`` into
    ``out`` (uint16, bfloat16 bits)."""
    table = _table(seed)
    pos = (offset + start) % PERIOD
    done, count = 0, out.size
    while done < count:
        n = min(count - done, PERIOD)
        out[done:done + n] = table[pos:pos + n]
        done += n
        pos = (pos + n) % PERIOD
    return out


def _offset_of(name: str, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{seed}:{name}".encode()) % PERIOD


class GeneratedTensor:
    """A bfloat16 tensor whose values are computed when a slice is asked for."""

    __slots__ = ("name", "shape", "offset", "seed")
    dtype = "bfloat16"

    def __init__(self, name: str, shape: tuple[int, ...], seed: int) -> None:
        self.name, self.shape, self.seed = name, shape, seed
        self.offset = _offset_of(name, seed)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _llmwire_view(self) -> "GeneratedView":
        return GeneratedView(self)


class GeneratedView:
    """How the state-dict sender sees a :class:`GeneratedTensor` (values
    produced into the buffer it is handed, as for a checkpoint file)."""

    container = "file"
    flat = None
    array = None

    def __init__(self, tensor: GeneratedTensor) -> None:
        self.source = tensor
        self.dtype, self.shape, self.numel = tensor.dtype, tensor.shape, tensor.numel

    @property
    def storage_key(self) -> tuple[Any, ...]:
        return ("generated", self.source.name)

    def slice(self, start: int, stop: int, scratch: np.ndarray | None = None) -> np.ndarray:
        count = stop - start
        out = (scratch[:count * 2] if scratch is not None else np.empty(count * 2, np.uint8))
        return fill(self.source.offset, start, out.view(np.uint16), self.source.seed)


def generated_state_dict(arch: Arch, seed: int = 0) -> dict[str, GeneratedTensor]:
    return {name: GeneratedTensor(name, shape, seed) for name, shape in arch.shapes()}


def _exact(spec: TensorSpec) -> bool:
    """Whether the format restores bfloat16 values bit for bit."""
    return spec.format in ("raw", "bf16")


class _Scratch(threading.local):
    buffer: np.ndarray | None = None
    wire: np.ndarray | None = None


_scratch = _Scratch()


def _buffer(nbytes: int, attr: str = "buffer") -> np.ndarray:
    buffer = getattr(_scratch, attr)
    if buffer is None or buffer.size < nbytes:
        buffer = np.empty(max(nbytes, 1 << 20), np.uint8)
        setattr(_scratch, attr, buffer)
    return buffer


def check_values(spec: TensorSpec, tensor: GeneratedTensor, start: int,
                 values: np.ndarray) -> int:
    """Check restored elements ``[start, start + len(values))`` (uint16 bits)
    against the generator: all of them for exact formats, else
    :data:`SAMPLES_PER_SLICE` windows bit for bit against the reference
    decoding of the generator's values. Returns the elements compared;
    raises :class:`~llmwire.PayloadError` on a difference."""
    count = values.size
    if _exact(spec):
        want = fill(tensor.offset, start, _buffer(count * 2)[:count * 2].view(np.uint16),
                    tensor.seed)
        if not np.array_equal(want, values):
            bad = int(np.flatnonzero(want != values)[0])
            raise PayloadError(f"{tensor.name}[{start + bad}] arrived as {values[bad]:#06x}, "
                               f"the generator made {want[bad]:#06x}")
        return count
    window = max(spec.alignment, 64)
    windows = max(1, count // window)
    checked = 0
    for k in range(min(SAMPLES_PER_SLICE, windows)):
        first = (k * windows // SAMPLES_PER_SLICE) * window
        n = min(window, count - first)
        original = fill(tensor.offset, start + first, np.empty(n, np.uint16), tensor.seed)
        wire = _buffer(n * 4 + 64, "wire")
        parts, _ = carve(wire, spec, n)
        codec.encode_slice_into(spec, original, parts)
        expected = np.empty(n, np.uint16)
        codec.decode_slice(spec, parts, expected)
        got = values[first:first + n]
        if not np.array_equal(expected, got):
            bad = int(np.flatnonzero(expected != got)[0])
            raise PayloadError(f"{tensor.name}[{start + first + bad}] restored as "
                               f"{got[bad]:#06x}, {spec.format} of the generator's value "
                               f"restores to {expected[bad]:#06x}")
        checked += n
    return checked


class VerifySink(StateDictSink):
    """Checks every restored slice against the generator and keeps nothing;
    ``commit`` returns what it checked."""

    def __init__(self, arch: Arch, seed: int = 0) -> None:
        self.tensors = generated_state_dict(arch, seed)
        self._lock = threading.Lock()
        self.elements = self.compared = self.slices = 0
        self._digests: dict[str, int] = {}

    def prepare(self, manifest: Manifest) -> None:
        names = [e.name for e in manifest.entries]
        if names != list(self.tensors):
            raise TargetMismatch(f"the sender's {len(names)} tensors are not this model's "
                                 f"{len(self.tensors)}")
        for entry in manifest.entries:
            spec = entry.spec
            if spec is None or spec.shape != self.tensors[entry.name].shape \
                    or spec.dtype != "bfloat16":
                raise TargetMismatch(f"{entry.name!r} is not bfloat16 "
                                     f"{self.tensors[entry.name].shape}")
        self._specs = {e.name: e.spec for e in manifest.entries}

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        spec = self._specs[entry.name]
        assert spec is not None
        compared = check_values(spec, self.tensors[entry.name], start, values.view(np.uint16))
        digest = xxhash.xxh3_64_intdigest(values)
        with self._lock:
            self.slices += 1
            self.elements += values.size
            self.compared += compared
            self._digests[f"{entry.name}@{start}"] = digest

    def tie(self, entry: Entry, source: Entry) -> None:
        raise TargetMismatch("the generated model has no tied entries")

    def commit(self) -> dict[str, Any]:
        total = sum(t.numel for t in self.tensors.values())
        if self.elements != total:
            raise PayloadError(f"{self.elements} of {total} elements arrived")
        whole = xxhash.xxh3_128()
        for key in sorted(self._digests):  # slices land from several threads
            whole.update(self._digests[key].to_bytes(8, "little"))
        return {"slices": self.slices, "elements": self.elements, "compared": self.compared,
                "restored_digest": whole.hexdigest()}

    def receipt(self) -> dict[str, Any]:
        return {}
