"""Write the protocol-version-2 entries of frames.json: the v2 preface and
a stream digest of three DATA payloads, computed here from the definition in
docs/protocol.md (section 5) with xxhash alone, not with llmwire's code.

    python3 tests/vectors/make_digest_vectors.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import xxhash

PATH = Path(__file__).parent / "frames.json"
MAGIC = b"\x89LLMW\r\n\x1a"


def stream_digest(payloads: list[bytes]) -> bytes:
    h = xxhash.xxh3_128()
    for p in payloads:
        h.update(struct.pack("!IQ", len(p), xxhash.xxh3_64_intdigest(p)))
    return h.digest()


def main() -> None:
    vectors = json.loads(PATH.read_text())
    payloads = [b"abc", bytes(range(256)), b"\x00" * 1000]
    vectors["preface_v2"] = (MAGIC + struct.pack("!HH", 2, 2)).hex()
    vectors["stream_digest_v2"] = {"payloads": [p.hex() for p in payloads],
                                   "digest": stream_digest(payloads).hex()}
    PATH.write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    main()
