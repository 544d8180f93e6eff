"""``llmwire bench round``: FedAvg rounds between a server and N client processes.

For each format, fresh processes over 127.0.0.1: a server holding the global
model (a synthetic Llama-shaped state dict of ``--params`` parameters, fp32)
and N clients, each holding its copy of the global and its local model. A
round is: the downlink (round 1: the whole global, raw; later rounds: the
previous round's mean update, quantized, broadcast once to all and applied
by the server to its own global as the clients do), each client's "training"
(a deterministic small change of every trainable tensor; the norms stay
frozen), the N uploads of ``local - global`` in the format, and their
streaming aggregation. After the last round the server applies the last mean
as it would broadcast it, and compares the new global with an fp64 FedAvg of
the exact local models.

Per format: wire bytes of the last round (both directions, all clients),
its seconds on the wire (the server's clock: the downlink, then the uploads
and their aggregation; the clients' "training" between the two is not
counted), the seconds raw loopback sockets take to move the same bytes
between the same processes in the same invocation (N connections; per client
its downlink bytes, then its uplink bytes), the server's and the largest
client's peak RSS over its baseline (sampled from outside; baselines are
taken with the models and the server's sums built), and the max abs
difference of the new global from the fp64 reference.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

from ...quant.formats import parse_format_list
from ..synthetic import model_size
from ._procs import ChildFailed, expect, guard, raise_client_failure, reap
from ._rss import RssSampler
from ._timing import format_table
from .wire import accept_one

__all__ = ["add_arguments", "run", "measure"]

MIB = 1 << 20
SECRET = b"bench-round"
#: the size of a client's change per round, against weights of magnitude ~0.02-1
STEP = 1e-3
_FROZEN = ("norm",)  # names containing these do not change in "training"
#: what the server advertises: 4 MiB of uploads in flight per client connection
SERVER_WINDOW = 4 * MIB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument("--clients", type=int, default=4, help="client processes (default: 4)")
    parser.add_argument("--params", type=model_size, default=25_000_000,
                        help="model size in parameters, e.g. 25M, 250M (default: 25M)")
    parser.add_argument("--formats", default="raw,nf4",
                        help="comma-separated formats for both directions (default: raw,nf4; "
                             "fp32 = raw)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per format; the last is reported (default: 2: the "
                             "second has a delta downlink)")
    parser.add_argument("--feedback", action="store_true",
                        help="error feedback on both directions (one more model per process)")
    parser.add_argument("--spool-dir", default=None,
                        help="where the server spools uploads until they verify (default: "
                             "the system's temp directory)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object: "clients", "params", "formats": [...]')


def _change(state: Any, client: int, round_: int, name: str, out: Any = None) -> Any:
    """Client ``client``'s deterministic change of tensor ``name`` in
    ``round_`` (into ``out``, a reused buffer of that shape, when given)."""
    import torch
    import xxhash

    seed = xxhash.xxh32_intdigest(f"{client}/{round_}/{name}".encode())  # same everywhere
    g = torch.Generator().manual_seed(seed)
    if out is None:
        return STEP * torch.randn(state[name].shape, generator=g)
    torch.randn(state[name].shape, generator=g, out=out)
    return out.mul_(STEP)


def _trainable(name: str) -> bool:
    return not any(part in name for part in _FROZEN)


# ------------------------------------------------------------------ server


def _server(conn: Any, n: int, params: int, fmt: str, rounds: int, feedback: bool,
            spool_dir: str | None) -> None:
    guard(conn, lambda: _serve(conn, n, params, fmt, rounds, feedback, spool_dir))


def _serve(conn: Any, n: int, params: int, fmt: str, rounds_: int, feedback: bool,
           spool_dir: str | None) -> None:
    import asyncio

    import llmwire
    from llmwire import rounds
    from llmwire.cli.synthetic import llama_state_dict

    global_ = llama_state_dict(params, seed=3)
    reference = rounds.Reference.of(global_, 0)
    SERVER_SETTINGS = llmwire.Settings(stream_window=SERVER_WINDOW,
                                       connection_window=SERVER_WINDOW)
    aggregator = rounds.Aggregator(global_, reference, spool_dir=spool_dir)
    ef = rounds.ErrorFeedback() if feedback else None
    if ef is not None:  # the residual's memory is part of the baseline
        for name, tensor in global_.items():
            ef.residual("broadcast", name, tensor.numel()).fill(0)

    async def main() -> None:
        nonlocal reference
        transports: list[Any] = []
        all_in = asyncio.Event()
        closed = asyncio.Event()

        async def handler(t: Any) -> None:
            transports.append(t)
            if len(transports) == n:
                all_in.set()
            await closed.wait()

        # Each connection's receive window is memory the server holds per client:
        # small ones keep it nearly flat in N (loopback needs no more).
        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET,
                                     settings=SERVER_SETTINGS)
        conn.send(("port", server.port))
        await asyncio.wait_for(all_in.wait(), 300)
        conn.send(("baseline", None))
        mean: Any = None
        for r in range(1, rounds_ + 1):
            conn.recv()  # go: the downlink
            started = time.perf_counter()
            if mean is None:
                down = await rounds.broadcast_state(transports, global_, 0)
            else:
                down = await rounds.broadcast_update(transports, mean, global_, reference, fmt,
                                                     feedback=ef)
            down_seconds = time.perf_counter() - started
            if down.landed != list(range(n)):
                raise RuntimeError(f"round {r}: the downlink reached {down.landed} only: "
                                   f"{[str(p.error) for p in down.peers if not p.landed]}")
            reference = down.reference
            aggregator.next_round(reference)
            conn.send(("down", None))
            conn.recv()  # collect: the clients have trained and upload now
            started = time.perf_counter()
            uploads = await asyncio.gather(*(aggregator.receive(t) for t in transports))
            mean = aggregator.close().update
            up_seconds = time.perf_counter() - started
            up = sum(u.wire_bytes for u in uploads)
            conn.send(("round", {"round": r, "seconds": down_seconds + up_seconds,
                                 "down_seconds": down_seconds, "up_seconds": up_seconds,
                                 "down_bytes": down.wire_bytes, "up_bytes": up,
                                 "up_each": [u.wire_bytes for u in
                                             sorted(uploads, key=lambda u: u.client)]}))
        conn.recv()  # the parent stopped sampling: check the result
        conn.send(("error", await _check(global_, mean, fmt, n, rounds_, ef)))
        closed.set()
        await server.close()

    llmwire.run(main())


async def _check(global_: Any, mean: Any, fmt: str, n: int, last: int, ef: Any) -> float:
    """Apply the last mean as the broadcast would, tensor by tensor, and
    compare with ``previous + fp64 weighted mean of the exact local changes``."""
    import torch

    from llmwire import rounds

    weights = [i + 1 for i in range(n)]
    worst = 0.0
    for name in global_:
        before = global_[name].double().clone()
        one = {name: global_[name]}
        manifest, views = rounds.plan_increment({name: mean[name]}, one, fmt,
                                                reference=rounds.Reference(0, "x"),
                                                apply_to=one, feedback=ef)
        await rounds.broadcast_planned([], manifest, views)  # to nobody: just apply it
        want = sum(w * _change(global_, i, last, name).double()
                   for i, w in enumerate(weights)) / sum(weights) \
            if _trainable(name) else torch.zeros_like(before)
        worst = max(worst, float((global_[name].double() - (before + want)).abs().max()))
        del before, want
    return worst


# ------------------------------------------------------------------ clients


def _client(conn: Any, port: int, index: int, params: int, fmt: str, rounds_: int,
            feedback: bool) -> None:
    guard(conn, lambda: _work(conn, port, index, params, fmt, rounds_, feedback))


def _work(conn: Any, port: int, index: int, params: int, fmt: str, rounds_: int,
          feedback: bool) -> None:
    import llmwire
    from llmwire import rounds
    from llmwire.cli.synthetic import llama_shapes

    import torch

    shapes = llama_shapes(params)
    base = {name: torch.zeros(shape) for name, shape in shapes.items()}
    local = {name: torch.zeros(shape) for name, shape in shapes.items()}
    # "training" draws each change into this, not into new memory
    scratch = torch.zeros(max(t.numel() for t in base.values()))
    ef = rounds.ErrorFeedback() if feedback else None
    if ef is not None:
        for name, tensor in base.items():
            ef.residual("uplink", name, tensor.numel()).fill(0)

    async def main() -> None:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET, timeout=60)
        conn.send(("baseline", None))
        have = None
        for r in range(1, rounds_ + 1):
            have = await rounds.receive_update(t, base, have)
            for name in base:  # "training": a small change of every trainable tensor
                local[name].copy_(base[name])
                if _trainable(name):
                    out = scratch[:base[name].numel()].view(base[name].shape)
                    local[name] += _change(base, index, r, name, out)
            conn.send(("trained", None))
            conn.recv()  # upload (not timed: the round's clock is the server's wire time)
            await rounds.send_update(t, local, base, have, fmt, client=f"c{index}",
                                     weight=index + 1, feedback=ef)
        await t.wait_closed()

    llmwire.run(main())


# ------------------------------------------------------------------ raw baseline


def _raw_server(conn: Any, n: int, down: int, up: list[int]) -> None:
    import socket
    import threading

    import numpy as np

    chunk = 4 * MIB
    sockets = []
    s, srv = accept_one(conn)
    sockets.append(s)
    for _ in range(n - 1):
        sockets.append(srv.accept()[0])
    conn.recv()  # go
    started = time.perf_counter()

    def serve_one(sock: socket.socket, up_bytes: int) -> None:
        data = memoryview(np.ones(chunk, np.uint8))
        buf = memoryview(bytearray(chunk))
        for offset in range(0, down, chunk):
            sock.sendall(data[:min(chunk, down - offset)])
        got = 0
        while got < up_bytes:
            got += sock.recv_into(buf, min(chunk, up_bytes - got))
        sock.sendall(b"k")

    threads = [threading.Thread(target=serve_one, args=(sock, up[i]))
               for i, sock in enumerate(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.send(("done", time.perf_counter() - started))
    for sock in sockets:
        sock.close()
    srv.close()


def _raw_client(conn: Any, port: int, down: int, up: int) -> None:
    import socket

    import numpy as np

    chunk = 4 * MIB
    sock = socket.create_connection(("127.0.0.1", port))
    buf = memoryview(bytearray(chunk))
    data = memoryview(np.ones(chunk, np.uint8))
    got = 0
    while got < down:
        got += sock.recv_into(buf, min(chunk, down - got))
    for offset in range(0, up, chunk):
        sock.sendall(data[:min(chunk, up - offset)])
    assert sock.recv(1) == b"k"
    sock.close()
    conn.send(("done", None))


def _raw_round(ctx: Any, n: int, down: int, up: list[int]) -> float:
    sparent, schild = ctx.Pipe()
    server = ctx.Process(target=_raw_server, args=(schild, n, down, up))
    server.start()
    clients: list[Any] = []
    try:
        port = sparent.recv() if sparent.poll(60) else None
        if port is None:
            raise RuntimeError("the raw server did not start")
        pipes = []
        for i in range(n):
            parent, child = ctx.Pipe()
            clients.append(ctx.Process(target=_raw_client, args=(child, port, down, up[i])))
            clients[-1].start()
            pipes.append(parent)
        time.sleep(0.2)
        sparent.send("go")
        seconds = expect(sparent, "done", 900, server, "the raw server")
        for pipe, client in zip(pipes, clients):
            expect(pipe, "done", 60, client, "a raw client")
        return seconds
    finally:
        reap([*clients, server], 30)


# ------------------------------------------------------------------ driver


def _one_format(ctx: Any, n: int, params: int, fmt: str, rounds_: int, feedback: bool,
                spool_dir: str | None) -> dict[str, Any]:
    sparent, schild = ctx.Pipe()
    server = ctx.Process(target=_server, args=(schild, n, params, fmt, rounds_, feedback,
                                               spool_dir))
    server.start()
    clients: list[Any] = []
    pipes: list[Any] = []
    try:
        port = expect(sparent, "port", 600, server, "the server")
        for i in range(n):
            parent, child = ctx.Pipe()
            clients.append(ctx.Process(target=_client, args=(child, port, i, params, fmt,
                                                             rounds_, feedback)))
            clients[-1].start()
            pipes.append(parent)
        for pipe, client in zip(pipes, clients):
            expect(pipe, "baseline", 600, client, "a client")
        expect(sparent, "baseline", 600, server, "the server")
        pids = {"server": server.pid, **{f"c{i}": c.pid for i, c in enumerate(clients)}}
        per_round = []
        try:
            with RssSampler(pids, interval=0.005) as sampler:
                time.sleep(0.05)
                start = sampler.now()
                for _ in range(rounds_):
                    sparent.send("go")
                    expect(sparent, "down", 1800, server, "the server")
                    for pipe, client in zip(pipes, clients):
                        expect(pipe, "trained", 1800, client, "a client")
                    sparent.send("collect")
                    for pipe in pipes:
                        pipe.send("upload")
                    per_round.append(expect(sparent, "round", 1800, server, "the server"))
            sparent.send("check")
            error = expect(sparent, "error", 1800, server, "the server")
        except ChildFailed as exc:
            if exc.collateral:  # the server only saw a client go: say why the client went
                raise_client_failure(pipes, range(len(pipes)))
            raise
        peaks = {name: (t.peak(start) - t.at(start)) / MIB for name, t in sampler.timelines.items()}
        last = per_round[-1]
        return {"format": fmt, "rounds": per_round, "round_seconds": last["seconds"],
                "wire_bytes": last["down_bytes"] * n + last["up_bytes"],
                "down_bytes": last["down_bytes"], "up_bytes": last["up_bytes"],
                "up_each": last["up_each"],
                "server_peak_mib": peaks["server"],
                "client_peak_mib": max(v for k, v in peaks.items() if k != "server"),
                "max_abs_err": error}
    finally:
        reap([*clients, server], 60)


def measure(n: int, params: int, formats: list[str], rounds_: int, feedback: bool = False,
            spool_dir: str | None = None) -> dict[str, Any]:
    """Run every format's rounds (fresh processes each), and its raw baseline."""
    ctx = mp.get_context("spawn")
    rows = []
    for fmt in formats:
        row = _one_format(ctx, n, params, fmt, rounds_, feedback, spool_dir)
        raw = [_raw_round(ctx, n, row["down_bytes"], row["up_each"]) for _ in range(3)]
        row["raw_seconds"] = statistics.median(raw)
        row["raw_runs_seconds"] = [round(x, 3) for x in raw]
        row["ratio_to_raw"] = row["round_seconds"] / row["raw_seconds"]
        rows.append(row)
    fp32 = next((r for r in rows if r["format"] == "raw"), None)
    for r in rows:
        r["wire_ratio_to_fp32"] = r["wire_bytes"] / fp32["wire_bytes"] if fp32 else None
    return {"clients": n, "params": params, "rounds": rounds_, "feedback": feedback,
            "formats": rows}


