"""``llmwire bench wire``: llmwire stream throughput against raw loopback TCP.

Both measurements run in the same invocation, alternating, each in a fresh
pair of processes (one sends, one receives) over 127.0.0.1:

- raw: blocking ``sendall`` of a reused chunk / ``recv_into`` a reused buffer;
- llmwire: one stream over :func:`llmwire.connect` / :func:`llmwire.serve`
  (uvloop when installed): ``await stream.send(chunk)``, ``await
  stream.end()``; the receiver iterates the stream (checksums and digest
  verified) and returns credit as it consumes.

The sender's clock runs from its first byte until the receiver's one-byte
(raw) or one-message (llmwire) acknowledgement that everything arrived;
over the same span the sender's own user + system CPU time is taken
(``os.times``), reported per GiB: the cost of the protocol and its
integrity pass on top of the socket's. The figures printed are medians over
``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from typing import Any

from ._procs import reap

GIB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument("--bytes", type=int, default=GIB,
                        help="bytes per run (default: 1 GiB)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default: 5)")
    parser.add_argument("--chunk", type=int, default=4 << 20,
                        help="bytes per send call (default: 4 MiB)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: raw_gbps, llmwire_gbps, ratio, "
                             "sender CPU per GiB, ...")


# --- raw ---------------------------------------------------------------------------

def accept_one(conn: Any) -> tuple[socket.socket, socket.socket]:
    """Listen on a free loopback port, tell ``conn`` the port, accept one peer;
    returns (connected socket, listening socket)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(srv.getsockname()[1])
    s, _ = srv.accept()
    return s, srv


