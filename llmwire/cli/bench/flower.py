"""``llmwire bench flower``: stock Flower FedAvg against llmwire's ways in.

Each mode runs in a real local Flower deployment.

For every mode the bench starts a SuperLink and N SuperNodes on 127.0.0.1
(a fresh ``FLWR_HOME``, telemetry, update checks and runtime dependency
installation off), runs the same app (llmwire/cli/bench/flower_app) with
``flwr run --stream``, samples the RSS of every process of the deployment
from outside (/proc), and stops everything it started, by PID. Modes:

- ``stock``: Flower's FedAvg, weights as ``ArrayRecord`` (fp32, ``np.save``);
- ``mod``: ``QuantizedFedAvg`` and the unchanged stock ClientApp under
  ``llmwire_mod`` (bf16 down, nf4 updates up, inside Flower's messages);
- ``inmessage``: ``QuantizedFedAvg`` with ``load_global``/``reply_update``
  (decoded in place, the update computed from the received encoding);
- ``oob``: ``OutOfBandFedAvg``/``OutOfBandClient``: the bytes go over
  llmwire beside Flower (nf4 mean update down where a client holds the
  previous global, raw whole weights otherwise; nf4 updates up); Flower's
  messages carry only a reference.

Reported per mode: seconds per round (``strategy.start`` in the ServerApp,
divided by the rounds), peak RSS of the SuperLink, of the largest SuperNode,
of the ServerApp and of the largest ClientApp (and each one's idle RSS),
model bytes moved (Flower's array bytes, or llmwire's streams), and the final
global's max abs difference from stock FedAvg's (when ``stock`` ran).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from ._engine import add_engine_arguments, engine_modes
from ._fl_task import max_abs_diff, model_bytes, read_idle
from ._timing import format_table
from ._tree import TreeSampler, argv_of, stop_tree

__all__ = ["add_arguments", "run", "measure", "MODES", "Deployment"]

MIB = 1 << 20
MODES = ("stock", "mod", "inmessage", "oob")
APP = pathlib.Path(__file__).with_name("flower_app")
#: the formats of each mode: the global (or mean update) down, the updates up
FORMATS = {"stock": ("fp32", "fp32"), "mod": ("bf16", "nf4"), "inmessage": ("bf16", "nf4"),
           "oob": ("nf4", "nf4")}
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    add_engine_arguments(parser, MODES, "SuperNodes")
    parser.add_argument("--port", type=int, default=0,
                        help="the SuperLink's first port (default: a free one)")


# ------------------------------------------------------------------ processes

_ROLES = {"flwr-serverapp": "serverapp", "flwr-clientapp": "clientapp"}


def _flower_role(pid: int) -> str:
    """A process below a SuperLink or SuperNode: its app's role, or ``other``."""
    for arg in argv_of(pid)[:2]:
        name = os.path.basename(arg)
        if name.startswith(("flwr-", "flower-")):
            return _ROLES.get(name, "other")
    return "other"


