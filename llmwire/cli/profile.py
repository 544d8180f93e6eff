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
- ``file``: a checkpoint on disk (``--model PATH`` itself, or the synthetic
  model saved as safetensors), streamed with ``send_file`` and received to
  disk (``receive_file``, digest-checked); raw only.

The model is a synthetic Llama-shaped state dict of ``--params`` parameters
(fp32), one tensor (``--model single``), or a checkpoint of your own
(``--model PATH``: .safetensors, or a torch .pt/.pth/.bin state dict), which
the sender loads into memory as a trainer holds it.

Figures per process: the baseline (RSS when the transfer starts, both
processes having built their models: the sender's state dict, the in-place
receiver's target tensors, the file sender's checkpoint written and
dropped), the peak from then until the receiver has everything (it checks
what arrived only afterwards, so the check is not counted), and peak minus
baseline; ``both`` is the same for the two processes' summed RSS (the
paper's whole-machine view). ``seconds`` is the sender's clock from its
connection being up to the receiver's acknowledgement. ``--repeat N`` runs
every mode N times, interleaved, and reports medians; ``--sizes`` repeats all
of it per model size and draws peak against size (``--sweep-plot``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

from .bench import _peers, _plots
from .bench._models import MIN_PARAMS, SYNTHETIC, ModelSource
from .bench._procs import ChildFailed, ChildSilent, expect, reap
from .bench._rss import RssSampler, Timeline
from .bench._timing import format_table
from ..errors import LlmwireError
from .synthetic import parse_size

__all__ = ["MODES", "RECEIVERS", "add_arguments", "profile", "run",
           "parse_model_size", "write_csv"]

MIB = 1 << 20
MODES = ("regular", "container", "file")
RECEIVERS = ("memory", "inplace", "safetensors")
PROCESSES = ("sender", "receiver")
#: figures reported as medians over repeats
MEDIANS = ("sender_baseline_mib", "sender_peak_abs_mib", "sender_peak_mib",
           "receiver_baseline_mib", "receiver_peak_abs_mib", "receiver_peak_mib",
           "total_peak_mib", "seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama", metavar="llama|single|PATH",
                        help="synthetic Llama-shaped dict (default), one big tensor, or "
                             "your checkpoint: .safetensors or a torch .pt/.pth/.bin state dict")
    parser.add_argument("--params", type=parse_size, default=None,
                        help="synthetic model size in parameters (default: 25M, 100 MB fp32)")
    parser.add_argument("--sizes", default=None, metavar="GB,GB,...",
                        help="sweep synthetic model sizes, fp32 GB (e.g. 0.25,0.5,1,2; "
                             "units MB, MiB, GB, GiB allowed)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes: regular, container, file "
                             "(default: %(default)s)")
    parser.add_argument("--formats", default="raw",
                        help="comma-separated formats for regular and container "
                             "(file mode is raw only; default: %(default)s)")
    parser.add_argument("--receiver", default="memory", metavar="memory|inplace|safetensors",
                        help="container mode's receiver targets, comma-separated "
                             "(default: memory)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every mode N times, interleaved; report medians (default: 1)")
    parser.add_argument("--interval", type=float, default=0.005,
                        help="sampling interval in seconds, at most 0.01 (default: 0.005)")
    parser.add_argument("--dir", default=None,
                        help="where runs keep their files (file mode's checkpoint and its "
                             "received copy, a safetensors receiver's file; default: the "
                             "system's temp directory, which must not be a RAM disk for "
                             "honest figures)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--csv", metavar="PATH", help="write every sample of every run as CSV")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of memory over time, all modes (needs matplotlib; "
                             "with --sizes: the largest size)")
    parser.add_argument("--sweep-plot", metavar="PATH",
                        help="with --sizes: write a PNG of peak memory against model size")


def parse_model_size(text: str) -> int:
    """A model size in bytes: a plain number is GB (``0.25`` → 250 MB);
    ``500MB``, ``512MiB``, ``2GB``, ``1.5GiB`` are taken as written."""
    s = text.strip()
    try:
        value = float(s) * 1e9
    except ValueError:
        if not s.lower().endswith(("mb", "mib", "gb", "gib")):
            raise ValueError(f"not a model size: {text!r} (use GB, e.g. 0.25, or 500MB, "
                             f"2GiB)") from None
        value = parse_size(s)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a model size: {text!r} (must be finite and positive)")
    return int(value)


# --------------------------------------------------------------------- runs


def _one(ctx: Any, mode: str, fmt: str, into: str, model: ModelSource,
         interval: float, workroot: str | None) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="llmwire-profile-", dir=workroot)
    rparent, rchild = ctx.Pipe()
    sparent, schild = ctx.Pipe()
    receiver = ctx.Process(target=_peers.receiver,
                           args=(rchild, mode, fmt, into, model, workdir), daemon=True)
    sender = ctx.Process(target=_peers.sender, args=(schild, mode, fmt, model, workdir),
                         daemon=True)
    ok = False

    def from_receiver(kind: str, timeout: float = _peers.TIMEOUT) -> Any:
        return expect(rparent, kind, timeout, receiver, "the receiver process")

    def from_sender(kind: str, timeout: float = _peers.TIMEOUT) -> Any:
        return expect(sparent, kind, timeout, sender, "the sender process")

    try:
        for p in (sender, receiver):
            p.start()
        from_receiver("alive", 300)
        from_sender("alive", 300)
        assert receiver.pid is not None and sender.pid is not None
        events: dict[str, float] = {}
        settle = max(0.02, 3 * interval)
        with RssSampler({"sender": sender.pid, "receiver": receiver.pid},
                        interval=interval) as sampler:
            time.sleep(settle)
            events["start"] = sampler.now()
            rparent.send("build")
            sparent.send("build")
            port = from_receiver("built")
            events["receiver_built"] = sampler.now()
            from_sender("built")
            events["sender_built"] = sampler.now()
            time.sleep(settle)
            events["go"] = sampler.now()
            sparent.send(port)
            try:
                elapsed, wire_bytes = from_sender("sent")
            except ChildFailed as exc:
                if exc.collateral:  # the sender only saw the receiver go away: ask why
                    try:
                        from_receiver("received", 5)  # raises the receiver's failure or death
                    except ChildSilent:
                        pass
                raise
            from_receiver("received")
            events["received"] = sampler.now()
            rparent.send("verify")
            err = from_receiver("verified")
            events["verified"] = sampler.now()
            time.sleep(settle)
        timelines = {name: tl.samples for name, tl in sampler.timelines.items()}
        figures: dict[str, Any] = {"mode": mode, "format": fmt,
                                   "receiver": into if mode == "container" else None,
                                   "seconds": elapsed, "wire_bytes": wire_bytes,
                                   "max_abs_err": err, "events": events,
                                   "timelines": timelines}
        go, received = events["go"], events["received"]
        for name, timeline in sampler.timelines.items():
            base, peak = timeline.at(go), _peak(timeline, go, received)
            figures[f"{name}_baseline_mib"] = base / MIB
            figures[f"{name}_peak_abs_mib"] = peak / MIB
            figures[f"{name}_peak_mib"] = (peak - base) / MIB
        both = Timeline(0, _plots.combined(timelines))
        figures["total_peak_mib"] = (_peak(both, go, received) - both.at(go)) / MIB
        ok = True
        return figures
    finally:
        reap((sender, receiver), 60 if ok else 1)  # after a failure a peer may wait for ever
        shutil.rmtree(workdir, ignore_errors=True)


