"""``llmwire bench stream``: a state dict over loopback TCP, end to end.

For each format, in fresh process pairs (sender, receiver) over 127.0.0.1,
and in the same invocation two raw-socket baselines moving the same number of
fp32 bytes (blocking ``sendall`` / ``recv_into``): from and into reused
4 MiB buffers (the loopback limit, as ``bench wire``), and from and into
model-sized buffers (what moving real model memory costs raw sockets):

- throughput: GB of fp32 state dict delivered per second, on the sender's
  clock from its first byte until the receiver acknowledges a received,
  verified and restored state dict; the ratio against the raw baseline;
- memory: each process's RSS sampled from outside every 5 ms; peak minus
  the process's baseline, taken once it has built its own model (and, for
  the in-place receiver, the tensors it receives into);
- the largest restored error.

Receivers: ``memory`` (a new dict of tensors), ``inplace`` (existing tensors,
as a model's ``state_dict()``), ``safetensors`` (a file written at offsets).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from typing import Any

from ..synthetic import model_size
from ._procs import expect, reap
from ._rss import RssSampler
from ._timing import format_table
from .wire import _one_run, _raw_receiver, _raw_sender, accept_one

SECRET = b"bench-stream"
MIB = 1 << 20
RECEIVERS = ("memory", "inplace", "safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=model_size, default="250M",
                        help="model size in parameters (default: 250M, 1 GB in fp32)")
    parser.add_argument("--formats", default="raw,nf4",
                        help="comma-separated formats (raw = fp32 as is; default: %(default)s)")
    parser.add_argument("--receiver", choices=RECEIVERS, default="inplace",
                        help="where the receiver puts the state dict (default: inplace)")
    parser.add_argument("--model", choices=("llama", "single"), default="llama",
                        help="llama: a Llama-shaped state dict; single: one tensor of "
                             "--params elements (default: llama)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the error check after each transfer (it rebuilds the "
                             "model in the receiver, which takes a while for big models)")
    parser.add_argument("--runs", type=int, default=5, help="runs per format (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _raw_model_receiver(conn: Any, nbytes: int, chunk: int) -> None:
    """Raw socket into a model-sized, already touched buffer (``recv_into``)."""
    import numpy as np

    target = np.ones(nbytes, np.uint8)
    sock, srv = accept_one(conn)
    view, got = memoryview(target), 0
    while got < nbytes:
        n = sock.recv_into(view[got:], min(nbytes - got, chunk))
        if not n:
            raise RuntimeError("raw sender closed early")
        got += n
    sock.sendall(b"k")
    sock.close()
    srv.close()


def _raw_model_sender(conn: Any, port: int, nbytes: int, chunk: int) -> None:
    """Raw socket ``sendall`` from a model-sized buffer, chunk after chunk."""
    import socket

    import numpy as np

    source = np.ones(nbytes, np.uint8)
    view = memoryview(source)
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.perf_counter()
    for offset in range(0, nbytes, chunk):
        sock.sendall(view[offset:offset + chunk])
    assert sock.recv(1) == b"k"
    conn.send(time.perf_counter() - started)
    sock.close()


def _receiver(conn: Any, params: int, into: str, seed: int, model: str, check: bool) -> None:
    import asyncio
    import os

    import torch

    import llmwire
    from llmwire.cli.synthetic import make_state_dict

    target = None
    if into == "inplace":
        target = {k: torch.zeros_like(v) for k, v in make_state_dict(model, params, seed=seed).items()}
    workdir = tempfile.mkdtemp(prefix="llmwire-bench-")
    path = os.path.join(workdir, "model.safetensors")

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            arg = {"memory": None, "inplace": target, "safetensors": path}[into]
            received = await llmwire.receive_state_dict(t, arg, overwrite=True)
            await t.send_message({"ok": True})
            done.set_result(received)
            await t.wait_closed()

        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("ready", server.port))
        received = await asyncio.wait_for(done, 900)
        conn.send(("received", None))
        conn.recv()  # the parent stopped sampling: now check the values
        err = float("nan")
        if check:
            if into == "safetensors":
                from safetensors.torch import load_file
                received = load_file(received)
            expected = make_state_dict(model, params, seed=seed)
            err = max(float((received[k].float() - v.float()).abs().max())
                      for k, v in expected.items())
        conn.send(("error", err))
        await server.close()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(workdir)

    llmwire.run(main())


def _sender(conn: Any, port: int, params: int, fmt: str, seed: int, model: str,
            nested: bool = False) -> None:
    import llmwire
    from llmwire.cli.synthetic import make_state_dict

    state = make_state_dict(model, params, seed=seed)
    conn.send(("ready", None))
    conn.recv()  # go

    async def main() -> tuple[float, int, int]:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        started = time.perf_counter()
        result = await llmwire.send_state_dict(t, state, fmt, nested=nested)
        await t.receive_message()
        elapsed = time.perf_counter() - started
        await t.close()
        return elapsed, result.tensor_bytes, result.wire_bytes

    conn.send(("sent", llmwire.run(main())))


def _one_transfer(ctx: Any, params: int, fmt: str, into: str, model: str = "llama",
                  check: bool = True, nested: bool = False) -> dict[str, Any]:
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(rchild, params, into, 1, model, check))
    receiver.start()
    sender = None
    try:
        port = expect(rparent, "ready", 300)
        sender = ctx.Process(target=_sender, args=(schild, port, params, fmt, 1, model, nested))
        sender.start()
        expect(sparent, "ready", 300)
        assert receiver.pid is not None and sender.pid is not None
        with RssSampler({"sender": sender.pid, "receiver": receiver.pid}) as sampler:
            time.sleep(0.05)
            start = sampler.now()
            sparent.send("go")
            elapsed, tensor_bytes, wire_bytes = expect(sparent, "sent")
            expect(rparent, "received")
        rparent.send("check")
        error = expect(rparent, "error")
        figures = {}
        for name, timeline in sampler.timelines.items():
            base = timeline.at(start)
            figures[f"{name}_peak_mib"] = (timeline.peak(start) - base) / MIB
            figures[f"{name}_baseline_mib"] = base / MIB
        return {"seconds": elapsed, "tensor_bytes": tensor_bytes, "wire_bytes": wire_bytes,
                "max_abs_err": error, **figures}
    finally:
        reap((sender, receiver), 60)


def measure(params: int, formats: list[str], into: str, runs: int, model: str = "llama",
            check: bool = True) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out: dict[str, Any] = {"params": params, "receiver": into, "runs": runs, "model": model,
                           "formats": {}}
    raw_runs: list[float] = []
    raw_model_runs: list[float] = []
    per_format: dict[str, list[dict[str, Any]]] = {fmt: [] for fmt in formats}
    fp32_bytes = None
    for _ in range(runs):
        for fmt in formats:
            figures = _one_transfer(ctx, params, fmt, into, model, check)
            fp32_bytes = figures["tensor_bytes"]
            per_format[fmt].append(figures)
        assert fp32_bytes is not None
        raw_runs.append(fp32_bytes / _one_run(ctx, _raw_receiver, _raw_sender, fp32_bytes,
                                              4 * MIB) / 1e9)
        raw_model_runs.append(fp32_bytes / _one_run(ctx, _raw_model_receiver, _raw_model_sender,
                                                    fp32_bytes, 4 * MIB) / 1e9)
    raw_gbps = statistics.median(raw_runs)
    out["raw_gbps"] = round(raw_gbps, 3)
    out["raw_runs_gbps"] = [round(x, 3) for x in raw_runs]
    raw_model_gbps = statistics.median(raw_model_runs)
    out["raw_model_gbps"] = round(raw_model_gbps, 3)
    out["raw_model_runs_gbps"] = [round(x, 3) for x in raw_model_runs]
    out["tensor_bytes"] = fp32_bytes
    for fmt, rows in per_format.items():
        gbps = [r["tensor_bytes"] / r["seconds"] / 1e9 for r in rows]
        median = statistics.median(gbps)
        out["formats"][fmt] = {
            "gbps": round(median, 3), "runs_gbps": [round(x, 3) for x in gbps],
            "ratio_to_raw": round(median / raw_gbps, 3),
            "ratio_to_raw_model": round(median / raw_model_gbps, 3),
            "wire_bytes": rows[0]["wire_bytes"],
            "sender_peak_mib": round(statistics.median(r["sender_peak_mib"] for r in rows), 1),
            "receiver_peak_mib": round(statistics.median(r["receiver_peak_mib"] for r in rows), 1),
            "sender_peaks_mib": [round(r["sender_peak_mib"], 1) for r in rows],
            "receiver_peaks_mib": [round(r["receiver_peak_mib"], 1) for r in rows],
            "max_abs_err": max(r["max_abs_err"] for r in rows),
        }
    return out


def run(args: argparse.Namespace) -> int:
    from ...quant.formats import get_format

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        get_format("raw" if fmt == "fp32" else fmt)
    if args.runs <= 0:
        print("llmwire bench stream: --runs must be positive", file=sys.stderr)
        return 2
    r = measure(args.params, formats, args.receiver, args.runs, args.model, not args.no_check)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"state dict over loopback TCP ({r['model']}): {r['params'] / 1e6:.0f}M params, "
          f"{r['tensor_bytes'] / MIB:.0f} MiB fp32, receiver: {r['receiver']}, "
          f"median of {r['runs']} runs")
    print(f"raw socket baseline, same bytes, reused 4 MiB buffers: {r['raw_gbps']:.2f} GB/s "
          f"{r['raw_runs_gbps']}")
    print(f"raw socket baseline, same bytes, model-sized buffers on both sides: "
          f"{r['raw_model_gbps']:.2f} GB/s {r['raw_model_runs_gbps']}")
    rows = [[fmt, f"{f['wire_bytes'] / MIB:.0f}", f"{f['gbps']:.2f}", f"{f['ratio_to_raw']:.2f}",
             f"{f['ratio_to_raw_model']:.2f}",
             f"{f['sender_peak_mib']:.0f}", f"{f['receiver_peak_mib']:.0f}",
             f"{f['max_abs_err']:.3g}"] for fmt, f in r["formats"].items()]
    print(format_table(["format", "wire MiB", "GB/s fp32", "x raw", "x raw (model buf)",
                        "sender +MiB",
                        "receiver +MiB", "max abs err"], rows))
    return 0
