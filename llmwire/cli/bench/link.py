"""``llmwire bench link``: state dicts over an emulated rate-limited, long link.

The link: as root, two network namespaces joined by a veth pair with an
``htb`` rate limit on each end (created here, deleted on exit, failure,
Ctrl-C and SIGTERM), real TCP between their own addresses; for ``--rtt``
above 0 a userspace relay in the receiver's namespace delays every byte by
RTT/2 each way (the kernel has no netem). Without root the relay on
loopback does rate and delay alone (one line on stderr says so). What the
relay models and does not: llmwire/cli/bench/_relay.py.

For each RTT and format, each run in fresh processes:

- **llmwire**: ``send_state_dict`` of a Llama-shaped fp32 state dict of
  ``--params`` parameters in that format, ``receive_state_dict`` in place
  (into a zeroed state dict of the same shapes, as a client holding its
  model receives);
- **raw**: one TCP stream of the same number of bytes (its wire bytes),
  ``sendall`` / ``recv_into`` (no window of its own beyond TCP's);
- **nvflare** (``--peers``, where installed): CellNet's ``tcp`` driver
  moving the fp32 bytes as one BLOB, with the sender and receiver cells of
  ``nvflare.fuel.f3.streaming.tools``.

``seconds`` runs from the sender's first byte to the receiver holding the
last (one clock: namespaces share it), so it includes one one-way delay;
``link_seconds`` is wire bytes / rate, the link's limit. Medians over
``--runs``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import selectors
import statistics
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

from ..synthetic import model_size
from . import _netns
from ._relay import default_buffer
from ._timing import format_table

__all__ = ["add_arguments", "run", "measure", "parse_rate", "parse_rtt"]

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_FORMATS = ("fp32", "fp16", "bf16", "blockwise8", "fp4", "nf4")
_PEERS = ("nvflare",)
TIMEOUT = 900.0


def parse_rate(text: str) -> int:
    """``1gbit``, ``100mbit``, ``500kbit`` or plain bits per second."""
    s = text.strip().lower()
    for unit in sorted(_RATE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            number, scale = s[:-len(unit)], _RATE_UNITS[unit]
            break
    else:
        number, scale = s, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (use e.g. 1gbit, 100mbit)") \
            from None
    if not 1e3 <= value <= 1e12:
        raise argparse.ArgumentTypeError(f"rate {text!r} outside 1kbit..1000gbit")
    return int(value)


def parse_rtt(text: str) -> float:
    """``50ms``, ``0.1s`` or ``0``: a round-trip time in seconds."""
    s = text.strip().lower()
    scale = 1e-3 if s.endswith("ms") else 1.0
    try:
        value = float(s.removesuffix("ms").removesuffix("s")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a round-trip time: {text!r} (use e.g. 50ms)") \
            from None
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"round-trip time {text!r} outside 0..10 s")
    return value


def _rtt_list(text: str) -> list[float]:
    return [parse_rtt(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the bench's options to ``parser``."""
    parser.add_argument("--rate", type=parse_rate, default=parse_rate("1gbit"),
                        help="link rate, e.g. 1gbit, 100mbit (default: 1gbit)")
    parser.add_argument("--rtt", type=_rtt_list, default=[0.0],
                        help="round-trip times to add, comma-separated, e.g. 0ms,50ms,100ms "
                             "(default: 0ms)")
    parser.add_argument("--params", type=model_size, default=model_size("100M"),
                        help="parameters of the fp32 state dict (default: 100M)")
    parser.add_argument("--formats", default="fp32,nf4",
                        help=f"comma-separated, of {','.join(_FORMATS)} (default: %(default)s)")
    parser.add_argument("--peers", default="nvflare",
                        help="other systems on the same link: nvflare, or none "
                             "(default: nvflare, where installed)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default: 3)")
    parser.add_argument("--emulation", choices=("auto", "netns", "relay"), default="auto",
                        help="netns: namespaces + veth + htb (root); relay: the loopback "
                             "relay only; auto: netns where possible (default)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with a "runs" list')


class _Path:
    """Where receivers listen and senders connect, and how to start a
    process on either side: in a namespace link or on loopback."""

    def __init__(self, link: _netns.NamespaceLink | None, rate_bps: int) -> None:
        self.link, self.rate_bps = link, rate_bps

    def start(self, side: int, argv: list[str]) -> subprocess.Popen[str]:
        cmd = [sys.executable, *argv]
        if self.link is not None:
            cmd = self.link.command(side, cmd)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p))
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env)

    def receiver_host(self, rtt: float) -> str:
        if self.link is not None and rtt == 0:
            return self.link.addresses[1]
        return "127.0.0.1"

    def route(self, port: int, rtt: float, procs: list[Any]) -> str:
        """The address a sender connects to for a receiver on ``port``,
        starting a relay (appended to ``procs``) where the path needs one."""
        rate = self.rate_bps / 8
        if self.link is not None and rtt == 0:
            return f"{self.link.addresses[1]}:{port}"
        if self.link is not None:  # htb does the rate; the relay in b the delay
            listen = f"{self.link.addresses[1]}:0"
            extra = ["--buffer", str(default_buffer(rate, rtt / 2))]
        else:
            listen = "127.0.0.1:0"
            extra = ["--rate", str(rate)]
        relay = self.start(1, ["-m", "llmwire.cli.bench._relay", "--listen", listen,
                               "--to", f"127.0.0.1:{port}", "--delay", str(rtt / 2), *extra])
        procs.append(relay)
        line = _readline(relay, 60)
        if not line.startswith("ready "):
            raise RuntimeError(f"relay did not start: {line.strip()!r}")
        host = self.link.addresses[1] if self.link is not None else "127.0.0.1"
        return f"{host}:{int(line.split()[1])}"


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"no answer from {proc.args[-1]!r} within {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a benchmark process ended (exit {proc.wait(5)})")
    return line