class Deployment:
    """A SuperLink and N SuperNodes on 127.0.0.1, in ``workdir``; stopped (by
    PID, their whole process groups) on exit, also on failure and Ctrl-C."""

    def __init__(self, workdir: pathlib.Path, clients: int, port: int = 0) -> None:
        self.workdir, self.clients = workdir, clients
        self.port = port or _free_port(clients + 1)
        self.env = {**os.environ, **ENV, "FLWR_HOME": str(workdir / "home")}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "wb")
        try:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True, cwd=self.workdir)
        finally:
            out.close()
        self.processes.append(process)
        return process

    def __enter__(self) -> "Deployment":
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            self.superlink = self._spawn(
                [_tool("flower-superlink"), "--insecure", "--disable-runtime-dependency-"
                 "installation", "--host", "127.0.0.1", "--port", str(self.port)],
                "superlink.log")
            self._wait_port(self.port, self.superlink, "superlink.log")
            for i in range(self.clients):
                self.supernodes.append(self._spawn(
                    [_tool("flower-supernode"), "--insecure", "--superlink",
                     f"127.0.0.1:{self.port}", "--port", str(self.port + 1 + i),
                     "--node-config",
                     f"partition-id={i} num-partitions={self.clients}"], f"supernode{i}.log"))
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_port(self, port: int, process: subprocess.Popen[bytes], log: str,
                   timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{log.split('.')[0]} exited ({process.returncode}): "
                                   f"{self._tail(log)}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s: "
                           f"{self._tail(log)}")

    def _wait_registered(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, node in enumerate(self.supernodes):
                if node.poll() is not None:
                    raise RuntimeError(f"supernode {i} exited ({node.returncode}): "
                                       f"{self._tail(f'supernode{i}.log')}")
            text = (self.workdir / "superlink.log").read_text(errors="replace")
            if text.count("Activated node_id") >= self.clients:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.clients} SuperNodes did not register in {timeout:g} s")

    def _tail(self, log: str, lines: int = 5) -> str:
        try:
            text = (self.workdir / log).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def run(self, app: pathlib.Path, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        """``flwr run APP --stream`` with ``config``; the run's final status."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        log = self.workdir / "flwr_run.log"
        with open(log, "wb") as out:
            flwr = subprocess.Popen([_tool("flwr"), "run", str(app), "bench", "--stream",
                                     "--run-config", pairs], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True, cwd=self.workdir)
            self.processes.append(flwr)
            try:
                flwr.wait(timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"flwr run took over {timeout:g} s") from None
        text = log.read_text(errors="replace")
        run_id = None
        for line in text.splitlines():
            if "Successfully started run" in line:
                run_id = line.rsplit(" ", 1)[-1].strip()
        if run_id is None:
            raise RuntimeError(f"flwr run started no run: {self._tail('flwr_run.log')}")
        return {"run_id": run_id, "status": self._status(run_id), "log": text}

    def _status(self, run_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            done = subprocess.run([_tool("flwr"), "ls", "bench", "--run-id", run_id,
                                   "--format", "json"], capture_output=True, env=self.env,
                                  cwd=self.workdir, timeout=60)
            try:
                row = json.loads(done.stdout)["runs"][0]
                status = f"{row['status']}:{row.get('status-details', '')}".rstrip(":")
            except (ValueError, KeyError, IndexError):
                pass
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status

    def stop(self) -> None:
        """SIGTERM every process started and every process below them (the
        SuperExecs run in sessions of their own), then SIGKILL what is left."""
        stop_tree(self.processes, grace=10.0)
        self.processes.clear()


def _tool(name: str) -> str:
    found = shutil.which(name) or str(pathlib.Path(sys.executable).with_name(name))
    return found


def _free_port(span: int) -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span < 65535 and all(_port_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free run of ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ the bench


def _one_mode(mode: str, params: int, clients: int, rounds: int, port: int, timeout: float,
              workdir: pathlib.Path, client_idle: int) -> dict[str, Any]:
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    down, up = FORMATS[mode]
    config = {"mode": mode, "params": params, "clients": clients, "rounds": rounds,
              "down": down, "up": up, "round-timeout": timeout, "out-dir": str(out),
              "cache-dir": str(workdir / f"cache-{mode}")}
    app = workdir / "app"
    if not app.exists():
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    with Deployment(workdir / mode, clients, port) as deployment:
        assert deployment.superlink is not None
        roots = {deployment.superlink.pid: "superlink",
                 **{p.pid: "supernode" for p in deployment.supernodes}}
        with TreeSampler(roots, _flower_role) as sampler:
            time.sleep(0.5)  # idle samples of the SuperLink and SuperNodes
            outcome = deployment.run(app, config, timeout)
    if not outcome["status"].startswith("finished:completed"):
        raise RuntimeError(f"{mode}: the Flower run ended {outcome['status']}: "
                           f"{_last_error(outcome['log'])}")
    report = json.loads((out / f"{mode}.json").read_text())
    lost = _lost_updates(report["history"])
    if lost:  # Flower "completes" a run in which every client failed
        raise RuntimeError(f"{mode}: {lost}")
    idle = read_idle(str(out), remove=True)
    row: dict[str, Any] = {"mode": mode, "down": down, "up": up, "params": params,
                           "clients": clients, "rounds": rounds,
                           "seconds": report["seconds"],
                           "round_seconds": report["seconds"] / rounds,
                           "wire_bytes": report["wire_bytes"]}
    for role in ("superlink", "supernode", "serverapp", "clientapp"):
        peak, base = sampler.peak(role, idle)
        if role == "clientapp":
            base = client_idle
        row[f"{role}_peak_mib"] = peak / MIB
        row[f"{role}_idle_mib"] = base / MIB
    row["history"] = report["history"]
    row["final"] = str(out / f"{mode}.pt")
    return row


_IDLE_PROBE = """
import os, torch, flwr.clientapp, flwr.supernode.cli, llmwire.integrations.flower
with open('/proc/self/statm', 'rb') as f:
    print(int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))
