"""``llmwire bench nvflare``: stock NVFlare FedAvg against llmwire's ways in.

Every mode is a real ``FedJob.simulator_run`` (NVFlare's simulator: a server
process and one ``simulator_worker`` process per site, over CellNet on
localhost), started in a process of its own
(llmwire.cli.bench.nvflare_app.job), with the same synthetic model, the same
deterministic training per site and round, and the same rounds. The RSS of
every process of the run is sampled from outside (/proc); everything it
started is stopped by PID. Modes:

- ``stock``: NVFlare's FedAvg, fp32 weights both ways;
- ``nvflare-fp16``: NVFlare's own ``ModelQuantizer``/``ModelDequantizer``
  (float16) at the four filter positions;
- ``nvflare-nf4``: the same in ``normfloat4``: on a CPU-only site it fails
  (bitsandbytes on ``.cuda()`` tensors); the bench reports the error;
- ``filters``: llmwire's filters (``add_filters``: the first global in
  bf16, then nf4 deltas against what the sites hold down; the sites'
  weights turned into nf4 updates up, ``as_diff=True``);
- ``oob``: ``OutOfBandFedAvg``/``OutOfBandClient``: the models go over
  llmwire beside NVFlare (whole raw weights first, then the nf4 mean update
  down; nf4 updates up); NVFlare carries only the link and the receipt.

Reported per mode: seconds of ``simulator_run``, the peak RSS of the server
process, of the largest site process and of the whole process tree (and
the server's and sites' idle RSS), model bytes moved per round (the values
of NVFlare's messages as they leave and reach the server, or llmwire's
streams), and the final global's max abs difference from stock's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

from ._engine import add_engine_arguments, engine_modes
from ._fl_task import max_abs_diff, model_bytes, read_idle
from ._timing import format_table
from ._tree import TreeSampler, argv_of, stop_tree

__all__ = ["add_arguments", "run", "measure", "MODES"]

MIB = 1 << 20
MODES = ("stock", "nvflare-fp16", "nvflare-nf4", "filters", "oob")
#: the formats of each mode: the global (or mean update) down, what goes up
FORMATS = {"stock": ("fp32", "fp32"), "nvflare-fp16": ("fp16", "fp16"),
           "nvflare-nf4": ("nf4", "nf4"), "filters": ("bf16, then nf4 delta", "nf4 delta"),
           "oob": ("raw, then nf4 delta", "nf4 delta")}
_OOB_LINE = re.compile(r"round (\d+): (\d+) of (\d+) updates, (\d+) bytes up, (\d+) down")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    add_engine_arguments(parser, MODES, "sites")



def _role(pid: int) -> str:
    argv = argv_of(pid)
    if any(a.endswith("simulator_worker") for a in argv[:3]):
        return "client"
    if any(a.endswith("simulator.simulator") for a in argv[:3]):
        return "simulator"
    return "other"


def _server_pid(sampler: TreeSampler) -> int | None:
    """The simulator process whose children are the sites' workers."""
    clients = [p for p, r in sampler.role.items() if r == "client"]
    parents = {sampler.parent.get(p) for p in clients} - {None}
    return next(iter(parents), None)


_FAILED = ("failed:", "processing error", "Error:", "AssertionError", "Exception:",
           " - ERROR - ")


def _error(workspace: pathlib.Path, log: str) -> str:
    """The first line of the run's logs that says what failed."""
    texts = []
    for path in sorted(workspace.glob("*/log.txt")):
        texts.append(path.read_text(errors="replace"))
    texts.append(log)
    for text in texts:
        for line in text.splitlines():
            if any(mark in line for mark in _FAILED):
                return line.split(" - ")[-1].strip()[-300:]
    return log.strip().splitlines()[-1][-300:] if log.strip() else "no output"


def _wire_bytes(mode: str, out: pathlib.Path, workspace: pathlib.Path
                ) -> tuple[int, int, int]:
    """Model bytes (down, up) of the whole job, and how many updates reached
    the server (a job whose filters fail still "completes": NVFlare cancels
    the task and saves the global it has)."""
    down = up = results = 0
    if mode == "oob":
        log = workspace / "server" / "log.txt"
        text = log.read_text(errors="replace") if log.exists() else ""
        for match in _OOB_LINE.finditer(text):
            results += int(match.group(2))
            up += int(match.group(4))
            down += int(match.group(5))
        return down, up, results
    path = out / "wire.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        if entry["direction"] == "down":
            down += entry["bytes"]
        else:
            up += entry["bytes"]
            results += 1
    return down, up, results