def _expect(proc: subprocess.Popen[str], key: str) -> dict[str, Any]:
    msg = json.loads(_readline(proc, TIMEOUT))
    if "error" in msg:
        raise RuntimeError(msg["error"])
    if key not in msg:
        raise RuntimeError(f"expected {key!r}, got {msg}")
    return msg


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()  # the relay's signal to stop
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _one_run(path: _Path, rtt: float, system: str, send: list[str]) -> dict[str, Any]:
    mod = ["-m", "llmwire.cli.bench._linkpeer"]
    procs: list[subprocess.Popen[str]] = []
    try:
        # receivers need the size: raw its byte count, llmwire its model's shapes
        extra = [a for i, a in enumerate(send) if send[i - (i % 2)] in ("--bytes", "--params")]
        receiver = path.start(1, [*mod, f"{system}-recv", "--listen",
                                  f"{path.receiver_host(rtt)}:0", *extra])
        procs.append(receiver)
        port = _expect(receiver, "port")["port"]
        to = path.route(port, rtt, procs)
        sender = path.start(0, [*mod, f"{system}-send", "--to", to, *send])
        procs.append(sender)
        sent = _expect(sender, "start")
        got = _expect(receiver, "end")
    finally:
        _stop(procs)
    return {"seconds": got["end"] - sent["start"], "wire_bytes": sent["wire_bytes"],
            "window": got.get("window")}


