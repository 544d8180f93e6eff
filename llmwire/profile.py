"""``llmwire profile``: memory of a sender and a receiver over loopback, over time.

For each mode (and format), a fresh sender and receiver process pair on
127.0.0.1; each process's RSS and anonymous RSS are sampled from outside
(/proc/PID/statm, every ``--interval`` seconds, 5 ms by default) from before
the process builds its model until after the receiver verified what arrived.

Modes:

- ``regular``: the whole state dict serialized and sent as one message
  (``send_object`` / ``receive_object``; quantized formats travel as their
  parts and are dequantized by the receiver);
- ``container``: state dict streaming (``send_state_dict`` /
  ``receive_state_dict``) into ``--receiver`` memory, inplace or safetensors;
- ``file``: a safetensors checkpoint on disk, streamed with ``send_file`` and
  received to disk (``receive_file``, digest-checked); raw only.

Figures per process: the baseline (RSS when the process reports its model
built: the sender's state dict, the in-place receiver's target tensors, the
file sender's checkpoint written and dropped), the peak during the transfer
(from that moment until the receiver has everything, before verification)
and peak minus baseline. ``seconds`` is the sender's clock from its first
byte to the receiver's acknowledgement.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from .bench._rss import RssSampler, Timeline
from .bench._timing import format_table
from .synthetic import parse_size

__all__ = ["MODES", "RECEIVERS", "add_arguments", "profile", "run", "main",
           "write_csv", "write_plot"]

SECRET = b"llmwire-profile"
MIB = 1 << 20
MODES = ("regular", "container", "file")
RECEIVERS = ("memory", "inplace", "safetensors")
_TIMEOUT = 900.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=parse_size, default="25M",
                        help="model size in parameters (default: 25M, 100 MB in fp32)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes: regular, container, file "
                             "(default: %(default)s)")
    parser.add_argument("--formats", default="raw",
                        help="comma-separated formats for regular and container "
                             "(file mode is raw only; default: %(default)s)")
    parser.add_argument("--receiver", choices=RECEIVERS, default="memory",
                        help="container mode's receiver target (default: memory)")
    parser.add_argument("--interval", type=float, default=0.005,
                        help="sampling interval in seconds, at most 0.01 (default: 0.005)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--csv", metavar="PATH", help="write the raw timelines as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of memory over time (needs matplotlib)")


# ------------------------------------------------------------------ processes


def _expect(conn: Any, kind: str, timeout: float = _TIMEOUT) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"no {kind!r} from a profiled process within {timeout}s")
    got, value = conn.recv()
    if got == "failed":
        raise RuntimeError(f"profiled process failed: {value}")
    if got != kind:
        raise RuntimeError(f"expected {kind!r}, got {got!r}")
    return value


def _guard(conn: Any, body: Any) -> None:
    try:
        body()
    except BaseException as exc:  # report, so the parent does not wait for nothing
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise


def _max_err(received: dict[str, Any], expected: dict[str, Any]) -> float:
    if set(received) != set(expected):
        raise RuntimeError("received keys differ from the sent state dict")
    return max((float((received[k].float() - v.float()).abs().max()) for k, v in expected.items()),
               default=0.0)


def _receiver(conn: Any, mode: str, fmt: str, into: str, params: int, seed: int,
              workdir: str) -> None:
    _guard(conn, lambda: _receiver_body(conn, mode, fmt, into, params, seed, workdir))


def _receiver_body(conn: Any, mode: str, fmt: str, into: str, params: int, seed: int,
                   workdir: str) -> None:
    import asyncio

    import torch

    import llmwire
    from llmwire.synthetic import make_state_dict

    conn.send(("alive", None))
    conn.recv()  # build
    target = None
    if mode == "container" and into == "inplace":
        target = {k: torch.zeros_like(v)
                  for k, v in make_state_dict("llama", params, seed=seed).items()}
    outdir = os.path.join(workdir, "received")
    os.makedirs(outdir, exist_ok=True)

    async def receive(t: Any) -> Any:
        if mode == "regular":
            obj = await llmwire.receive_object(t, max_size=1 << 40)
            if fmt == "raw":
                return obj
            from llmwire.quant.codec import QuantizedTensor, TensorSpec
            return {k: llmwire.dequantize(QuantizedTensor(TensorSpec.from_header(v["spec"]),
                                                          dict(v["parts"]), container="torch"))
                    for k, v in obj.items()}
        if mode == "container":
            arg = {"memory": None, "inplace": target,
                   "safetensors": os.path.join(outdir, "model.safetensors")}[into]
            return await llmwire.receive_state_dict(t, arg, overwrite=True)
        return await llmwire.receive_file(t, outdir, overwrite=True)

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(t: Any) -> None:
            try:
                received = await receive(t)
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc)
                raise
            await t.send_message({"ok": True})
            done.set_result(received)
            await t.wait_closed()

        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("built", server.port))
        received = await asyncio.wait_for(done, _TIMEOUT)
        conn.send(("received", None))
        if mode == "file":
            err = 0.0  # receive_file checked the whole-file digest
        else:
            if mode == "container" and into == "safetensors":
                from safetensors.torch import load_file
                received = load_file(received)
            err = _max_err(received, make_state_dict("llama", params, seed=seed))
            if fmt == "raw" and err != 0.0:
                raise RuntimeError(f"raw transfer restored with error {err}")
        conn.send(("verified", err))
        await server.close()

    llmwire.run(main())


def _sender(conn: Any, mode: str, fmt: str, params: int, seed: int, workdir: str) -> None:
    _guard(conn, lambda: _sender_body(conn, mode, fmt, params, seed, workdir))


def _sender_body(conn: Any, mode: str, fmt: str, params: int, seed: int, workdir: str) -> None:
    import gc

    import llmwire
    from llmwire.synthetic import make_state_dict

    conn.send(("alive", None))
    conn.recv()  # build
    state = make_state_dict("llama", params, seed=seed)
    path = os.path.join(workdir, "model.safetensors")
    if mode == "file":
        from safetensors.torch import save_file
        save_file(state, path)
        del state
        gc.collect()
    conn.send(("built", None))
    port = conn.recv()  # go

    async def main() -> tuple[float, int]:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        started = time.perf_counter()
        if mode == "regular":
            value: Any = state
            if fmt != "raw":
                value = {k: {"spec": q.spec.to_header(), "parts": q.parts}
                         for k, q in llmwire.quantize_state_dict(state, fmt).items()}
            wire = await llmwire.send_object(t, value)
        elif mode == "container":
            wire = (await llmwire.send_state_dict(t, state, fmt)).wire_bytes
        else:
            wire = (await llmwire.send_file(t, path)).bytes_transferred
        await t.receive_message()
        elapsed = time.perf_counter() - started
        await t.close()
        return elapsed, wire

    conn.send(("sent", llmwire.run(main())))


# --------------------------------------------------------------------- runs


def _one(ctx: Any, mode: str, fmt: str, into: str, params: int, interval: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="llmwire-profile-")
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    receiver = ctx.Process(target=_receiver,
                           args=(rchild, mode, fmt, into, params, 1, workdir), daemon=True)
    sender = ctx.Process(target=_sender, args=(schild, mode, fmt, params, 1, workdir),
                         daemon=True)
    processes = (sender, receiver)
    ok = False
    try:
        for p in processes:
            p.start()
        _expect(rparent, "alive", 300)
        _expect(sparent, "alive", 300)
        assert receiver.pid is not None and sender.pid is not None
        events: dict[str, float] = {}
        with RssSampler({"sender": sender.pid, "receiver": receiver.pid},
                        interval=interval) as sampler:
            time.sleep(max(0.02, 3 * interval))
            events["start"] = sampler.now()
            rparent.send("build")
            sparent.send("build")
            port = _expect(rparent, "built")
            events["receiver_built"] = sampler.now()
            _expect(sparent, "built")
            events["sender_built"] = sampler.now()
            time.sleep(max(0.02, 3 * interval))
            events["go"] = sampler.now()
            sparent.send(port)
            elapsed, wire_bytes = _expect(sparent, "sent")
            _expect(rparent, "received")
            events["received"] = sampler.now()
            err = _expect(rparent, "verified")
            events["verified"] = sampler.now()
            time.sleep(max(0.02, 3 * interval))
        figures: dict[str, Any] = {"mode": mode, "format": fmt,
                                   "receiver": into if mode == "container" else None,
                                   "seconds": elapsed, "wire_bytes": wire_bytes,
                                   "max_abs_err": err, "events": events}
        for name, timeline in sampler.timelines.items():
            built = events[f"{name}_built"]
            base = timeline.at(built)
            peak = _peak(timeline, built, events["received"])
            figures[f"{name}_baseline_mib"] = base / MIB
            figures[f"{name}_peak_abs_mib"] = peak / MIB
            figures[f"{name}_peak_mib"] = (peak - base) / MIB
        figures["timelines"] = {name: tl.samples for name, tl in sampler.timelines.items()}
        ok = True
        return figures
    finally:
        for p in processes:  # after a failure the peer may wait for ever: do not wait
            p.join(60 if ok else 1)
            if p.is_alive():
                p.terminate()
                p.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


def _peak(timeline: Timeline, start: float, stop: float) -> int:
    return max((rss for t, rss, _ in timeline.samples if start <= t <= stop),
               default=timeline.at(stop))


def _label(fmt: str, mode: str, into: str) -> str:
    if mode == "container":
        return f"container/{fmt}/{into}"
    return f"{mode}/{fmt}"


def profile(params: int, modes: list[str], formats: list[str], into: str = "memory",
            interval: float = 0.005) -> dict[str, Any]:
    """Run each (mode, format) once; returns ``{"params", "runs": {label: figures}}``."""
    ctx = mp.get_context("spawn")
    runs: dict[str, Any] = {}
    for mode in modes:
        for fmt in (["raw"] if mode == "file" else formats):
            label = _label(fmt, mode, into)
            if label not in runs:
                runs[label] = _one(ctx, mode, fmt, into, params, interval)
    return {"params": params, "interval": interval, "runs": runs}


# ------------------------------------------------------------------ outputs


def write_csv(result: dict[str, Any], path: str) -> None:
    """One row per sample: run, process, seconds, rss_bytes, anon_rss_bytes."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "process", "seconds", "rss_bytes", "anon_rss_bytes"])
        for label, r in result["runs"].items():
            for process, samples in r["timelines"].items():
                for t, rss, anon in samples:
                    w.writerow([label, process, f"{t:.4f}", rss, anon])


