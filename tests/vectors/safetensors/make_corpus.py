"""Write the safetensors corpus: ``hostile/``, ``valid/``, ``expected.json``, ``README.md``.

    python3 tests/vectors/safetensors/make_corpus.py            # rewrite this folder
    python3 tests/vectors/safetensors/make_corpus.py --out DIR  # write a copy elsewhere

Every file is built byte by byte with ``struct`` and ``json`` (never with a
safetensors writer) so that a file can be wrong in exactly one way. Nothing
is random: running this twice gives the same bytes, and
``tests/test_checkpoints_hostile.py`` checks that the stored folder is what
this script writes.

The format (huggingface/safetensors, README "Format" and
``safetensors/src/tensor.rs``): an 8-byte little-endian u64 ``N``; ``N``
bytes of UTF-8 JSON that begins with ``{`` and may be padded at its end with
spaces; then the data region. The JSON is an object mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data region) plus an optional ``"__metadata__"`` string-to-string object.
``N`` must not exceed 100,000,000 nor the file; ``end - begin`` must equal
``numel * itemsize`` (checked arithmetic); the ranges, sorted, must tile the
data region exactly (no holes, no overlaps, the last one ending at the end of
the file); duplicate keys are disallowed.

Two cases are not stored, because they are large and compress to nothing
(100,000 levels of nesting): ``STORED`` is False for them and the tests
write them into a temporary folder with :func:`write_case`.

``upstream`` records what the real ``safetensors`` library did with each
file (``safe_open`` then every ``get_tensor``, and ``load_file``), observed
with :data:`OBSERVED_WITH`; the tests re-check it when that version is the
one installed. llmwire refuses every hostile file whatever upstream does.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent

#: the safetensors version the ``upstream`` column was observed with
OBSERVED_WITH = "0.8.0"
#: the format's limit on the header length N
MAX_HEADER = 100_000_000
#: depth of the two nesting cases (Python's json gives up near 1,000)
DEEP = 100_000

#: safetensors dtype tag -> (llmwire dtype name, struct code of one element)
DTYPES = {
    "F64": ("float64", "d"), "F32": ("float32", "f"), "F16": ("float16", "H"),
    "BF16": ("bfloat16", "H"), "I64": ("int64", "q"), "I32": ("int32", "i"),
    "I16": ("int16", "h"), "I8": ("int8", "b"), "U64": ("uint64", "Q"),
    "U32": ("uint32", "I"), "U16": ("uint16", "H"), "U8": ("uint8", "B"),
    "BOOL": ("bool", "B"),
}


# ------------------------------------------------------------------ bytes


def frame(header: bytes, data: bytes = b"", *, pad: bool = True,
          length: int | None = None) -> bytes:
    """``N`` + header + data. ``pad`` appends spaces up to a multiple of 8, as
    upstream's writer does, so that data stays aligned; ``length`` overrides N."""
    if pad:
        header += b" " * (-len(header) % 8)
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8, keys in insertion order (Python's floats, bools and
    null come out as written: 2.0, true, null)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def info(dtype: Any = "U8", shape: Any = (4,), offsets: Any = (0, 4), **drop: bool) -> dict:
    """One header entry (tuples become JSON lists); ``no_dtype=True`` and the
    like leave a field out."""
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
             "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}
    for key in ("dtype", "shape", "data_offsets"):
        if drop.get(f"no_{key}"):
            del entry[key]
    return entry


#: every entry-level hostile file has a sound entry "good" (4 bytes at 0) and
#: the entry "bad" after it, so a reader that blames the wrong one is caught
GOOD = info("U8", (4,), (0, 4))
GOOD_BYTES = b"good"


def with_bad(bad: Any, bad_bytes: bytes) -> bytes:
    return frame(dumps({"good": GOOD, "bad": bad}), GOOD_BYTES + bad_bytes)


def pack(tag: str, values: list) -> bytes:
    return struct.pack(f"<{len(values)}{DTYPES[tag][1]}", *values)


