"""atheris fuzz target for the frame parser and the connection state machine.

Run:  PYTHONPATH=. python3 tests/fuzz/fuzz_protocol.py [-atheris_runs=100000]
(needs ``pip install atheris``). Every input must be accepted or raise a
documented LlmwireError subclass; anything else is a bug. The hypothesis
tests in tests/test_frames.py and tests/test_protocol.py run the same
property in the normal test suite.
"""

from __future__ import annotations

import sys

from llmwire import frames
from llmwire.errors import LlmwireError
from llmwire.protocol import Connection, Role

_PREFACE = frames.encode_preface(2, 2)


def one_input(data: bytes) -> None:
    try:
        frames.parse_frame(data, 1 << 20)
    except LlmwireError:
        pass
    conn = Connection(Role.SERVER, b"fuzz", nonce=b"N" * 32)
    conn.data_to_send()
    # Half the inputs skip the preface so the fuzzer reaches the frame layer.
    feed = _PREFACE + data[1:] if data[:1] == b"\x00" else data
    try:
        conn.receive_data(feed)
        conn.receive_eof()
    except LlmwireError:
        pass
    conn.events_received()


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