def run(args: argparse.Namespace) -> int:
    """Run the bench; print a table, or one JSON object with ``--json``."""
    try:
        parsed = parse_format_list(args.formats)
    except ValueError as exc:
        print(f"llmwire bench round: {exc}", file=sys.stderr)
        return 2
    if not parsed:
        print("llmwire bench round: --formats names no format", file=sys.stderr)
        return 2
    if any(nested for _, _, nested in parsed):
        print("llmwire bench round: --formats takes format names (no +nested)",
              file=sys.stderr)
        return 2
    formats = [fmt for _, fmt, _ in parsed]
    if args.clients < 1 or args.rounds < 1:
        print("llmwire bench round: --clients and --rounds must be positive", file=sys.stderr)
        return 2
    if args.spool_dir is not None and not os.path.isdir(args.spool_dir):
        print(f"llmwire bench round: --spool-dir {args.spool_dir!r} is not a directory",
              file=sys.stderr)
        return 2
    try:
        r = measure(args.clients, args.params, formats, args.rounds, args.feedback,
                    args.spool_dir)
    except RuntimeError as exc:
        print(f"llmwire bench round: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"FedAvg over loopback TCP: server + {r['clients']} clients, "
          f"{r['params'] / 1e6:.0f}M parameters ({r['params'] * 4 / MIB:.0f} MiB fp32), "
          f"round {r['rounds']} of {r['rounds']} reported"
          f"{', error feedback' if r['feedback'] else ''}")
    print(format_table(
        ["format", "wire MiB", "% of fp32", "round s", "raw s", "ratio", "server +MiB",
         "client +MiB", "max abs err"],
        [[x["format"], f"{x['wire_bytes'] / MIB:.1f}",
          f"{x['wire_ratio_to_fp32'] * 100:.1f}%" if x["wire_ratio_to_fp32"] else "-",
          f"{x['round_seconds']:.2f}", f"{x['raw_seconds']:.2f}", f"{x['ratio_to_raw']:.2f}",
          f"{x['server_peak_mib']:.0f}", f"{x['client_peak_mib']:.0f}",
          f"{x['max_abs_err']:.3g}" if math.isfinite(x["max_abs_err"]) else "-"]
         for x in r["formats"]]))
    print("wire: both directions, all clients, last round; raw s: raw sockets moving the same "
          "bytes between the same processes; +MiB: peak RSS over baseline (models and sums "
          "built)")
    return 0
