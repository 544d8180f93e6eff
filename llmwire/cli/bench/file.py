"""``llmwire bench file``: a file over loopback TCP, against raw sockets in the same run.

Creates a file of ``--size`` bytes (random blocks), then alternates,
``--runs`` times each, in fresh processes over 127.0.0.1:

- **raw socket**: blocking ``sendall`` of a reused buffer / ``recv_into`` a
  reused buffer (``llmwire bench wire``'s baseline: no file, no hashing);
- **raw socket to file**: ``sendfile`` of the source file / ``recv_into`` a
  reused buffer, ``pwrite``-ing each into a new file and fsyncing it once
  (the ceiling a receiver that lands bytes on disk can reach);
- **llmwire file**: ``send_file`` / ``receive_file`` (uvloop when installed),
  the receiver landing it crash-safely (``.part``, read-back verdict, rename).

While a file transfer runs, the sender's and the receiver's RSS are sampled
from /proc every 2 ms; each child's baseline is its RSS just before the
transfer (after imports and the connection). Printed: peak RSS over baseline
per side (the largest over runs), the medians of throughput, and the ratios
llmwire / raw socket and llmwire / raw socket to file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

from ..synthetic import parse_size
from ._procs import expect, guard, reap
from ._rss import RssSampler, rss_bytes
from .wire import _one_run, _raw_receiver, _raw_sender, accept_one

__all__ = ["add_arguments", "run", "measure"]

MiB = 1 << 20
SECRET = b"bench-file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument("--size", type=parse_size, default=2 << 30,
                        help="file size, e.g. 1GiB, 500MB (default: 2GiB, as "
                             "tools/measure_file_transfer.py had)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default: 3)")
    parser.add_argument("--chunk", type=int, default=4 * MiB,
                        help="raw sockets' buffer (default: 4 MiB)")
    parser.add_argument("--dir", default=None,
                        help="where the files go (default: the system's temp directory; use "
                             "a real disk, a RAM disk measures no disk)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: raw_socket_gbps, raw_socket_to_file_gbps, "
                             "llmwire_file_gbps, ratios, peaks, per-run lists")


# --- llmwire file ---------------------------------------------------------------------

def _file_receiver(conn: Any, dest: str) -> None:
    guard(conn, lambda: _receive(conn, dest))


def _receive(conn: Any, dest: str) -> None:
    import asyncio

    import llmwire
    from llmwire.payloads.files import receive_file

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            conn.send(("baseline", rss_bytes(os.getpid())[0]))
            result = await receive_file(t, dest, overwrite=True)
            conn.send(("result", (result.size, result.digest)))
            await t.wait_closed()
            done.set_result(None)

        srv = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("port", srv.port))
        await asyncio.wait_for(done, 900)
        await srv.close()

    llmwire.run(main())


def _file_sender(conn: Any, port: int, path: str) -> None:
    guard(conn, lambda: _send(conn, port, path))


def _send(conn: Any, port: int, path: str) -> None:
    import llmwire
    from llmwire.payloads.files import send_file

    async def main() -> None:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        conn.send(("baseline", rss_bytes(os.getpid())[0]))
        conn.recv()                                   # "go"
        started = time.perf_counter()
        result = await send_file(t, path)
        conn.send(("result", (time.perf_counter() - started, result.digest)))
        await t.close()

    llmwire.run(main())


def _file_run(ctx: Any, path: str, dest: str, size: int) -> dict[str, float]:
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    rp = ctx.Process(target=_file_receiver, args=(rchild, dest))
    rp.start()
    sp = None
    try:
        port = expect(rparent, "port", 60, rp, "the receiver")
        sp = ctx.Process(target=_file_sender, args=(schild, port, path))
        sp.start()
        base = {"sender": expect(sparent, "baseline", 60, sp, "the sender"),
                "receiver": expect(rparent, "baseline", 60, rp, "the receiver")}
        with RssSampler({"sender": sp.pid, "receiver": rp.pid}, interval=0.002) as sampler:
            time.sleep(0.05)
            sparent.send("go")
            elapsed, digest = expect(sparent, "result", 900, sp, "the sender")
            got_size, got_digest = expect(rparent, "result", 60, rp, "the receiver")
        if got_size != size or got_digest != digest:
            raise RuntimeError("the received file differs from the one sent")
        peak = {name: timeline.peak() for name, timeline in sampler.timelines.items()}
        return {"gbps": size / elapsed / 1e9,
                "sender_peak_over_baseline": peak["sender"] - base["sender"],
                "receiver_peak_over_baseline": peak["receiver"] - base["receiver"],
                "sender_baseline": base["sender"], "receiver_baseline": base["receiver"]}
    finally:
        reap((sp, rp), 60)


# --- raw socket into a file -----------------------------------------------------------

def _raw_file_receiver(conn: Any, nbytes: int, chunk: int, dest: str) -> None:
    s, srv = accept_one(conn)
    buf = bytearray(chunk)
    view = memoryview(buf)
    fd = os.open(os.path.join(dest, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = 0
    while pos < nbytes:
        n = s.recv_into(view, min(nbytes - pos, chunk))
        if not n:
            raise RuntimeError("raw sender closed early")
        os.pwrite(fd, view[:n], pos)
        pos += n
    os.fsync(fd)
    os.close(fd)
    s.sendall(b"k")
    s.close()
    srv.close()


def _raw_file_run(ctx: Any, source: str, nbytes: int, chunk: int, dest: str) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    return nbytes / _one_run(ctx, _RawFileReceiver(dest), _SendfileSender(source), nbytes,
                             chunk) / 1e9


class _SendfileSender:
    """The raw baseline's sender: ``os.sendfile`` of the source file (the
    kernel copies from the page cache; no user-space buffer)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, conn: Any, port: int, nbytes: int, chunk: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            sent = 0
            while sent < nbytes:
                n = os.sendfile(s.fileno(), fd, sent, min(nbytes - sent, 1 << 30))
                if n == 0:
                    raise RuntimeError("the source file ended early")
                sent += n
            if s.recv(1) != b"k":
                raise RuntimeError("the raw receiver did not acknowledge")
            conn.send(time.perf_counter() - t0)
        finally:
            os.close(fd)
            s.close()