def f32_bits(bits: list[int]) -> bytes:
    return struct.pack(f"<{len(bits)}I", *bits)


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Tensor:
    """A tensor of a valid file: its raw little-endian bytes, C order."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Case:
    """One file of the corpus.

    ``entry``: for hostile files, the entry a reader must name (a string),
    any one of several (a list, where the fault lies between two), or None
    (a fault of the file or header as a whole: no entry is required).
    ``upstream``: "refuses" or "accepts", what safetensors did with it.
    """

    name: str
    kind: str  # "hostile" | "valid"
    category: str
    what: str
    build: Callable[[], bytes]
    entry: str | list[str] | None = None
    upstream: str = "refuses"
    note: str = ""
    stored: bool = True
    tensors: tuple[Tensor, ...] = ()
    header_order: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"{self.kind}/{self.name}.safetensors"


CASES: list[Case] = []


def hostile(name: str, category: str, what: str, entry: str | list[str] | None = None,
            upstream: str = "refuses", note: str = "", stored: bool = True):
    def register(build: Callable[[], bytes]) -> Callable[[], bytes]:
        CASES.append(Case(name, "hostile", category, what, build, entry, upstream, note, stored))
        return build
    return register


def valid(name: str, what: str, tensors: list[Tensor], *, metadata: dict[str, str] | None = None,
          header_order: list[str] | None = None, metadata_last: bool = False,
          pad_to: int = 8, extra_padding: int = 0, indent: int | None = None,
          ascii_only: bool = False, note: str = "") -> None:
    """A valid file: tensors laid out in list order in the data region, listed
    in ``header_order`` (default: the same order) in the header."""
    order = header_order or [t.name for t in tensors]
    by_name = {t.name: t for t in tensors}
    assert sorted(order) == sorted(by_name) and len(set(order)) == len(order)

    def build() -> bytes:
        offsets, position = {}, 0
        for t in tensors:
            offsets[t.name] = (position, position + len(t.data))
            position += len(t.data)
        header: dict[str, Any] = {}
        if metadata is not None and not metadata_last:
            header["__metadata__"] = metadata
        for name in order:
            t = by_name[name]
            header[name] = {"dtype": t.dtype, "shape": list(t.shape),
                            "data_offsets": list(offsets[name])}
        if metadata is not None and metadata_last:
            header["__metadata__"] = metadata
        if indent is not None or ascii_only:
            text = json.dumps(header, indent=indent, ensure_ascii=True).encode("ascii")
        else:
            text = dumps(header)
        if pad_to > 1:
            text += b" " * (-len(text) % pad_to)
        text += b" " * extra_padding
        return frame(text, b"".join(t.data for t in tensors), pad=False)

    CASES.append(Case(name, "valid", "valid", what, build, None, "accepts", note, True,
                      tuple(tensors), tuple(order), dict(metadata or {})))


# --- framing: the 8-byte length and the header's extent


@hostile("file_empty", "framing", "the file is empty (no 8-byte header length)")
def _() -> bytes:
    return b""


@hostile("file_shorter_than_8_bytes", "framing", "5 bytes: the header length is cut short")
def _() -> bytes:
    return b"\x10\x00\x00\x00\x00"


@hostile("header_length_beyond_file", "framing",
         "N = 4096 in a file of 68 bytes")
def _() -> bytes:
    return frame(dumps({"a": GOOD}), GOOD_BYTES, length=4096)


@hostile("header_length_over_limit", "framing",
         "N = 100,000,001 (> 100,000,000) in a 16-byte file; a reader must not allocate N "
         "(this also exceeds the file: a 100 MB file would be needed to separate the two)")
def _() -> bytes:
    return frame(b"{}", length=MAX_HEADER + 1)


@hostile("header_length_max_u64", "framing",
         "N = 2**64 - 1: 8 + N overflows a u64")
def _() -> bytes:
    return frame(b"{}", length=2**64 - 1)


@hostile("header_length_zero", "framing", "N = 0: an empty header is not JSON")
def _() -> bytes:
    return frame(b"", pad=False)


@hostile("header_length_cuts_json", "framing",
         "N stops 3 bytes before the JSON ends: the header is truncated JSON and the rest "
         "falls in the data region")
def _() -> bytes:
    text = dumps({"a": GOOD})
    return frame(text, GOOD_BYTES, pad=False, length=len(text) - 3)


# --- encoding: the header's bytes


@hostile("header_not_utf8", "encoding", "a tensor name holds the byte 0xFF")
def _() -> bytes:
    return frame(b'{"a\xff":' + dumps(GOOD) + b"}", GOOD_BYTES)


@hostile("header_utf8_encoded_surrogate", "encoding",
         "a tensor name holds ED A0 80, a UTF-16 surrogate encoded as UTF-8 (invalid UTF-8)")
def _() -> bytes:
    return frame(b'{"a\xed\xa0\x80":' + dumps(GOOD) + b"}", GOOD_BYTES)


@hostile("header_utf8_bom", "encoding",
         "the header starts with a UTF-8 byte order mark, not '{' (json.loads on bytes "
         "would skip it)")
def _() -> bytes:
    return frame(b"\xef\xbb\xbf" + dumps({"a": GOOD}), GOOD_BYTES)


@hostile("header_utf16", "encoding",
         "a sound header encoded as UTF-16-LE, padded with UTF-16 spaces: its first byte is "
         "'{' and json.loads on bytes detects UTF-16 and parses it; as UTF-8 it is '{' NUL ...")
def _() -> bytes:
    text = json.dumps({"a": GOOD}, separators=(",", ":")).encode("utf-16-le")
    text += " ".encode("utf-16-le") * ((-len(text) % 8) // 2)
    return frame(text, GOOD_BYTES, pad=False)


@hostile("name_lone_surrogate_escape", "encoding",
         "a tensor name written as the JSON escape \\ud800, a lone surrogate: the bytes are "
         "ASCII but the name is no Unicode string (it cannot be encoded to UTF-8 again)")
def _() -> bytes:
    return frame(b'{"\\ud800":' + dumps(GOOD) + b"}", GOOD_BYTES)


# --- json: the header's syntax and type


@hostile("header_not_json", "json", "the header is {'a': 1}, a Python literal, not JSON")
def _() -> bytes:
    return frame(b"{'a': 1}", GOOD_BYTES)


@hostile("header_truncated_json", "json", "the header's closing brace is missing")
def _() -> bytes:
    return frame(dumps({"a": GOOD})[:-1], GOOD_BYTES)


@hostile("header_is_list", "json", "the header is a JSON list of one entry")
def _() -> bytes:
    return frame(dumps([GOOD]), GOOD_BYTES)


@hostile("header_is_number", "json", "the header is the JSON number 12345678")
def _() -> bytes:
    return frame(b"12345678")


@hostile("header_is_string", "json", 'the header is the JSON string "{}"')
def _() -> bytes:
    return frame(b'"{}"')


@hostile("header_leading_spaces", "json",
         "a sound header preceded by three spaces: it does not begin with '{'",
         upstream="accepts",
         note="the README says the header MUST begin with '{'; safetensors 0.8.0 parses it "
              "anyway (JSON allows leading whitespace)")
def _() -> bytes:
    return frame(b"   " + dumps({"a": GOOD}), GOOD_BYTES)


@hostile("header_trailing_junk", "json", "a sound header followed by 'xyz' inside N")
def _() -> bytes:
    return frame(dumps({"a": GOOD}) + b"xyz", GOOD_BYTES)


@hostile("header_padded_with_nul", "json", "a sound header padded with NUL bytes, not spaces")
def _() -> bytes:
    text = dumps({"a": GOOD})
    return frame(text + b"\0" * (8 + -len(text) % 8), GOOD_BYTES, pad=False)


@hostile("header_padded_with_newlines", "json",
         "a sound header padded with newlines and tabs, not spaces (0x20)",
         upstream="accepts",
         note="padding is specified as 0x20; serde_json takes any JSON whitespace. A "
              "judgement call: llmwire takes the letter of the format")
def _() -> bytes:
    text = dumps({"a": GOOD})
    return frame(text + b"\n\t" * ((8 + -len(text) % 8) // 2), GOOD_BYTES, pad=False)


@hostile("header_nan_literal", "json",
         "a shape holds the bare literal NaN: not JSON, but Python's json.loads accepts it")
def _() -> bytes:
    return frame(b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,4]}}', GOOD_BYTES)


@hostile("header_deep_nesting_metadata", "json",
         f"a metadata value nested {DEEP:,} lists deep (Python's json raises RecursionError)",
         stored=False)
def _() -> bytes:
    text = b'{"__metadata__":{"k":' + b"[" * DEEP + b"]" * DEEP + b'},"a":' + dumps(GOOD) + b"}"
    return frame(text, GOOD_BYTES)


@hostile("header_deep_nesting_entry", "json",
         f"an entry's shape nested {DEEP:,} objects deep", stored=False)
def _() -> bytes:
    text = (b'{"a":{"dtype":"U8","data_offsets":[0,4],"shape":' + b'{"x":' * DEEP + b"4"
            + b"}" * DEEP + b"}}")
    return frame(text, GOOD_BYTES)


# --- duplicates: JSON parsers keep one of the same key silently


@hostile("duplicate_name", "duplicates",
         "the name 'a' twice over the same 4 bytes, as U8[4] then as F32[1]: each alone is "
         "sound, and two readers would see different tensors", entry="a",
         upstream="accepts", note="safetensors 0.8.0 keeps the last one (F32[1])")
def _() -> bytes:
    return frame(b'{"a":' + dumps(info("U8", (4,), (0, 4))) + b',"a":'
                 + dumps(info("F32", (1,), (0, 4))) + b"}", struct.pack("<f", 1.0))


@hostile("duplicate_field_in_entry", "duplicates",
         "entry 'bad' gives dtype twice (U8 then I8): either is sound", entry="bad")
def _() -> bytes:
    return frame(b'{"good":' + dumps(GOOD) + b',"bad":{"dtype":"U8","shape":[4],'
                 b'"data_offsets":[4,8],"dtype":"I8"}}', GOOD_BYTES + b"\x01\x02\x03\xff")


@hostile("duplicate_metadata_key", "duplicates",
         "the key 'k' twice in __metadata__", upstream="accepts",
         note="serde_json fills a HashMap and keeps the last value")
def _() -> bytes:
    return frame(b'{"__metadata__":{"k":"1","k":"2"},"a":' + dumps(GOOD) + b"}", GOOD_BYTES)


@hostile("duplicate_metadata_object", "duplicates",
         "two __metadata__ objects")
def _() -> bytes:
    return frame(b'{"__metadata__":{"k":"1"},"a":' + dumps(GOOD)
                 + b',"__metadata__":{"k":"2"}}', GOOD_BYTES)


# --- entries: the object that describes one tensor


@hostile("entry_not_object", "entry", "entry 'bad' is a list [dtype, shape, offsets]",
         entry="bad", upstream="accepts",
         note="serde's derived struct reader also takes a JSON array of the fields in "
              "order, so [\"U8\", [4], [4, 8]] reads as a sound entry")
def _() -> bytes:
    return with_bad(["U8", [4], [4, 8]], b"abcd")


@hostile("entry_missing_dtype", "entry", "entry 'bad' has no dtype", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (4, 8), no_dtype=True), b"abcd")


@hostile("entry_missing_shape", "entry", "entry 'bad' has no shape", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (4, 8), no_shape=True), b"abcd")


@hostile("entry_missing_data_offsets", "entry", "entry 'bad' has no data_offsets",
         entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (4, 8), no_data_offsets=True), b"abcd")


# --- dtype


@hostile("dtype_unknown", "dtype", "entry 'bad' has dtype 'X32' (not in the spec's list)",
         entry="bad")
def _() -> bytes:
    return with_bad(info("X32", (1,), (4, 8)), b"abcd")


@hostile("dtype_lowercase", "dtype", "entry 'bad' has dtype 'f32': tags are case-sensitive",
         entry="bad")
def _() -> bytes:
    return with_bad(info("f32", (1,), (4, 8)), struct.pack("<f", 1.0))


@hostile("dtype_not_string", "dtype", "entry 'bad' has dtype 4 (a number)", entry="bad")
def _() -> bytes:
    return with_bad(info(4, (1,), (4, 8)), b"abcd")


# --- shape


@hostile("shape_not_list", "shape",
         "entry 'bad' has shape 4, a number (read as [4] it would fit its 16 bytes)",
         entry="bad")
def _() -> bytes:
    return with_bad(info("F32", 4, (4, 20)), pack("F32", [1.0, 2.0, 3.0, 4.0]))


@hostile("shape_negative_dims", "shape",
         "entry 'bad' has shape [-2, -2]: the product 4 fits its 16 bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (-2, -2), (4, 20)), pack("F32", [1.0, 2.0, 3.0, 4.0]))


@hostile("shape_dim_fraction", "shape",
         "entry 'bad' has shape [1.5, 2]: the product 3.0 fits its 12 bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (1.5, 2), (4, 16)), pack("F32", [1.0, 2.0, 3.0]))


@hostile("shape_dim_integral_float", "shape",
         "entry 'bad' has shape [2.0]: int() would take it", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (2.0,), (4, 12)), pack("F32", [1.0, 2.0]))


@hostile("shape_dim_string", "shape", "entry 'bad' has shape [\"3\"]", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", ("3",), (4, 16)), pack("F32", [1.0, 2.0, 3.0]))


@hostile("shape_dim_bool", "shape",
         "entry 'bad' has shape [true, 2]: a Python bool is an int (True == 1)", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (True, 2), (4, 12)), pack("F32", [1.0, 2.0]))


@hostile("shape_dim_null", "shape", "entry 'bad' has shape [null] and no bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (None,), (4, 4)), b"")


@hostile("shape_too_many_dims", "shape",
         "entry 'bad' has 1,000 dimensions of 1: the spec sets no limit, llmwire does (a "
         "limit of 64 is what we suggest: torch itself takes 1,000)", entry="bad",
         upstream="accepts",
         note="a limit of llmwire's, not of the format; safetensors and torch take 1,000 "
              "dimensions")
def _() -> bytes:
    return with_bad(info("U8", (1,) * 1000, (4, 5)), b"\x07")


@hostile("shape_dim_beyond_u64", "arithmetic",
         "entry 'bad' has shape [2**64]: no u64 holds that dimension", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (2**64,), (4, 4)), b"")


@hostile("shape_numel_wraps_u64", "arithmetic",
         "entry 'bad' U8 [2**32, 2**32]: numel 2**64 wraps to 0 in u64, matching its empty range",
         entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (2**32, 2**32), (4, 4)), b"")


@hostile("shape_nbytes_wraps_u64", "arithmetic",
         "entry 'bad' F32 [2**62]: numel fits a u64, numel * 4 = 2**64 wraps to 0, matching "
         "its empty range", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (2**62,), (4, 4)), b"")


@hostile("shape_product_overflows_i64", "arithmetic",
         "entry 'bad' U8 [2**62, 4]: numel 2**64 overflows int64 (NumPy's prod wraps to 0) "
         "and matches its empty range", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (2**62, 4), (4, 4)), b"")


# --- data_offsets: each entry's range


@hostile("offsets_not_list", "offsets", "entry 'bad' has data_offsets \"4,8\"", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), "4,8"), b"abcd")


@hostile("offsets_null", "offsets", "entry 'bad' has data_offsets null", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (0,), None), b"")


@hostile("offsets_one_number", "offsets", "entry 'bad' has data_offsets [8]", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (8,)), b"abcd")


@hostile("offsets_three_numbers", "offsets", "entry 'bad' has data_offsets [4, 8, 8]",
         entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (4, 8, 8)), b"abcd")


@hostile("offsets_floats", "offsets", "entry 'bad' has data_offsets [4.0, 8.0]", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (4.0, 8.0)), b"abcd")


@hostile("offsets_strings", "offsets", "entry 'bad' has data_offsets [\"4\", \"8\"]",
         entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), ("4", "8")), b"abcd")


@hostile("offsets_bools", "offsets",
         "the only entry 'bad' has data_offsets [false, true] (== [0, 1] to Python) over 1 byte",
         entry="bad")
def _() -> bytes:
    return frame(dumps({"bad": info("U8", (1,), (False, True))}), b"\x07")


@hostile("offsets_negative", "offsets",
         "entry 'bad' has data_offsets [-4, 0]: its length 4 fits F32[1]", entry="bad")
def _() -> bytes:
    return frame(dumps({"bad": info("F32", (1,), (-4, 0)), "good": GOOD}), GOOD_BYTES)


@hostile("offsets_reversed", "offsets", "entry 'bad' has data_offsets [8, 4] (begin > end)",
         entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (1,), (8, 4)), b"abcd")


@hostile("offsets_end_beyond_file", "offsets",
         "entry 'bad' F32[2] has data_offsets [4, 12] but the data region holds 8 bytes",
         entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (2,), (4, 12)), b"abcd")


@hostile("offsets_wrap_u64", "arithmetic",
         "entry 'bad' has data_offsets [2**64 + 4, 2**64 + 8]: taken mod 2**64 they are the "
         "sound [4, 8]", entry="bad")
def _() -> bytes:
    return with_bad(info("U8", (4,), (2**64 + 4, 2**64 + 8)), b"abcd")


# --- layout: the ranges together must tile the data region


@hostile("offsets_overlap", "layout",
         "F32[2] 'good' at [0, 8] and F32[2] 'bad' at [4, 12]: the union is the whole "
         "12-byte region, with no hole", entry="bad")
def _() -> bytes:
    return frame(dumps({"good": info("F32", (2,), (0, 8)), "bad": info("F32", (2,), (4, 12))}),
                 pack("F32", [1.0, 2.0, 3.0]))


@hostile("offsets_alias", "layout",
         "'good' and 'bad' are both F32[1] at [0, 4]: one tensor under two names",
         entry=["good", "bad"])
def _() -> bytes:
    return frame(dumps({"good": info("F32", (1,), (0, 4)), "bad": info("F32", (1,), (0, 4))}),
                 pack("F32", [1.0]))


@hostile("offsets_hole", "layout",
         "'good' at [0, 4], 'bad' at [8, 12]: 4 bytes between them belong to no tensor",
         entry="bad")
def _() -> bytes:
    return frame(dumps({"good": GOOD, "bad": info("U8", (4,), (8, 12))}),
                 GOOD_BYTES + b"HOLE" + b"abcd")


@hostile("offsets_not_from_zero", "layout",
         "the only entry 'bad' is at [4, 8]: the data region's first 4 bytes belong to none",
         entry="bad")
def _() -> bytes:
    return frame(dumps({"bad": info("U8", (4,), (4, 8))}), b"HOLEabcd")


@hostile("trailing_bytes_after_last_tensor", "layout",
         "'a' at [0, 4] and 4 more bytes after it to the end of the file")
def _() -> bytes:
    return frame(dumps({"a": GOOD}), GOOD_BYTES + b"tail")


@hostile("no_tensors_with_data", "layout",
         "the header is {} and 8 bytes of data follow it")
def _() -> bytes:
    return frame(b"{}", b"unindexd")


# --- range length against numel * itemsize


@hostile("shape_too_big_for_range", "length",
         "entry 'bad' F32[3] (12 bytes) has a range of 8 bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (3,), (4, 12)), pack("F32", [1.0, 2.0]))


@hostile("shape_too_small_for_range", "length",
         "entry 'bad' F32[1] (4 bytes) has a range of 8 bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (1,), (4, 12)), pack("F32", [1.0, 2.0]))


@hostile("scalar_with_empty_range", "length",
         "entry 'bad' F32 shape [] (a scalar: 1 element, 4 bytes) has an empty range",
         entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (), (4, 4)), b"")


@hostile("empty_tensor_with_bytes", "length",
         "entry 'bad' F32[0] (0 bytes) has a range of 4 bytes", entry="bad")
def _() -> bytes:
    return with_bad(info("F32", (0,), (4, 8)), b"abcd")


# --- __metadata__


@hostile("metadata_not_object", "metadata", "__metadata__ is the list [\"k\", \"v\"]")
def _() -> bytes:
    return frame(dumps({"__metadata__": ["k", "v"], "a": GOOD}), GOOD_BYTES)


@hostile("metadata_is_null", "metadata", "__metadata__ is null", upstream="accepts",
         note="serde reads null as 'no metadata' (an Option); the format says a "
              "string-to-string map")
def _() -> bytes:
    return frame(dumps({"__metadata__": None, "a": GOOD}), GOOD_BYTES)


@hostile("metadata_value_number", "metadata", "__metadata__ {\"k\": 1}")
def _() -> bytes:
    return frame(dumps({"__metadata__": {"k": 1}, "a": GOOD}), GOOD_BYTES)


@hostile("metadata_value_null", "metadata", "__metadata__ {\"k\": null}")
def _() -> bytes:
    return frame(dumps({"__metadata__": {"k": None}, "a": GOOD}), GOOD_BYTES)


@hostile("metadata_value_object", "metadata", "__metadata__ {\"k\": {\"x\": \"y\"}}")
def _() -> bytes:
    return frame(dumps({"__metadata__": {"k": {"x": "y"}}, "a": GOOD}), GOOD_BYTES)


# --- valid files


def T(name: str, tag: str, shape: tuple[int, ...], data: bytes) -> Tensor:
    return Tensor(name, tag, shape, data)


#: a NaN with a payload, +inf, -0.0, the smallest subnormal, 1.0, -2.5
F32_AWKWARD = f32_bits([0x7FC00001, 0x7F800000, 0x80000000, 0x00000001, 0x3F800000, 0xC0200000])

DTYPE_TENSORS = [
    # laid out by falling element size, as upstream's writer does, so each is aligned
    T("f64", "F64", (3,), pack("F64", [3.141592653589793, -1e300, 5e-324])),
    T("i64", "I64", (3,), pack("I64", [-2**63, 2**63 - 1, 0])),
    T("u64", "U64", (2,), pack("U64", [0, 2**64 - 1])),
    T("f32", "F32", (2, 3), F32_AWKWARD),
    T("f32_3d", "F32", (2, 3, 4), pack("F32", [float(i) for i in range(24)])),
    T("i32", "I32", (2,), pack("I32", [-2**31, 2**31 - 1])),
    T("u32", "U32", (2,), pack("U32", [0, 2**32 - 1])),
    T("f16", "F16", (4,), pack("F16", [0x3C00, 0xC000, 0x7E01, 0x0001])),
    T("bf16", "BF16", (2, 2), pack("BF16", [0x3F80, 0xBF80, 0x7F80, 0x0001])),
    T("i16", "I16", (2,), pack("I16", [-32768, 32767])),
    T("u16", "U16", (2,), pack("U16", [0, 65535])),
    T("i8", "I8", (4,), pack("I8", [-128, -1, 0, 127])),
    T("u8", "U8", (2, 2), pack("U8", [0, 1, 254, 255])),
    T("bool", "BOOL", (3,), pack("BOOL", [1, 0, 1])),
]

valid("dtypes", "every dtype llmwire maps (13), NaN with payload, inf, -0.0, subnormals, "
      "3-D C order, metadata", DTYPE_TENSORS,
      metadata={"format": "pt", "source": "llmwire corpus"})

valid("scalar", "0-rank tensors (shape []) of F32, I64 and BOOL; an empty __metadata__ {}",
      [T("s_f32", "F32", (), pack("F32", [2.5])), T("s_i64", "I64", (), pack("I64", [-7])),
       T("s_bool", "BOOL", (), pack("BOOL", [1]))], metadata={})

valid("all_empty", "every tensor has a 0 dimension; all share the range [0, 0]; the data "
      "region is empty", [T("e0", "F32", (0,), b""), T("e1", "I8", (3, 0), b""),
                          T("e2", "BF16", (0, 5, 2), b"")])

valid("empty_between", "empty tensors before, between and after non-empty ones (zero-length "
      "ranges that touch their neighbours)",
      [T("first_empty", "F32", (0,), b""), T("x", "F32", (2,), pack("F32", [1.0, 2.0])),
       T("mid_empty", "I64", (0, 3), b""), T("y", "F32", (1,), pack("F32", [3.0])),
       T("last_empty", "U8", (0,), b"")])

valid("no_tensors", "the header {} padded to 8 bytes, nothing else", [])

valid("metadata_only", "no tensors, only __metadata__", [],
      metadata={"format": "pt", "note": "no tensors here"})

valid("padded_header", "a header followed by 256 spaces of padding",
      [T("w", "F32", (2,), pack("F32", [0.5, -0.5]))], extra_padding=256)

valid("header_order_differs", "the header lists z, a, m (and __metadata__ last); their data "
      "lies in the order a, m, z",
      [T("a", "F32", (2,), pack("F32", [1.0, 2.0])), T("m", "I32", (1,), pack("I32", [42])),
       T("z", "U8", (3,), pack("U8", [7, 8, 9]))],
      header_order=["z", "a", "m"], metadata={"order": "z a m"}, metadata_last=True)

valid("empty_name", "a tensor named \"\": the format sets no rule on names, and safetensors "
      "reads it", [T("", "F32", (2,), pack("F32", [1.0, 1.0])),
                   T("b", "U8", (1,), pack("U8", [1]))])

UNICODE_TENSORS = [
    T("caf\u00e9", "F32", (1,), pack("F32", [1.0])),
    T("\U0001F600.weight", "F32", (1,), pack("F32", [2.0])),
    T('quote"d\\back', "F32", (1,), pack("F32", [3.0])),
    T("tab\there", "F32", (1,), pack("F32", [4.0])),
]
UNICODE_METADATA = {"auteur": "Zo\u00eb", "emoji": "\U0001F600"}

valid("unicode_names_raw", "non-ASCII names and metadata as raw UTF-8; a name with \\\", "
      "\\\\ and \\t escapes", UNICODE_TENSORS, metadata=UNICODE_METADATA)

valid("unicode_names_escaped", "the same names and metadata written as ASCII JSON escapes "
      "(\\u00e9, the surrogate pair \\ud83d\\ude00)", UNICODE_TENSORS,
      metadata=UNICODE_METADATA, ascii_only=True)

valid("unaligned_data", "an unpadded header and a U8 first, so the F32 and F64 after it "
      "are not aligned (MLX writes files like this)",
      [T("u8", "U8", (1,), pack("U8", [7])), T("f32", "F32", (2,), pack("F32", [1.5, -2.0])),
       T("f64", "F64", (1,), pack("F64", [0.1]))], pad_to=1)

valid("pretty_header", "a header written with newlines and indentation between its tokens",
      [T("w", "F32", (2, 2), pack("F32", [1.0, 2.0, 3.0, 4.0]))],
      metadata={"k": "v"}, indent=2)


# ------------------------------------------------------------------ output


def case_named(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(name)


def write_case(case: Case, out: Path) -> Path:
    path = out / case.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(case.build())
    return path


def expected() -> dict[str, Any]:
    files: dict[str, Any] = {}
    for case in CASES:
        row: dict[str, Any] = {"kind": case.kind, "category": case.category,
                               "what": case.what, "stored": case.stored,
                               "safetensors_refuses": case.upstream == "refuses"}
        if case.kind == "hostile":
            row["entry"] = case.entry
        else:
            by_name = {t.name: t for t in case.tensors}
            row["metadata"] = case.metadata
            row["tensors"] = [{"name": name, "dtype": DTYPES[by_name[name].dtype][0],
                               "safetensors_dtype": by_name[name].dtype,
                               "shape": list(by_name[name].shape),
                               "bytes": by_name[name].data.hex()} for name in case.header_order]
        files[case.path] = row
    return {"observed_with_safetensors": OBSERVED_WITH, "files": files}


README_HEAD = """\
# safetensors corpus: hostile and valid files

