"""Memory and throughput of a file transfer over loopback TCP, two processes.

Usage::

    python3 tools/measure_file_transfer.py --size 2GiB --runs 3 [--dir /tmp] [--json]

Creates a file of ``--size`` bytes (random blocks), then alternates, ``--runs``
times each, in fresh processes over 127.0.0.1:

- **raw socket**: blocking ``sendall`` of a reused buffer / ``recv_into`` a
  reused buffer (``llmwire.bench.wire``'s baseline: no file, no hashing);
- **raw socket to file**: the same, the receiver ``pwrite``-ing each buffer
  into a new file (the ceiling a receiver that lands bytes on disk can reach);
- **llmwire file**: ``send_file`` / ``receive_file`` (uvloop when installed).

While a file transfer runs, this process samples ``VmRSS`` of the sender and
of the receiver from ``/proc/<pid>/status`` every 2 ms; each child reports its
own RSS just before the transfer (its baseline, after imports and the
connection). Printed: peak RSS over baseline per side (max over runs) and the
medians of throughput with the ratio llmwire file / raw socket.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmwire.bench._procs import reap  # noqa: E402
from llmwire.bench._rss import RssSampler  # noqa: E402
from llmwire.synthetic import parse_size  # noqa: E402

MiB = 1 << 20


def _rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- llmwire file ---------------------------------------------------------------------

def _file_receiver(conn: Any, dest: str) -> None:
    import asyncio

    import llmwire
    from llmwire.payloads.files import receive_file

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            conn.send(("baseline", _rss()))
            result = await receive_file(t, dest, overwrite=True)
            conn.send(("result", result.size, result.digest))
            await t.wait_closed()
            done.set_result(None)

        srv = await llmwire.serve(handler, "127.0.0.1", 0, secret=b"measure")
        conn.send(("port", srv.port))
        await asyncio.wait_for(done, 900)
        await srv.close()

    llmwire.run(main())


def _file_sender(conn: Any, port: int, path: str) -> None:
    import llmwire
    from llmwire.payloads.files import send_file

    async def main() -> None:
        t = await llmwire.connect("127.0.0.1", port, secret=b"measure")
        conn.send(("baseline", _rss()))
        conn.recv()                                   # "go"
        t0 = time.perf_counter()
        result = await send_file(t, path)
        elapsed = time.perf_counter() - t0
        conn.send(("result", elapsed, result.digest))
        await t.close()

    llmwire.run(main())


def _wait(pipe: Any, procs: list[Any], timeout: float, what: str) -> Any:
    """Receive from ``pipe``; fail fast if one of ``procs`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if any(p is not None and not p.is_alive() for p in procs):
            raise RuntimeError(f"a child process died before: {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for: {what}")
    return pipe.recv()


def _file_run(ctx: Any, path: str, dest: str, size: int) -> dict[str, float]:
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    rp = ctx.Process(target=_file_receiver, args=(rchild, dest))
    rp.start()
    sp = None
    try:
        _, port = _wait(rparent, [rp], 60, "receiver start")
        sp = ctx.Process(target=_file_sender, args=(schild, port, path))
        sp.start()
        base = {"sender": _wait(sparent, [rp, sp], 60, "connection")[1],
                "receiver": _wait(rparent, [rp, sp], 60, "connection")[1]}
        with RssSampler({"sender": sp.pid, "receiver": rp.pid}, interval=0.002) as sampler:
            time.sleep(0.05)
            sparent.send("go")
            _, elapsed, digest = _wait(sparent, [sp], 900, "sender finished")
            _, got_size, got_digest = _wait(rparent, [rp], 60, "receiver finished")
        peak = {name: timeline.peak() for name, timeline in sampler.timelines.items()}
        assert got_size == size and got_digest == digest, "transfer mismatch"
        return {"gbps": size / elapsed / 1e9,
                "sender_peak_over_baseline": peak["sender"] - base["sender"],
                "receiver_peak_over_baseline": peak["receiver"] - base["receiver"],
                "sender_baseline": base["sender"], "receiver_baseline": base["receiver"]}
    finally:
        reap((sp, rp), 60)


# --- raw socket into a file -----------------------------------------------------------

def _raw_file_receiver(conn: Any, nbytes: int, chunk: int, dest: str) -> None:
    from llmwire.bench.wire import accept_one

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


def _raw_file_run(ctx: Any, nbytes: int, chunk: int, dest: str) -> float:
    from llmwire.bench.wire import _raw_sender

    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    rp = ctx.Process(target=_raw_file_receiver, args=(rchild, nbytes, chunk, dest))
    rp.start()
    assert rparent.poll(60)
    sp = ctx.Process(target=_raw_sender, args=(schild, rparent.recv(), nbytes, chunk))
    sp.start()
    assert sparent.poll(900)
    elapsed = float(sparent.recv())
    sp.join(60)
    rp.join(60)
    return nbytes / elapsed / 1e9


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=_parse_size, default=2 << 30, help="file size (2GiB)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each kind (3)")
    ap.add_argument("--chunk", type=int, default=4 * MiB, help="raw socket buffer (4 MiB)")
    ap.add_argument("--dir", default=None, help="where to put the files (a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from llmwire.bench.wire import _one_run, _raw_receiver, _raw_sender

    ctx = mp.get_context("spawn")
    work = tempfile.mkdtemp(prefix="llmwire-measure-", dir=args.dir)
    try:
        path = os.path.join(work, "source.bin")
        _make_file(path, args.size)
        dest = os.path.join(work, "dest")
        raw, raw_file, runs = [], [], []
        for _ in range(args.runs):
            raw.append(args.size / _one_run(ctx, _raw_receiver, _raw_sender,
                                             args.size, args.chunk) / 1e9)
            raw_file.append(_raw_file_run(ctx, args.size, args.chunk, dest))
            runs.append(_file_run(ctx, path, dest, args.size))
        wire = [r["gbps"] for r in runs]
        result = {
            "size": args.size, "runs": args.runs,
            "raw_socket_gbps": round(statistics.median(raw), 3),
            "raw_socket_to_file_gbps": round(statistics.median(raw_file), 3),
            "llmwire_file_gbps": round(statistics.median(wire), 3),
            "ratio_vs_raw_socket": round(statistics.median(wire) / statistics.median(raw), 3),
            "paired_ratio_median": round(statistics.median(w / r for w, r in zip(wire, raw)), 3),
            "ratio_vs_raw_socket_to_file": round(statistics.median(wire)
                                                 / statistics.median(raw_file), 3),
            "sender_peak_rss_over_baseline_mib": round(
                max(r["sender_peak_over_baseline"] for r in runs) / MiB, 1),
            "receiver_peak_rss_over_baseline_mib": round(
                max(r["receiver_peak_over_baseline"] for r in runs) / MiB, 1),
            "baselines_mib": [(round(r["sender_baseline"] / MiB, 1),
                               round(r["receiver_baseline"] / MiB, 1)) for r in runs],
            "raw_runs_gbps": [round(x, 3) for x in raw],
            "raw_to_file_runs_gbps": [round(x, 3) for x in raw_file],
            "file_runs_gbps": [round(x, 3) for x in wire],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"file transfer over loopback TCP: {result['size']} bytes, {args.runs} runs each")
    print(f"  raw socket           {result['raw_socket_gbps']:7.3f} GB/s  {result['raw_runs_gbps']}")
    print(f"  raw socket to file   {result['raw_socket_to_file_gbps']:7.3f} GB/s  "
          f"{result['raw_to_file_runs_gbps']}")
    print(f"  llmwire file         {result['llmwire_file_gbps']:7.3f} GB/s  "
          f"{result['file_runs_gbps']}")
    print(f"  ratio file/raw socket {result['ratio_vs_raw_socket']:.3f} (paired median "
          f"{result['paired_ratio_median']:.3f}); file/raw-to-file "
          f"{result['ratio_vs_raw_socket_to_file']:.3f}")
    print(f"  peak RSS over baseline: sender {result['sender_peak_rss_over_baseline_mib']} MiB, "
          f"receiver {result['receiver_peak_rss_over_baseline_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