def write_plot(result: dict[str, Any], path: str) -> None:
    """A PNG: RSS over time since the transfer's start, every run and process."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'llmwire[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, (label, r) in enumerate(result["runs"].items()):
        go = r["events"]["go"]
        color = f"C{i % 10}"
        for process, style in (("sender", "--"), ("receiver", "-")):
            samples = r["timelines"][process]
            ax.plot([t - go for t, _, _ in samples], [rss / MIB for _, rss, _ in samples],
                    style, color=color, label=f"{label} {process}")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("seconds since the transfer started (negative: building the model)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"llmwire profile: {result['params'] / 1e6:g}M parameters over loopback")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("sender_peak_mib", "receiver_peak_mib", "sender_baseline_mib",
            "receiver_baseline_mib", "sender_peak_abs_mib", "receiver_peak_abs_mib")
    return {"params": result["params"], "interval": result["interval"],
            "modes": {label: {**{k: round(r[k], 1) for k in keys},
                              "seconds": round(r["seconds"], 4), "wire_bytes": r["wire_bytes"],
                              "max_abs_err": r["max_abs_err"], "mode": r["mode"],
                              "format": r["format"], "receiver": r["receiver"]}
                      for label, r in result["runs"].items()}}


def _table(result: dict[str, Any]) -> str:
    rows = [[label, f"{r['sender_baseline_mib']:.0f}", f"{r['sender_peak_abs_mib']:.0f}",
             f"{r['sender_peak_mib']:.0f}", f"{r['receiver_baseline_mib']:.0f}",
             f"{r['receiver_peak_abs_mib']:.0f}", f"{r['receiver_peak_mib']:.0f}",
             f"{r['seconds']:.2f}", f"{r['wire_bytes'] / MIB:.1f}"]
            for label, r in result["runs"].items()]
    return format_table(["mode", "sender base MiB", "sender peak MiB", "sender +MiB",
                         "receiver base MiB", "receiver peak MiB", "receiver +MiB",
                         "seconds", "wire MiB"], rows)


def run(args: argparse.Namespace) -> int:
    from .quant.formats import get_format

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or not formats:
        print(f"llmwire profile: --modes takes {', '.join(MODES)}", file=sys.stderr)
        return 2
    if not 0 < args.interval <= 0.01:
        print("llmwire profile: --interval must be in (0, 0.01] seconds", file=sys.stderr)
        return 2
    for fmt in formats:
        get_format(fmt)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("llmwire profile: --plot needs matplotlib (pip install 'llmwire[plot]')",
                  file=sys.stderr)
            return 2
    result = profile(args.params, modes, formats, args.receiver, args.interval)
    if args.csv:
        write_csv(result, args.csv)
    if args.plot:
        write_plot(result, args.plot)
    if args.json:
        print(json.dumps(_summary(result)))
        return 0
    print(f"memory over loopback: {args.params / 1e6:g}M parameters (llama), RSS sampled every "
          f"{args.interval * 1000:g} ms; +MiB = peak during the transfer minus the baseline "
          f"once the process built its model")
    print(_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memprofile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