def _peak(timeline: Timeline, start: float, stop: float) -> int:
    return max((rss for t, rss, _ in timeline.samples if start <= t <= stop),
               default=timeline.at(stop))


def _label(fmt: str, mode: str, into: str) -> str:
    if mode == "container":
        return f"container/{fmt}/{into}"
    return f"{mode}/{fmt}"


def _aggregate(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats; timelines and events of the median run (by the
    two processes' summed peak), every run's figures under ``repeats``."""
    order = sorted(range(len(repeats)), key=lambda i: repeats[i]["total_peak_mib"])
    typical = repeats[order[(len(order) - 1) // 2]]
    out = {k: v for k, v in typical.items() if k not in MEDIANS}
    out.update({k: statistics.median(r[k] for r in repeats) for k in MEDIANS})
    out["max_abs_err"] = max(r["max_abs_err"] for r in repeats)
    out["repeats"] = repeats
    return out


def profile(model: ModelSource | int, modes: list[str], formats: list[str],
            into: str | list[str] = "memory", interval: float = 0.005,
            repeat: int = 1, workdir: str | None = None) -> dict[str, Any]:
    """Run each (mode, format) ``repeat`` times, interleaved.

    ``model`` is a :class:`~llmwire.cli.bench._models.ModelSource` or a number
    of parameters of a synthetic Llama; ``workdir`` holds each run's files
    (file mode's checkpoint and received copy; default: the system's temp
    directory). Returns ``{"model", "params", "model_bytes", "interval",
    "repeat", "runs": {label: figures}}``, the figures being medians over
    the repeats (:func:`_aggregate`).
    """
    if isinstance(model, int):
        model = ModelSource("llama", model)
    ctx = mp.get_context("spawn")
    targets = [into] if isinstance(into, str) else into
    plan = {_label(fmt, mode, target): (mode, fmt, target)
            for mode in modes for fmt in (["raw"] if mode == "file" else formats)
            for target in (targets if mode == "container" else targets[:1])}
    done: dict[str, list[dict[str, Any]]] = {label: [] for label in plan}
    for _ in range(repeat):
        for label, (mode, fmt, target) in plan.items():
            done[label].append(_one(ctx, mode, fmt, target, model, interval, workdir))
    return {"model": model.describe(), "params": model.count(), "model_bytes": model.nbytes(),
            "interval": interval, "repeat": repeat,
            "runs": {label: _aggregate(rs) for label, rs in done.items()}}


# ------------------------------------------------------------------ outputs


def write_csv(results: list[dict[str, Any]], path: str) -> None:
    """One row per sample: params, run, repeat, process, seconds since the
    transfer started, rss_bytes, anon_rss_bytes."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "run", "repeat", "process", "seconds", "rss_bytes",
                    "anon_rss_bytes"])
        for result in results:
            for label, r in result["runs"].items():
                for i, one in enumerate(r["repeats"]):
                    go = one["events"]["go"]
                    for process, samples in one["timelines"].items():
                        for t, rss, anon in samples:
                            w.writerow([result["params"], label, i, process, f"{t - go:.4f}",
                                        rss, anon])


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    modes = {}
    for label, r in result["runs"].items():
        entry = {k: round(r[k], 4 if k == "seconds" else 1) for k in MEDIANS}
        entry.update({"wire_bytes": r["wire_bytes"], "max_abs_err": r["max_abs_err"],
                      "mode": r["mode"], "format": r["format"], "receiver": r["receiver"]})
        if result["repeat"] > 1:
            entry["runs"] = {k: [round(one[k], 4 if k == "seconds" else 1)
                                 for one in r["repeats"]]
                             for k in ("sender_peak_mib", "receiver_peak_mib",
                                       "total_peak_mib", "seconds")}
        modes[label] = entry
    return {k: result[k] for k in ("model", "params", "model_bytes", "interval", "repeat")} | {
        "modes": modes}