def _one_mode(mode: str, params: int, clients: int, rounds: int, ckpt: str, timeout: float,
              workdir: pathlib.Path) -> dict[str, Any]:
    out = workdir / mode
    out.mkdir(parents=True)
    argv = [sys.executable, "-m", "llmwire.cli.bench.nvflare_app.job", "--mode", mode,
            "--params", str(params), "--clients", str(clients), "--rounds", str(rounds),
            "--ckpt", ckpt, "--out", str(out)]
    log_path = out / "job.log"
    # the job, and the simulator's processes below it, run this very llmwire
    root = str(pathlib.Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "LLMWIRE_NVFLARE_CACHE": str(out / "cache"),  # the filters' site files
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=out, env=env)
    timed_out = False
    try:
        with TreeSampler({process.pid: "job"}, _role) as sampler:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:  # a failed row; the other modes still run
                timed_out = True
    finally:
        stop_tree([process], grace=15.0)
    log = log_path.read_text(errors="replace")
    result_path = out / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else \
        {"rc": process.returncode, "seconds": None}
    workspace = out / "workspace"
    idle = read_idle(str(out))
    server = _server_pid(sampler)
    client_peak, client_idle = sampler.peak("client", idle)
    down, up, results = _wire_bytes(mode, out, workspace)
    final = workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    ok = not timed_out and result["rc"] == 0 and final.exists() and results == clients * rounds
    error = None
    if timed_out:
        error = f"the job took over {timeout:g} s (stopped)"
    elif not ok:
        error = _error(workspace, log)
        if result["rc"] == 0:
            error = f"{results} of {clients * rounds} updates reached the server: {error}"
    row: dict[str, Any] = {
        "mode": mode, "down": FORMATS[mode][0], "up": FORMATS[mode][1], "params": params,
        "clients": clients, "rounds": rounds, "ok": ok, "error": error,
        "seconds": result["seconds"] if ok else None,
        "server_peak_mib": sampler.peaks.get(server, 0) / MIB if server else 0.0,
        "client_peak_mib": client_peak / MIB, "client_idle_mib": client_idle / MIB,
        "tree_peak_mib": sampler.tree_peak / MIB,
        "wire_bytes": (down + up) // rounds if ok else None,
        "down_bytes": down if ok else None, "up_bytes": up if ok else None,
        "final": str(final) if ok else None}
    return row


def _final(path: str) -> dict[str, Any]:
    """The global model file a job's persistor wrote."""
    import torch

    return torch.load(path, weights_only=True)["model"]


def measure(modes: list[str], params: int, clients: int, rounds: int,
            timeout: float = 1800.0, progress: Any = None) -> dict[str, Any]:
    """Run every mode in its own simulator job; the bench's JSON object."""
    import nvflare
    import torch

    from ._fl_task import initial_model

    with tempfile.TemporaryDirectory(prefix="llmwire-bench-nvflare-") as tmp:
        workdir = pathlib.Path(tmp)
        ckpt = str(workdir / "initial.pt")
        torch.save(initial_model(params), ckpt)  # the same start for every mode
        rows = []
        for mode in modes:
            if progress:
                progress(f"{mode}: a simulator job with {clients} sites, {rounds} rounds ...")
            rows.append(_one_mode(mode, params, clients, rounds, ckpt, timeout, workdir))
        stock = next((r for r in rows if r["mode"] == "stock" and r["ok"]), None)
        want = _final(stock["final"]) if stock is not None else None  # read once
        for row in rows:
            row["max_abs_diff_vs_stock"] = (max_abs_diff(_final(row["final"]), want)
                                            if want is not None and row["ok"] else None)
            if stock is not None and row["ok"]:
                row["seconds_vs_stock"] = row["seconds"] / stock["seconds"]
                row["server_peak_vs_stock"] = (row["server_peak_mib"] / stock["server_peak_mib"]
                                               if stock["server_peak_mib"] else None)
        for row in rows:
            del row["final"]
    return {"nvflare": nvflare.__version__, "params": params,
            "model_mib": model_bytes(params) / MIB, "clients": clients, "rounds": rounds,
            "modes": rows}


def run(args: argparse.Namespace) -> int:
    modes = engine_modes("nvflare", "NVFlare", "nvflare", args, MODES)
    if modes is None:
        return 2
    say = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = measure(modes, args.params, args.clients, args.rounds, args.timeout, say)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"nvflare {result['nvflare']}, {args.params:,} parameters "
          f"({result['model_mib']:.0f} MiB fp32), {args.clients} sites, {args.rounds} "
          "rounds; peak RSS in MiB (a site's idle: before it held a model)")
    rows, failures = [], []
    for r in result["modes"]:
        if not r["ok"]:
            rows.append([r["mode"], f"{r['down']}/{r['up']}", "failed", "", "", "", "", ""])
            failures.append(f"{r['mode']}: {r['error']}")
            continue
        diff = r["max_abs_diff_vs_stock"]
        rows.append([r["mode"], f"{r['down']}/{r['up']}", f"{r['seconds']:.1f}",
                     f"{r['server_peak_mib']:.0f}",
                     f"{r['client_peak_mib']:.0f} ({r['client_idle_mib']:.0f})",
                     f"{r['tree_peak_mib']:.0f}", f"{r['wire_bytes'] / MIB:,.0f}",
                     "-" if diff is None else f"{diff:.1e}"])
    print(format_table(["mode", "down/up", "job s", "server", "site (max)", "tree",
                        "MiB/round", "max|diff|"], rows))
    for line in failures:
        print(line)
    return 0