"""


def _lost_updates(history: list[dict[str, Any]]) -> str:
    """What went wrong in the run's training rounds, or ``""`` if every
    client's update counted (a figure from fewer clients compares nothing)."""
    for row in history:
        if row.get("purpose", "train") != "train":
            continue
        for key in ("flower_failures", "rejected", "failed"):
            if row.get(key):
                node, reason = row[key][0]
                return (f"round {row['round']}: {len(row[key])} update(s) lost "
                        f"({key.replace('_', ' ')}), node {node}: {reason}")
        if row.get("no_reply"):
            return f"round {row['round']}: no reply from nodes {row['no_reply']}"
    return ""


def app_idle_bytes() -> int:
    """RSS of a process that imported what a ClientApp imports (Python,
    torch, Flower, llmwire) and holds nothing: a ClientApp's idle RSS (its
    own first sample comes after Flower read the message into it)."""
    done = subprocess.run([sys.executable, "-c", _IDLE_PROBE], capture_output=True,
                          timeout=120, env={**os.environ, **ENV})
    return int(done.stdout.split()[-1])


def _last_error(log: str) -> str:
    lines = [l for l in log.splitlines() if "Error" in l or "error" in l]
    return lines[-1].strip() if lines else log.strip().splitlines()[-1] if log.strip() else ""


def measure(modes: list[str], params: int, clients: int, rounds: int, port: int = 0,
            timeout: float = 1800.0, progress: Any = None) -> dict[str, Any]:
    """Run every mode in its own deployment; the bench's JSON object."""
    client_idle = app_idle_bytes()
    with tempfile.TemporaryDirectory(prefix="llmwire-bench-flower-") as tmp:
        rows = []
        for mode in modes:
            if progress:
                progress(f"{mode}: starting a SuperLink and {clients} SuperNodes ...")
            rows.append(_one_mode(mode, params, clients, rounds, port, timeout,
                                  pathlib.Path(tmp), client_idle))
        stock = next((r for r in rows if r["mode"] == "stock"), None)
        model_mib = model_bytes(params) / MIB
        import torch

        want = torch.load(stock["final"]) if stock is not None else None  # read once
        for row in rows:
            row["max_abs_diff_vs_stock"] = (max_abs_diff(torch.load(row["final"]), want)
                                            if want is not None else None)
            row["serverapp_over_idle_x_model"] = \
                (row["serverapp_peak_mib"] - row["serverapp_idle_mib"]) / model_mib
            row["clientapp_over_idle_x_model"] = \
                (row["clientapp_peak_mib"] - row["clientapp_idle_mib"]) / model_mib
            if stock is not None:
                row["round_time_vs_stock"] = row["round_seconds"] / stock["round_seconds"]
        for row in rows:
            del row["final"]
    import flwr

    return {"flwr": flwr.__version__, "params": params, "model_mib": model_mib,
            "clients": clients, "rounds": rounds, "modes": rows}


def run(args: argparse.Namespace) -> int:
    modes = engine_modes("flower", "Flower", "flwr", args, MODES)
    if modes is None:
        return 2
    say = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = measure(modes, args.params, args.clients, args.rounds, args.port, args.timeout,
                     say)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"flwr {result['flwr']}, {args.params:,} parameters ({result['model_mib']:.0f} MiB "
          f"fp32), {args.clients} clients, {args.rounds} rounds; peak RSS in MiB (idle; "
          "a ClientApp's: a process that imported torch, Flower and llmwire)")
    rows = []
    for r in result["modes"]:
        diff = r["max_abs_diff_vs_stock"]
        rows.append([r["mode"], f"{r['down']}/{r['up']}", f"{r['round_seconds']:.1f}",
                     f"{r['superlink_peak_mib']:.0f} ({r['superlink_idle_mib']:.0f})",
                     f"{r['supernode_peak_mib']:.0f} ({r['supernode_idle_mib']:.0f})",
                     f"{r['serverapp_peak_mib']:.0f} ({r['serverapp_idle_mib']:.0f})",
                     f"{r['clientapp_peak_mib']:.0f} ({r['clientapp_idle_mib']:.0f})",
                     f"{r['wire_bytes'] / MIB:,.0f}", "-" if diff is None else f"{diff:.1e}"])
    print(format_table(["mode", "down/up", "round s", "SuperLink", "SuperNode", "ServerApp",
                        "ClientApp", "model MiB moved", "max |diff| vs stock"], rows))
    return 0
