"""The processes of ``llmwire bench link``: one sender or receiver per run,
started by the bench (inside a network namespace with ``ip netns exec``, or
on loopback), each printing JSON lines on stdout:

- receivers: ``{"port": P}`` once listening, ``{"end": T, ...}`` once
  everything arrived (T: ``time.time()``, one clock for every namespace);
- senders: ``{"start": T, "wire_bytes": N}`` after the receiver's
  acknowledgement (T: just before the first byte was handed to the socket).

Systems: ``raw`` (blocking ``sendall`` of a reused buffer / ``recv_into``),
``llmwire`` (``send_state_dict`` / ``receive_state_dict`` in place into a
zeroed state dict of the same shapes) and
``nvflare`` (CellNet's ``tcp`` driver moving a BLOB with the sender and
receiver cells of ``nvflare.fuel.f3.streaming.tools``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

SECRET = b"bench-link"
TIMEOUT = 900.0


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# --- raw TCP ------------------------------------------------------------------------

def raw_recv(listen: tuple[str, int], nbytes: int) -> None:
    srv = socket.create_server(listen)
    _say(port=srv.getsockname()[1])
    s, _ = srv.accept()
    buf = memoryview(bytearray(4 << 20))
    left = nbytes
    while left:
        n = s.recv_into(buf, min(left, len(buf)))
        if not n:
            raise RuntimeError(f"raw sender closed after {nbytes - left} of {nbytes} bytes")
        left -= n
    _say(end=time.time(), bytes=nbytes)
    s.sendall(b"k")
    s.close()
    srv.close()


def raw_send(to: tuple[str, int], nbytes: int) -> None:
    s = socket.create_connection(to, timeout=TIMEOUT)
    data = memoryview(os.urandom(4 << 20))
    start = time.time()
    left = nbytes
    while left:
        n = min(left, len(data))
        s.sendall(data[:n])
        left -= n
    if s.recv(1) != b"k":
        raise RuntimeError("raw receiver did not acknowledge")
    s.close()
    _say(start=start, wire_bytes=nbytes)


# --- llmwire ------------------------------------------------------------------------

def _wire_imports() -> None:
    """What a transfer will import, before the clock starts (torch takes a second)."""
    import llmwire.payloads  # noqa: F401
    from llmwire.tensors import torch_module

    torch_module()


def wire_recv(listen: tuple[str, int], params: int) -> None:
    import asyncio

    import torch

    import llmwire
    from llmwire.cli.synthetic import llama_shapes

    _wire_imports()
    # In place, as a client holding its model receives: no fresh pages
    # faulted in while the clock runs.
    target = {name: torch.zeros(shape) for name, shape in llama_shapes(params).items()}

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            received = await llmwire.receive_state_dict(t, target)
            end = time.time()
            windows = t.connection.receive_windows
            await t.send_message({"ok": True})
            done.set_result((end, len(received), max(windows.values())))
            await t.wait_closed()

        server = await llmwire.serve(handler, listen[0], listen[1], secret=SECRET)
        _say(port=server.port)
        end, entries, window = await asyncio.wait_for(done, TIMEOUT)
        _say(end=end, entries=entries, window=window)
        await server.close()

    llmwire.run(main())


def wire_send(to: tuple[str, int], params: int, fmt: str) -> None:
    import llmwire
    from llmwire.cli.synthetic import llama_state_dict

    _wire_imports()
    state = llama_state_dict(params, seed=1, container="numpy")

    async def main() -> None:
        t = await llmwire.connect(to[0], to[1], secret=SECRET)
        start = time.time()
        result = await llmwire.send_state_dict(t, state, fmt)
        await t.receive_message()
        await t.close()
        _say(start=start, wire_bytes=result.wire_bytes)

    llmwire.run(main())


# --- NVFlare CellNet ----------------------------------------------------------------

def nvflare_recv(listen: tuple[str, int]) -> None:
    import threading

    from nvflare.fuel.f3.streaming.tools import receiver

    port = listen[1]
    if port == 0:  # CellNet needs the port in its URL: take a free one
        with socket.socket() as probe:
            probe.bind((listen[0], 0))
            port = probe.getsockname()[1]
    arrived = threading.Event()
    ended: list[tuple[float, int]] = []
    shipped = receiver.request_cb

    def request_cb(message: Any) -> Any:
        ended.append((time.time(), len(message.payload)))
        arrived.set()
        return shipped(message)

    receiver.request_cb = request_cb  # the shipped callback, timed
    cell = receiver.create_receiver_cell(f"tcp://{listen[0]}:{port}")
    _say(port=port)
    try:
        if not arrived.wait(TIMEOUT):
            raise RuntimeError("no BLOB arrived")
        _say(end=ended[0][0], bytes=ended[0][1])
        time.sleep(1.0)  # let the reply go out, as the shipped receiver does
    finally:
        cell.stop()


def nvflare_send(to: tuple[str, int], nbytes: int) -> None:
    from nvflare.fuel.f3.message import Message
    from nvflare.fuel.f3.streaming.tools import sender
    from nvflare.fuel.f3.streaming.tools.utils import (
        RX_CELL, TEST_CHANNEL, TEST_TOPIC, TIMESTAMP, make_buffer)

    cell = sender.create_sender_cell(f"tcp://{to[0]}:{to[1]}")
    try:
        buffer = make_buffer(nbytes)
        if not sender.receiver_ready.wait(120):
            raise RuntimeError("the NVFlare receiver cell never came online")
        start = time.time()
        reply = cell.send_request(channel=TEST_CHANNEL, topic=TEST_TOPIC, target=RX_CELL,
                                  request=Message({TIMESTAMP: start}, buffer),
                                  timeout=TIMEOUT)
        if not (reply and reply.payload):
            raise RuntimeError(f"NVFlare sender: no reply ({reply and reply.headers})")
        _say(start=start, wire_bytes=nbytes)
    finally:
        cell.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m llmwire.cli.bench._linkpeer")
    p.add_argument("role", choices=["raw-recv", "raw-send", "llmwire-recv", "llmwire-send",
                                    "nvflare-recv", "nvflare-send"])
    p.add_argument("--listen", type=_address)
    p.add_argument("--to", type=_address)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--params", type=int, default=0)
    p.add_argument("--format", default="raw")
    a = p.parse_args(argv)
    if a.role.startswith("nvflare"):
        import logging
        logging.disable(logging.WARNING)  # CellNet logs every connection at INFO
    try:
        {"raw-recv": lambda: raw_recv(a.listen, a.bytes),
         "raw-send": lambda: raw_send(a.to, a.bytes),
         "llmwire-recv": lambda: wire_recv(a.listen, a.params),
         "llmwire-send": lambda: wire_send(a.to, a.params, a.format),
         "nvflare-recv": lambda: nvflare_recv(a.listen),
         "nvflare-send": lambda: nvflare_send(a.to, a.bytes)}[a.role]()
    except Exception as exc:  # the bench prints it as the run's one-line failure
        _say(error=f"{a.role}: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