def measure(rate_bps: int, rtts: list[float], params: int, formats: list[str],
            peers: list[str], runs: int, emulation: str = "auto",
            note: Any = None) -> dict[str, Any]:
    """Run every system over the link; returns the JSON object ``run`` prints.
    ``note(text)`` is told, once, when namespaces are not used and why."""
    why = None if emulation == "relay" else _netns.unavailable()
    if emulation == "netns" and why:
        raise RuntimeError(why)
    if emulation == "relay":
        why = "relay emulation requested"
    if why and note is not None:
        note(why)
    samples: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        link = None if why else stack.enter_context(_netns.NamespaceLink(rate_bps))
        path = _Path(link, rate_bps)
        for rtt in rtts:
            for _ in range(runs):
                for fmt in formats:
                    wire = _one_run(path, rtt, "llmwire", [
                        "--params", str(params), "--format", "raw" if fmt == "fp32" else fmt])
                    samples.setdefault(("llmwire", fmt, rtt), []).append(wire)
                    raw = _one_run(path, rtt, "raw", ["--bytes", str(wire["wire_bytes"])])
                    samples.setdefault(("raw", fmt, rtt), []).append(raw)
                if "nvflare" in peers:
                    fp32 = samples.get(("llmwire", "fp32", rtt))
                    nbytes = fp32[0]["wire_bytes"] if fp32 else 4 * params
                    peer = _one_run(path, rtt, "nvflare", ["--bytes", str(nbytes)])
                    samples.setdefault(("nvflare", "fp32", rtt), []).append(peer)
    rows = []
    for (system, fmt, rtt), got in samples.items():
        seconds = statistics.median(g["seconds"] for g in got)
        wire_bytes = got[0]["wire_bytes"]
        link_seconds = wire_bytes * 8 / rate_bps
        row: dict[str, Any] = {
            "system": system, "format": fmt, "rate_bps": rate_bps,
            "rtt_ms": round(rtt * 1000, 3), "wire_bytes": wire_bytes,
            "seconds": round(seconds, 4), "link_seconds": round(link_seconds, 4),
            "of_link_rate": round(link_seconds / seconds, 3),
            "seconds_runs": [round(g["seconds"], 4) for g in got]}
        if system == "llmwire":
            row["max_receive_window"] = max(g["window"] for g in got)
        rows.append(row)
    for row in rows:
        raw = [r for r in rows if r["system"] == "raw" and r["format"] == row["format"]
               and r["rtt_ms"] == row["rtt_ms"]]
        if row["system"] != "raw" and raw:
            row["vs_raw"] = round(raw[0]["seconds"] / row["seconds"], 3)
    return {"emulation": "relay" if why else "netns+veth+htb" + ("+relay" if any(rtts) else ""),
            "rate_bps": rate_bps, "params": params, "runs": rows}


def run(args: argparse.Namespace) -> int:
    """Run the bench; print a table, or one JSON object with ``--json``."""
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    bad = [f for f in formats if f not in _FORMATS] or [p for p in peers if p not in _PEERS]
    if bad or not formats or args.runs <= 0 or not args.rtt:
        print(f"llmwire bench link: bad --formats/--peers/--runs/--rtt ({', '.join(bad)}); "
              f"formats: {','.join(_FORMATS)}; peers: nvflare or none", file=sys.stderr)
        return 2
    if "nvflare" in peers and importlib.util.find_spec("nvflare") is None:
        print("llmwire bench link: nvflare is not installed; running without it",
              file=sys.stderr)
        peers.remove("nvflare")
    try:
        r = measure(args.rate, args.rtt, args.params, formats, peers, args.runs,
                    args.emulation, note=lambda why: print(f"llmwire bench link: {why}",
                                                           file=sys.stderr))
    except RuntimeError as exc:
        print(f"llmwire bench link: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"state dict of {r['params'] / 1e6:.0f}M params over a {r['rate_bps'] / 1e9:g} Gbit/s "
          f"link ({r['emulation']}), median of {args.runs} runs")
    rows = [[row["system"], row["format"], f"{row['rtt_ms']:g}", f"{row['wire_bytes'] / 1e6:.1f}",
             f"{row['seconds']:.3f}", f"{row['link_seconds']:.3f}", f"{row['of_link_rate']:.3f}",
             f"{row['vs_raw']:.3f}" if "vs_raw" in row else "-"] for row in r["runs"]]
    print(format_table(["system", "format", "rtt ms", "wire MB", "seconds", "link s",
                        "of link rate", "vs raw"], rows))
    return 0