class _RawFileReceiver:
    """``_raw_file_receiver`` with its directory bound (picklable for spawn)."""

    def __init__(self, dest: str) -> None:
        self.dest = dest

    def __call__(self, conn: Any, nbytes: int, chunk: int) -> None:
        _raw_file_receiver(conn, nbytes, chunk, self.dest)


def _make_file(path: str, size: int) -> None:
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(memoryview(block)[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def measure(size: int, runs: int, chunk: int, directory: str | None) -> dict[str, Any]:
    """Run the three kinds ``runs`` times each, alternating; return the figures."""
    ctx = mp.get_context("spawn")
    work = tempfile.mkdtemp(prefix="llmwire-bench-file-", dir=directory)
    try:
        path = os.path.join(work, "source.bin")
        _make_file(path, size)
        dest = os.path.join(work, "dest")
        raw, raw_file, done = [], [], []
        for _ in range(runs):
            raw.append(size / _one_run(ctx, _raw_receiver, _raw_sender, size, chunk) / 1e9)
            raw_file.append(_raw_file_run(ctx, path, size, chunk, dest))
            done.append(_file_run(ctx, path, dest, size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wire = [r["gbps"] for r in done]
    return {
        "size": size, "runs": runs,
        "raw_socket_gbps": round(statistics.median(raw), 3),
        "raw_socket_to_file_gbps": round(statistics.median(raw_file), 3),
        "llmwire_file_gbps": round(statistics.median(wire), 3),
        "ratio_vs_raw_socket": round(statistics.median(wire) / statistics.median(raw), 3),
        "paired_ratio_median": round(statistics.median(w / r for w, r in zip(wire, raw)), 3),
        "ratio_vs_raw_socket_to_file": round(statistics.median(wire)
                                             / statistics.median(raw_file), 3),
        "sender_peak_rss_over_baseline_mib": round(
            max(r["sender_peak_over_baseline"] for r in done) / MiB, 1),
        "receiver_peak_rss_over_baseline_mib": round(
            max(r["receiver_peak_over_baseline"] for r in done) / MiB, 1),
        "baselines_mib": [(round(r["sender_baseline"] / MiB, 1),
                           round(r["receiver_baseline"] / MiB, 1)) for r in done],
        "raw_runs_gbps": [round(x, 3) for x in raw],
        "raw_to_file_runs_gbps": [round(x, 3) for x in raw_file],
        "file_runs_gbps": [round(x, 3) for x in wire],
    }


def run(args: argparse.Namespace) -> int:
    """Run the bench; print a table, or one JSON object with ``--json``."""
    if args.runs <= 0 or args.chunk <= 0 or args.size <= 0:
        print("llmwire bench file: --size, --runs and --chunk must be positive",
              file=sys.stderr)
        return 2
    if args.dir is not None and not os.path.isdir(args.dir):
        print(f"llmwire bench file: --dir {args.dir!r} is not a directory", file=sys.stderr)
        return 2
    try:
        r = measure(args.size, args.runs, args.chunk, args.dir)
    except RuntimeError as exc:
        print(f"llmwire bench file: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"file transfer over loopback TCP: {r['size']} bytes, {r['runs']} runs each")
    print(f"  raw socket           {r['raw_socket_gbps']:7.3f} GB/s  {r['raw_runs_gbps']}")
    print(f"  raw socket to file   {r['raw_socket_to_file_gbps']:7.3f} GB/s  "
          f"{r['raw_to_file_runs_gbps']}")
    print(f"  llmwire file         {r['llmwire_file_gbps']:7.3f} GB/s  {r['file_runs_gbps']}")
    print(f"  ratio file/raw socket {r['ratio_vs_raw_socket']:.3f} (paired median "
          f"{r['paired_ratio_median']:.3f}); file/raw-to-file "
          f"{r['ratio_vs_raw_socket_to_file']:.3f}")
    print(f"  peak RSS over baseline: sender {r['sender_peak_rss_over_baseline_mib']} MiB, "
          f"receiver {r['receiver_peak_rss_over_baseline_mib']} MiB")
    return 0
