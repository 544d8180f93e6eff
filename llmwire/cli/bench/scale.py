"""``llmwire bench scale``: a whole model's state dict (70B and up) over loopback with bounded memory.

The sender streams a state dict with the shapes of a real model (Llama 3.x:
``70B`` is 80 layers, hidden 8192, FFN 28672, vocab 128256, 70.6 B params,
141 GB in bf16), whose values are generated slice by slice and never held
whole, in each format asked, to a receiver in another process:

- ``verify``: restores every slice and checks it against the generator (bf16
  and raw: every element; lossy formats: sampled windows bit for bit
  against the reference decoding of the generator's values), then drops it;
- ``shards``: lands it as a Hugging Face sharded directory on disk
  (``--max-shard-size``, index included), then, once the transfer is over
  and no longer measured, loads it back with ``open_checkpoint`` and checks
  every tensor the same way, and removes it.

``--source checkpoint`` first writes the generated model as a sharded
safetensors directory (``--max-shard-size``) in ``--checkpoint-dir`` (by
default /dev/shm: tmpfs, where a mapped reader's pages would all be
resident) and the sender streams that checkpoint, read lazily with
``open_checkpoint`` as ``llmwire send MODEL_DIR/`` does; the directory is
removed at the end.

Per run: seconds, GB/s of bf16 delivered (and its ratio to a raw loopback
socket moving reused 4 MiB buffers, measured in the same invocation), wire
bytes, and each process's peak RSS over its baseline (taken once it built
its generator and imports), sampled from outside every 5 ms. Medians over
``--runs``. The targets (docs/benchmarks.md): both peaks within 1 GiB over
baseline at 70B, whatever the format.
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

from ._procs import expect, guard, reap
from ._rss import RssSampler
from ._timing import format_table
from .wire import _one_run, _raw_receiver, _raw_sender

__all__ = ["add_arguments", "run", "measure"]

SECRET = b"bench-scale"
MIB = 1 << 20
RECEIVERS = ("verify", "shards")
#: a 405B model in nf4 on a slow machine takes long: generous, but bounded
TIMEOUT = 4 * 3600.0
BASELINE_BYTES = 2 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._generated import ARCHS

    parser.add_argument("--params", choices=list(ARCHS), default="8B",
                        help="the model's shapes (default: 8B)")
    parser.add_argument("--formats", default="bf16,nf4",
                        help="comma-separated formats (bf16 = as it is; default: %(default)s)")
    parser.add_argument("--receiver", choices=RECEIVERS, default="verify",
                        help="verify: check every slice and keep nothing; shards: a sharded "
                             "directory on disk, loaded back and checked (default: verify)")
    parser.add_argument("--runs", type=int, default=3, help="runs per format (default: 3)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="shards receiver: largest shard (default: 5GB)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="shards receiver: where the directory is written (default: the "
                             "temporary directory; needs the model's size free)")
    parser.add_argument("--source", choices=("generated", "checkpoint"), default="generated",
                        help="generated: values made slice by slice in the sender; checkpoint: "
                             "the same model written once as a sharded directory, sent from "
                             "there as llmwire send does (default: generated)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help="--source checkpoint: where it is written (default: /dev/shm)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with a "runs" list')


def _receiver(conn: Any, arch_name: str, into: str, workdir: str, max_shard: int) -> None:
    guard(conn, lambda: _receive(conn, arch_name, into, workdir, max_shard))


def _receive(conn: Any, arch_name: str, into: str, workdir: str, max_shard: int) -> None:
    import asyncio

    import llmwire
    from llmwire.payloads.filesinks import ShardedSink

    from ._generated import ARCHS, VerifySink, _table

    _table(0)  # the generator's table is part of the baseline
    arch = ARCHS[arch_name]
    target = os.path.join(workdir, f"llmwire-scale-{arch_name}")

    async def main() -> Any:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            sink = VerifySink(arch) if into == "verify" else ShardedSink(target, max_shard)
            try:
                done.set_result(await llmwire.receive_state_dict(t, sink))
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc)
                raise

        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("ready", server.port))
        try:
            return await asyncio.wait_for(done, TIMEOUT)
        finally:
            await server.close()

    try:
        result = llmwire.run(main())
        conn.send(("received", result if into == "verify" else None))
        fmt = conn.recv()  # the parent stopped sampling: now load it back
        conn.send(("checked", _load_back(target, arch, fmt) if into == "shards" else result))
    finally:
        if into == "shards":
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(target + ".part", ignore_errors=True)


def _load_back(path: str, arch: Any, fmt: str) -> dict[str, Any]:
    """Open the landed directory as a checkpoint and check every tensor."""
    import numpy as np

    import llmwire
    from llmwire.payloads.statedict import plan_state_dict

    from ._generated import check_values, generated_state_dict

    expected = generated_state_dict(arch)
    # each tensor as the sender encoded it (small ones raw, as send_state_dict does)
    manifest, _ = plan_state_dict(expected, "raw" if fmt == "bf16" else fmt)
    specs = {e.name: e.spec for e in manifest.entries}
    buffer = np.empty(8 << 20, np.uint8)
    elements = compared = 0
    with llmwire.open_checkpoint(path) as checkpoint:
        if list(checkpoint) != list(expected):
            raise RuntimeError("the landed directory holds other tensors than were sent")
        for name, tensor in checkpoint.items():
            want = expected[name]
            spec = specs[name]
            view = tensor._llmwire_view()
            step = 4 << 20  # elements, a multiple of every block size
            for start in range(0, want.numel, step):
                stop = min(want.numel, start + step)
                values = view.slice(start, stop, buffer)
                compared += check_values(spec, want, start, values.view(np.uint16))
                elements += stop - start
        shards = len(checkpoint.shards)
    return {"elements": elements, "compared": compared, "shards": shards}


def write_checkpoint(arch: Any, path: str, max_shard: int) -> int:
    """The generated model as a sharded directory at ``path`` (through
    ``ShardedSink``, slice by slice); returns its bytes on disk."""
    import numpy as np

    from ...payloads.filesinks import ShardedSink
    from ...payloads.statedict import plan_state_dict
    from ._generated import generated_state_dict

    manifest, views = plan_state_dict(generated_state_dict(arch))
    sink = ShardedSink(path, max_shard)
    sink.prepare(manifest)
    sink.start(None)
    buffer = np.empty(manifest.slice_elements * 4, np.uint8)
    try:
        for entry in manifest.entries:
            for start, stop in entry.slices(manifest.slice_elements):
                sink.write(entry, start, views[entry.name].slice(start, stop, buffer))
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return int(sink.receipt()["bytes"])


def _sender(conn: Any, port: int, arch_name: str, fmt: str, source: str | None) -> None:
    guard(conn, lambda: _send(conn, port, arch_name, fmt, source))


def _send(conn: Any, port: int, arch_name: str, fmt: str, source: str | None) -> None:
    import llmwire

    from ._generated import ARCHS, _table, generated_state_dict

    _table(0)
    state: Any = (generated_state_dict(ARCHS[arch_name]) if source is None
                  else llmwire.open_checkpoint(source))
    conn.send(("ready", None))
    conn.recv()  # go

    async def main() -> tuple[float, int, int]:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        started = time.perf_counter()
        result = await llmwire.send_state_dict(t, state, "raw" if fmt == "bf16" else fmt)
        elapsed = time.perf_counter() - started
        await t.close()
        return elapsed, result.tensor_bytes, result.wire_bytes

    conn.send(("sent", llmwire.run(main())))


def _one(ctx: Any, arch_name: str, fmt: str, into: str, workdir: str,
         max_shard: int, source: str | None) -> dict[str, Any]:
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(rchild, arch_name, into, workdir, max_shard))
    receiver.start()
    sender = None
    try:
        port = expect(rparent, "ready", 300, receiver, "the receiver")
        sender = ctx.Process(target=_sender, args=(schild, port, arch_name, fmt, source))
        sender.start()
        expect(sparent, "ready", 300, sender, "the sender")
        assert receiver.pid is not None and sender.pid is not None
        with RssSampler({"sender": sender.pid, "receiver": receiver.pid}) as sampler:
            time.sleep(0.1)
            start = sampler.now()
            sparent.send("go")
            elapsed, tensor_bytes, wire_bytes = expect(sparent, "sent", TIMEOUT, sender,
                                                       "the sender")
            expect(rparent, "received", 600, receiver, "the receiver")
        rparent.send(fmt)
        checked = expect(rparent, "checked", TIMEOUT, receiver, "the receiver")
        row: dict[str, Any] = {"format": fmt, "receiver": into, "bytes": tensor_bytes,
                               "wire_bytes": wire_bytes, "seconds": round(elapsed, 3),
                               "gbps": round(tensor_bytes / elapsed / 1e9, 3)}
        for name, timeline in sampler.timelines.items():
            base = timeline.at(start)
            row[f"{name}_peak_mib"] = round((timeline.peak(start) - base) / MIB, 1)
            row[f"{name}_baseline_mib"] = round(base / MIB, 1)
        row["checked"] = checked
        return row
    finally:
        reap((sender, receiver), 60)


def measure(arch_name: str, formats: list[str], into: str, runs: int, workdir: str,
            max_shard: int, source: str | None = None, progress: bool = False
            ) -> dict[str, Any]:
    """``source``: the path of a checkpoint of the generated model to send
    (None: generate in the sender); ``progress``: a line on stderr per run."""
    from ._generated import ARCHS

    ctx = mp.get_context("spawn")
    arch = ARCHS[arch_name]
    baseline = min(BASELINE_BYTES, arch.params * 2)
    raw = [baseline / _one_run(ctx, _raw_receiver, _raw_sender, baseline, 4 * MIB) / 1e9]
    rows = []
    for number in range(runs):
        for fmt in formats:
            row = _one(ctx, arch_name, fmt, into, workdir, max_shard, source)
            rows.append({"run": number + 1, "params": arch_name, "parameters": arch.params,
                         "source": "generated" if source is None else "checkpoint", **row})
            if progress:  # a long run says how far it got
                print(f"llmwire bench scale: run {number + 1}/{runs} {fmt}: "
                      f"{row['bytes'] / 1e9:.1f} GB in {row['seconds']:.0f} s, sender "
                      f"+{row['sender_peak_mib']:.0f} MiB, receiver "
                      f"+{row['receiver_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    raw.append(baseline / _one_run(ctx, _raw_receiver, _raw_sender, baseline, 4 * MIB) / 1e9)
    raw_gbps = statistics.median(raw)
    summary = {}
    for fmt in formats:
        mine = [r for r in rows if r["format"] == fmt]
        gbps = statistics.median(r["gbps"] for r in mine)
        summary[fmt] = {
            "seconds": statistics.median(r["seconds"] for r in mine),
            "gbps": gbps, "ratio_to_raw": round(gbps / raw_gbps, 3),
            "wire_bytes": mine[0]["wire_bytes"],
            "sender_peak_mib": statistics.median(r["sender_peak_mib"] for r in mine),
            "receiver_peak_mib": statistics.median(r["receiver_peak_mib"] for r in mine),
            "max_sender_peak_mib": max(r["sender_peak_mib"] for r in mine),
            "max_receiver_peak_mib": max(r["receiver_peak_mib"] for r in mine)}
    return {"params": arch_name, "parameters": arch.params, "receiver": into,
            "raw_gbps": round(raw_gbps, 3), "raw_runs_gbps": [round(x, 3) for x in raw],
            "runs": rows, "summary": summary}


def run(args: argparse.Namespace) -> int:
    from ...quant.formats import get_format
    from ...sharding import parse_size
    from ._generated import ARCHS

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        for fmt in formats:
            if fmt in ("raw", "fp32"):
                raise ValueError(f"{fmt}: the generated model is bfloat16; bf16 sends it as "
                                 "it is")
            get_format(fmt)
        max_shard = parse_size(args.max_shard_size)
    except (ValueError, LookupError) as exc:
        print(f"llmwire bench scale: {exc}", file=sys.stderr)
        return 2
    if args.runs <= 0 or not formats:
        print("llmwire bench scale: --runs must be positive and --formats not empty",
              file=sys.stderr)
        return 2
    workdir = args.workdir or tempfile.gettempdir()
    if args.receiver == "shards":
        need = ARCHS[args.params].params * 2 + (1 << 30)
        free = shutil.disk_usage(workdir).free
        if free < need:
            print(f"llmwire bench scale: {workdir} has {free / 1e9:.1f} GB free, the shards "
                  f"need {need / 1e9:.1f} GB (--workdir elsewhere, or a smaller --params)",
                  file=sys.stderr)
            return 1
    source = scratch = None
    try:
        if args.source == "checkpoint":
            where = args.checkpoint_dir or ("/dev/shm" if os.path.isdir("/dev/shm")
                                            else tempfile.gettempdir())
            if shutil.disk_usage(where).free < ARCHS[args.params].params * 2 + (1 << 30):
                print(f"llmwire bench scale: {where} has no room for the {args.params} "
                      "checkpoint (--checkpoint-dir elsewhere, or a smaller --params)",
                      file=sys.stderr)
                return 1
            scratch = tempfile.mkdtemp(prefix="llmwire-scale-source-", dir=where)
            source = os.path.join(scratch, "model")
            write_checkpoint(ARCHS[args.params], source, max_shard)
        r = measure(args.params, formats, args.receiver, args.runs, workdir, max_shard,
                    source, progress=True)
    except RuntimeError as exc:  # a child failed, died or went silent: its reason
        print(f"llmwire bench scale: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        if scratch is not None:  # the directory mkdtemp made, and only it
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['params']} ({r['parameters'] / 1e9:.2f} B params, "
          f"{r['parameters'] * 2 / 1e9:.1f} GB bf16, {args.source}) over loopback TCP into "
          f"{r['receiver']}, median of {args.runs} run(s); raw socket {r['raw_gbps']:.2f} GB/s")
    rows = [[fmt, f"{s['wire_bytes'] / 1e9:.1f}", f"{s['seconds']:.0f}", f"{s['gbps']:.2f}",
             f"{s['ratio_to_raw']:.2f}", f"{s['sender_peak_mib']:.0f}",
             f"{s['receiver_peak_mib']:.0f}"] for fmt, s in r["summary"].items()]
    print(format_table(["format", "wire GB", "seconds", "GB/s bf16", "x raw", "sender +MiB",
                        "receiver +MiB"], rows))
    return 0