Written by `make_corpus.py` (this README too: edit the script, then run it);
checked by `tests/test_checkpoints_hostile.py`. Every `hostile/` file must be
refused by `llmwire.checkpoints.open_checkpoint` with a `CheckpointError`
(and by `llmwire send` before it connects); every `valid/` file must open and
give what `safetensors.torch.load_file` gives.

The format, from huggingface/safetensors (README "Format",
`safetensors/src/tensor.rs`): 8 bytes, N, a little-endian u64; N bytes of
UTF-8 JSON that begin with `{` and may be padded at the end with spaces
(0x20); the data region. The JSON maps tensor names to `{"dtype", "shape",
"data_offsets": [begin, end]}` (offsets from the start of the data region)
and may hold `"__metadata__"`, a string-to-string object. N <= 100,000,000
and N <= the file; `end - begin == numel * itemsize` in checked arithmetic;
sorted by offsets, each range begins where the previous ended, the first at
0, the last at the end of the file; duplicate keys are disallowed. Empty
tensors (a 0 dimension, zero-length range) and scalars (shape `[]`) are
allowed.

Files marked *not stored* are too large to keep (100,000 levels of nesting):
the tests write them into a temporary folder with `make_corpus.write_case`.

`expected.json` holds, for every file (key: its path under this folder):
`kind` (hostile | valid), `category`, `what`, `stored`, and
`safetensors_refuses` (what safetensors {version} did: `safe_open` plus
every `get_tensor`, and `load_file`). Hostile files add `entry`: the tensor
name the error must give (`CheckpointError.entry`, and `entry '<name>'` in its
message), a list when either of two names is right (the fault lies between
them), or null when the fault is the file's or the header's as a whole (no
entry is required). Valid files add `metadata` and `tensors` in header order:
`name`, `dtype` (llmwire's name), `safetensors_dtype`, `shape`, `bytes` (hex,
little-endian, C order).