def _table(results: list[dict[str, Any]]) -> str:
    rows = []
    for result in results:
        for label, r in result["runs"].items():
            rows.append([label, f"{result['model_bytes'] / MIB:.0f}",
                         *(f"{r[f'{p}_{k}_mib']:.0f}" for p in PROCESSES
                           for k in ("baseline", "peak_abs", "peak")),
                         f"{r['total_peak_mib']:.0f}", f"{r['seconds']:.2f}",
                         f"{r['wire_bytes'] / MIB:.1f}"])
    return format_table(["mode", "model MiB",
                         *(f"{p} {k}" for p in PROCESSES for k in ("base", "peak", "+MiB")),
                         "both +MiB", "seconds", "wire MiB"], rows)


def _usage(message: str) -> int:
    print(f"llmwire profile: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..quant.formats import parse_format_list

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        return _usage(f"--modes takes {', '.join(MODES)}")
    receivers = list(dict.fromkeys(r.strip() for r in args.receiver.split(",") if r.strip()))
    if not receivers or any(r not in RECEIVERS for r in receivers):
        return _usage(f"--receiver takes {', '.join(RECEIVERS)}")
    try:
        parsed = parse_format_list(args.formats)
        if any(nested for _, _, nested in parsed):
            raise ValueError("--formats: +nested is not profiled (it changes only the "
                             "size of the scales)")
        formats = list(dict.fromkeys(fmt for _, fmt, _ in parsed))
        sizes = ([parse_model_size(s) for s in args.sizes.split(",") if s.strip()]
                 if args.sizes is not None else None)
    except (ValueError, OverflowError, LlmwireError) as exc:
        return _usage(str(exc))
    if not formats:
        return _usage("--formats needs at least one format")
    if not 0 < args.interval <= 0.01:
        return _usage("--interval must be in (0, 0.01] seconds")
    if args.repeat < 1:
        return _usage("--repeat must be at least 1")
    if args.sweep_plot and sizes is None:
        return _usage("--sweep-plot needs --sizes")
    if args.dir is not None and not os.path.isdir(args.dir):
        return _usage(f"--dir {args.dir!r} is not a directory")
    if args.model in SYNTHETIC:
        if sizes is not None and args.params is not None:
            return _usage("give --params or --sizes, not both")
        least = MIN_PARAMS[args.model]
        params = [s // 4 for s in sizes] if sizes is not None else [
            25_000_000 if args.params is None else args.params]
        if not params or min(params) < least:
            return _usage(f"the {args.model} model needs at least {least} parameters")
        models = [ModelSource(args.model, p) for p in sorted(set(params))]
    else:
        if args.params is not None or sizes is not None:
            return _usage("--params and --sizes are for synthetic models, not --model PATH")
        if not os.path.isfile(args.model):
            return _usage(f"--model takes llama, single or a checkpoint file; "
                          f"{args.model!r} is neither")
        try:
            models = [ModelSource.parse(args.model, 0)]
        except (LlmwireError, OSError) as exc:
            return _error(" ".join(str(exc).split()))
    if args.plot or args.sweep_plot:
        try:
            _plots.require()
        except _plots.PlotUnavailable as exc:
            return _usage(str(exc))
    _warn_if_too_big(models[-1], modes)
    try:
        with _sigterm_as_exit():
            results = [profile(m, modes, formats, receivers, args.interval, args.repeat,
                               args.dir) for m in models]
    except RuntimeError as exc:  # a profiled process failed: it said why
        return _error(str(exc))
    _write_outputs(args, results)
    if args.json:
        if sizes is None:
            print(json.dumps(_summary(results[0])))
        else:
            print(json.dumps({"model": args.model, "interval": args.interval,
                              "repeat": args.repeat,
                              "sizes": [_summary(r) for r in results]}))
        return 0
    what = "medians of %d runs each" % args.repeat if args.repeat > 1 else "one run each"
    print(f"memory over loopback, {results[-1]['model'] if sizes is None else args.model}; "
          f"RSS sampled every {args.interval * 1000:g} ms, {what}. base: RSS (MiB) when the "
          f"transfer starts, model built; peak: highest RSS until the receiver has "
          f"everything; +MiB: peak - base; both +MiB: the same for the two processes' "
          f"summed RSS")
    print(_table(results))
    return 0


def _error(message: str) -> int:
    print(f"llmwire profile: error: {message}", file=sys.stderr)
    return 1


def _warn_if_too_big(model: ModelSource, modes: list[str]) -> None:
    """A line on stderr when the largest run may not fit in this machine's
    available memory (regular mode holds about five copies across the two
    processes, the others about two, plus the receiver's check)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return
    need = model.nbytes() * (6 if "regular" in modes else 3)
    if need > available:
        print(f"llmwire profile: warning: {model.describe()} may need about "
              f"{need / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is available; a run "
              f"killed for memory is reported as such", file=sys.stderr)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM ends the profile with status 143 after the cleanup Ctrl-C
    gets: runs' temp directories removed, profiled processes stopped."""
    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        print("llmwire profile: terminated; stopping the profiled processes", file=sys.stderr)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _write_outputs(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if args.csv:
        write_csv(results, args.csv)
    last = results[-1]
    if args.plot:
        _plots.timelines(last["runs"], f"llmwire profile: {last['model']}, memory over time "
                                       f"(dots: everything received)", args.plot)
    if args.sweep_plot:
        _plots.sweep([{"model_bytes": r["model_bytes"], "modes": _summary(r)["modes"]}
                      for r in results],
                     f"llmwire profile: peak memory over baseline against model size "
                     f"({args.model})", args.sweep_plot)