def _raw_receiver(conn: Any, nbytes: int, chunk: int) -> None:
    s, srv = accept_one(conn)
    buf = bytearray(chunk)
    view = memoryview(buf)
    left = nbytes
    while left:
        n = s.recv_into(view, min(left, chunk))
        if not n:
            raise RuntimeError("raw sender closed early")
        left -= n
    s.sendall(b"k")
    s.close()
    srv.close()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _raw_sender(conn: Any, port: int, nbytes: int, chunk: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    data = memoryview(os.urandom(chunk))
    t0, cpu0 = time.perf_counter(), _cpu()
    left = nbytes
    while left:
        n = min(left, chunk)
        s.sendall(data[:n])
        left -= n
    assert s.recv(1) == b"k"
    conn.send((time.perf_counter() - t0, _cpu() - cpu0))
    s.close()


# --- llmwire -----------------------------------------------------------------------

def _wire_receiver(conn: Any, nbytes: int, chunk: int) -> None:
    import asyncio

    import llmwire

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            rs = await t.accept_stream()
            got = 0
            async for piece in rs:
                got += len(piece)
            if got != nbytes:
                raise RuntimeError(f"received {got} of {nbytes} bytes")
            await t.send_message({"ok": True})
            await t.wait_closed()
            done.set_result(None)

        srv = await llmwire.serve(handler, "127.0.0.1", 0, secret=b"bench")
        conn.send(srv.port)
        await asyncio.wait_for(done, 600)
        await srv.close()

    llmwire.run(main())


def _wire_sender(conn: Any, port: int, nbytes: int, chunk: int) -> None:
    import llmwire

    async def main() -> tuple[float, float]:
        t = await llmwire.connect("127.0.0.1", port, secret=b"bench")
        data = memoryview(os.urandom(chunk))
        stream = await t.open_stream({"bench": "wire", "bytes": nbytes})
        t0, cpu0 = time.perf_counter(), _cpu()
        left = nbytes
        while left:
            n = min(left, chunk)
            await stream.send(data[:n])
            left -= n
        await stream.end()
        await t.receive_message()
        measured = time.perf_counter() - t0, _cpu() - cpu0
        await t.close()
        return measured

    conn.send(llmwire.run(main()))


# --- driver ------------------------------------------------------------------------

def _one_run(ctx: Any, receiver: Any, sender: Any, nbytes: int, chunk: int) -> float:
    """Seconds one transfer took, by the sender's clock."""
    return _measured_run(ctx, receiver, sender, nbytes, chunk)[0]


def _measured_run(ctx: Any, receiver: Any, sender: Any, nbytes: int,
                  chunk: int) -> tuple[float, float | None]:
    """(seconds, sender CPU seconds or None) of one transfer: a sender
    reports seconds, or (seconds, CPU seconds)."""
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    rp = ctx.Process(target=receiver, args=(rchild, nbytes, chunk))
    rp.start()
    try:
        if not rparent.poll(60):
            raise RuntimeError("receiver did not start")
        port = rparent.recv()
        sp = ctx.Process(target=sender, args=(schild, port, nbytes, chunk))
        sp.start()
        try:
            if not sparent.poll(600):
                raise RuntimeError("sender did not finish")
            got = sparent.recv()
        finally:
            reap([sp], 30)
    finally:
        reap([rp], 30)
    if isinstance(got, tuple):
        return float(got[0]), float(got[1])
    return float(got), None


def measure(nbytes: int, runs: int, chunk: int) -> dict[str, Any]:
    """Run both benchmarks ``runs`` times (alternating) and return the figures."""
    ctx = mp.get_context("spawn")
    raw: list[float] = []
    wire: list[float] = []
    raw_cpu: list[float] = []
    wire_cpu: list[float] = []
    for _ in range(runs):
        for kind, rates, cpus in (((_raw_receiver, _raw_sender), raw, raw_cpu),
                                  ((_wire_receiver, _wire_sender), wire, wire_cpu)):
            seconds, cpu = _measured_run(ctx, *kind, nbytes, chunk)
            rates.append(nbytes / seconds / 1e9)
            cpus.append((cpu or 0.0) * GIB / nbytes)
    raw_gbps, wire_gbps = statistics.median(raw), statistics.median(wire)
    raw_cpu_gib, wire_cpu_gib = statistics.median(raw_cpu), statistics.median(wire_cpu)
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return {
        "bytes": nbytes, "runs": runs, "chunk": chunk, "loop": loop,
        "raw_gbps": round(raw_gbps, 3), "llmwire_gbps": round(wire_gbps, 3),
        "ratio": round(wire_gbps / raw_gbps, 3),
        # Runs alternate raw/llmwire; the median of each pair's ratio is less
        # sensitive to other load drifting over the whole measurement.
        "paired_ratio_median": round(statistics.median(w / r for w, r in zip(wire, raw)), 3),
        "raw_runs_gbps": [round(x, 3) for x in raw],
        "llmwire_runs_gbps": [round(x, 3) for x in wire],
        # sender user + system CPU seconds per GiB sent (medians)
        "raw_sender_cpu_s_per_gib": round(raw_cpu_gib, 4),
        "llmwire_sender_cpu_s_per_gib": round(wire_cpu_gib, 4),
        "sender_cpu_s_per_gib_over_raw": round(wire_cpu_gib - raw_cpu_gib, 4),
    }


def run(args: argparse.Namespace) -> int:
    """Run the bench; print a table, or one JSON object with ``--json``."""
    if args.bytes <= 0 or args.runs <= 0 or args.chunk <= 0:
        print("--bytes, --runs and --chunk must be positive", file=sys.stderr)
        return 2
    r = measure(args.bytes, args.runs, args.chunk)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"wire throughput over loopback: {r['bytes']} bytes, median of {r['runs']} runs, "
          f"{r['chunk']}-byte sends, {r['loop']}")
    print(f"  {'transport':<10} {'GB/s':>7}   runs (GB/s)")
    print(f"  {'raw TCP':<10} {r['raw_gbps']:>7.3f}   {r['raw_runs_gbps']}")
    print(f"  {'llmwire':<10} {r['llmwire_gbps']:>7.3f}   {r['llmwire_runs_gbps']}")
    print(f"  ratio llmwire/raw: {r['ratio']:.3f} (median of paired runs: "
          f"{r['paired_ratio_median']:.3f})")
    print(f"  sender CPU (user+system) per GiB: raw {r['raw_sender_cpu_s_per_gib']:.3f} s, "
          f"llmwire {r['llmwire_sender_cpu_s_per_gib']:.3f} s "
          f"(+{r['sender_cpu_s_per_gib_over_raw']:.3f} s)")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python3 -m llmwire.cli.bench.wire",
                                      description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