"""


def readme() -> str:
    lines = [README_HEAD.replace("{version}", OBSERVED_WITH)]
    lines.append("## Hostile files\n")
    lines.append(f"| file | category | what is wrong | entry | safetensors {OBSERVED_WITH} |")
    lines.append("| --- | --- | --- | --- | --- |")
    for case in CASES:
        if case.kind != "hostile":
            continue
        entry = ("-" if case.entry is None else
                 " or ".join(f"`{e}`" for e in ([case.entry] if isinstance(case.entry, str)
                                                else case.entry)))
        verdict = "refuses" if case.upstream == "refuses" else "**accepts**"
        name = f"`{case.name}`" + ("" if case.stored else " (not stored)")
        lines.append(f"| {name} | {case.category} | {_cell(case.what)} | {entry} | {verdict} |")
    lines.append("\n## Valid files\n")
    lines.append(f"| file | what it exercises | safetensors {OBSERVED_WITH} |")
    lines.append("| --- | --- | --- |")
    for case in CASES:
        if case.kind == "valid":
            lines.append(f"| `{case.name}` | {_cell(case.what)} | reads it |")
    lines.append("\n## Where safetensors accepts a hostile file\n")
    for case in CASES:
        if case.kind == "hostile" and case.upstream == "accepts":
            lines.append(f"- `{case.name}`: {case.note}.")
    lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Markdown: a backslash and a pipe stand for themselves, __metadata__ is no bold."""
    return (text.replace("\\", "\\\\").replace("|", "\\|")
            .replace("__metadata__", "`__metadata__`"))


def write_all(out: Path) -> list[Path]:
    """Write every stored case, expected.json and README.md under ``out``."""
    assert len({c.path for c in CASES}) == len(CASES)
    written = [write_case(case, out) for case in CASES if case.stored]
    (out / "expected.json").write_text(json.dumps(expected(), indent=1) + "\n")
    (out / "README.md").write_text(readme())
    return written + [out / "expected.json", out / "README.md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder to write into (default: next to this script)")
    args = parser.parse_args(argv)
    written = write_all(args.out)
    print(f"wrote {len(written)} files under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
