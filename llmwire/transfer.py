"""``llmwire send`` and ``llmwire recv``: the command line's transfer commands.

A thin layer over the public API. One connection per ``send``; the paths go
in order. A ``.safetensors`` file or a torch checkpoint (``.pt``, ``.pth``,
``.bin`` holding a state dict) travels as a state dict, read lazily through
:func:`llmwire.checkpoints.open_checkpoint`; anything else travels as a
file, which resumes where a killed transfer stopped. Every transfer ends with
the receiver's verdict (the payload protocols carry it), so ``send`` exits 0
only for what landed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

import xxhash

from .checkpoints import Checkpoint, checkpoint_kind, open_checkpoint
from .errors import (
    AuthenticationError, ConnectionClosed, FileTransferError, FileWriteError, IntegrityError,
    LlmwireError, PayloadRefused, PeerError, SourceChanged, TransferInterrupted,
)
from .frames import ErrorCode

__all__ = ["SECRET_ENV", "CliError", "Terminated", "add_send_arguments", "add_recv_arguments",
           "run_send", "run_recv", "read_secret", "parse_address", "format_address",
           "parse_rate", "parse_timeout", "parse_override", "state_dict_kind"]

SECRET_ENV = "LLMWIRE_SECRET"
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
QUANT_FORMATS = ("fp32", "fp16", "bf16", "blockwise8", "fp4", "nf4")
_HASH_BLOCK = 4 << 20

SEND_EPILOG = f"""\
examples:
  export {SECRET_ENV}=...                  (or --secret-file F; never on the command line)
  llmwire send model.safetensors --to 10.0.0.2:7070
  llmwire send model.safetensors --to 10.0.0.2:7070 --quantize nf4
  llmwire send pytorch_model.bin tokenizer.json --to gpu-box:7070 --json
  llmwire send big.tar --to gpu-box:7070      run it again after a failure: it resumes

.safetensors, .pt, .pth and .bin (torch checkpoints holding a state dict) go as
state dicts, quantized with --quantize if given (float64 tensors, which the
formats cannot take, go as they are and are reported); the receiver writes
<name>.safetensors. Anything else goes as a file under its base name.
A source that changes while it is sent ends the send (exit 1), and nothing
of it is kept as complete.
"""

RECV_EPILOG = f"""\
examples:
  export {SECRET_ENV}=...                  (or --secret-file F; never on the command line)
  llmwire recv --listen 0.0.0.0:7070 --out incoming/
  llmwire recv --listen 127.0.0.1:7070 --out incoming/ --once --json

Files land in --out under their sent names (relative names only; "..",
absolute paths and names leaving --out are refused). State dicts land as
<name>.safetensors. Interrupted files keep <name>.part and resume when sent
again. Ctrl-C stops the receiver (exit status 130), SIGTERM too (143).
"""


class CliError(LlmwireError):
    """A command-line failure with its exit status; the message is one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Terminated(Exception):
    """The command got SIGTERM and stopped as it would on Ctrl-C."""


# exit statuses, documented in docs/cli.md
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3  # cannot connect or listen, connection lost
EXIT_AUTH = 4  # wrong secret
EXIT_REFUSED = 5  # the receiver refused a name or a target
EXIT_INTEGRITY = 6  # a digest did not match
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)

#: ERROR codes a peer sends when bytes it received were corrupted
_CORRUPTION_CODES = (ErrorCode.CHECKSUM_ERROR, ErrorCode.INTEGRITY_ERROR)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first."""
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        cause = getattr(current, "cause", None)
        current = current.__cause__ or (cause if isinstance(cause, BaseException) else None)
    return chain


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception that ended a command (docs/cli.md)."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, AuthenticationError):
        return EXIT_AUTH
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if any(isinstance(e, PeerError) and e.code in _CORRUPTION_CODES for e in _causes(exc)):
        return EXIT_INTEGRITY  # the receiver saw corrupted bytes and hung up: not the network
    if isinstance(exc, PayloadRefused):
        return EXIT_REFUSED
    if isinstance(exc, (FileWriteError, SourceChanged)):
        return EXIT_ERROR
    if isinstance(exc, (ConnectionClosed, TransferInterrupted, ConnectionError, TimeoutError)):
        return EXIT_CONNECTION
    return EXIT_ERROR


# ---------------------------------------------------------------- arguments


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`: ``[::1]:7070`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_timeout(text: str) -> float:
    """Seconds, a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"the timeout must be a positive number of "
                                         f"seconds, got {text!r}")
    return value


def parse_override(text: str) -> tuple[str, str]:
    """``PATTERN=FMT`` (a tensor name or glob, and a format) -> (pattern, format)."""
    pattern, sep, fmt = text.rpartition("=")
    if not sep or not pattern or fmt not in QUANT_FORMATS + ("raw",):
        raise argparse.ArgumentTypeError(
            f"expected NAME_OR_GLOB=FMT with FMT one of {', '.join(QUANT_FORMATS)}, raw; "
            f"got {text!r}")
    return pattern, fmt


def parse_rate(text: str) -> float:
    """``20M`` -> 20e6 bytes per second (k, M, G: powers of 1000)."""
    units = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 20M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the rate must be positive, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secret-file", metavar="F",
                        help=f"read the shared secret from file F (default: the {SECRET_ENV} "
                             "environment variable; never on the command line)")
    parser.add_argument("--secret", dest="secret_on_command_line", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true",
                        help="print JSON on stdout instead of text lines")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a TTY)")


def add_send_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files to send, in order")
    parser.add_argument("--to", required=True, type=parse_address, metavar="HOST:PORT",
                        help="the receiver (llmwire recv --listen)")
    parser.add_argument("--quantize", choices=QUANT_FORMATS, metavar="FMT",
                        help="quantize state dicts: " + ", ".join(QUANT_FORMATS)
                             + " (default: send tensors as they are)")
    parser.add_argument("--override", type=parse_override, action="append", default=[],
                        metavar="NAME=FMT",
                        help="format for the tensors a name or glob matches, first match "
                             "wins, e.g. --override 'lm_head.*=bf16' --override "
                             "'*.norm.weight=raw' (repeatable)")
    parser.add_argument("--nonfinite", choices=("saturate", "raise"), default="saturate",
                        help="NaN/inf under blockwise8, fp4, nf4: saturate (NaN -> 0, "
                             "inf -> +-absmax, counted and reported; the default) or raise "
                             "(refuse the state dict, exit 1)")
    parser.add_argument("--as-file", action="store_true",
                        help="send state-dict files byte for byte, as plain files")
    parser.add_argument("--limit-rate", type=parse_rate, metavar="RATE",
                        help="put at most RATE bytes per second on the wire, e.g. 50M")
    parser.add_argument("--timeout", type=parse_timeout, default=30.0, metavar="S",
                        help="seconds to wait for the connection and handshake (default: 30)")
    _add_common(parser)


def add_recv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, type=parse_address, metavar="HOST:PORT",
                        help="address to listen on (port 0: a free port, printed at start)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory the transfers land in (created if missing)")
    parser.add_argument("--once", action="store_true",
                        help="exit after the first connection that landed a transfer")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files (default: refuse them)")
    _add_common(parser)


def read_secret(secret_file: str | None, on_command_line: str | None = None) -> bytes:
    """The secret from ``--secret-file`` or ``$LLMWIRE_SECRET`` (trailing newline dropped)."""
    if on_command_line is not None:
        raise CliError(f"the secret is never taken on the command line (ps shows it): set "
                       f"{SECRET_ENV} or pass --secret-file F", EXIT_USAGE)
    if secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                secret = f.read().rstrip(b"\r\n")
        except OSError as exc:
            raise CliError(f"cannot read the secret file {secret_file!r}: "
                           f"{exc.strerror or exc}", EXIT_ERROR) from None
        where = f"the secret file {secret_file!r}"
    else:
        env = os.environ.get(SECRET_ENV)
        if env is None:
            raise CliError(f"no secret: set {SECRET_ENV} or pass --secret-file F", EXIT_USAGE)
        secret = env.encode("utf-8")
        where = SECRET_ENV
    if not secret:
        raise CliError(f"the secret in {where} is empty", EXIT_USAGE)
    return secret


# ---------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar on stderr (bytes, rate, ETA), or nothing; optional rate limit."""

    def __init__(self, label: str, enabled: bool, limit_rate: float | None = None) -> None:
        self._bar: Any = None
        self._label = label
        self._enabled = enabled
        self._limit = limit_rate
        self._started = time.monotonic()
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if self._enabled and self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:  # no tqdm: no bar
                self._enabled = False
            else:
                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=self._label, file=sys.stderr, leave=False,
                                 initial=done if self._last == 0 else 0)
                self._last = done
        if self._bar is not None:
            self._bar.update(done - self._last)
        self._last = done
        if self._limit is not None:
            # Blocking on purpose: the sender has nothing else to do meanwhile.
            ahead = done / self._limit - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _bars_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ---------------------------------------------------------------- state dicts on disk


#: ``"safetensors"``, ``"torch"`` or None (send as a plain file); see
#: :func:`llmwire.checkpoints.checkpoint_kind`
state_dict_kind = checkpoint_kind


def file_digest(path: str) -> str:
    """xxh3-128 of a file, hex (the digest file transfers use)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


# ---------------------------------------------------------------- send


def _connect_error(exc: BaseException, host: str, port: int) -> CliError:
    where = format_address(host, port)
    if isinstance(exc, AuthenticationError):
        return CliError(f"{where} refused the handshake: wrong secret", EXIT_AUTH)
    if isinstance(exc, TimeoutError):
        return CliError(f"cannot connect to {where}: timed out", EXIT_CONNECTION)
    if isinstance(exc, OSError):
        reason = {errno.ECONNREFUSED: "connection refused (is llmwire recv running?)",
                  errno.EHOSTUNREACH: "host unreachable",
                  errno.ENETUNREACH: "network unreachable"}.get(
            exc.errno or 0, exc.strerror or str(exc))
        if exc.__class__.__name__ == "gaierror":
            reason = f"unknown host ({exc.strerror or exc})"
        return CliError(f"cannot connect to {where}: {reason}", EXIT_CONNECTION)
    if isinstance(exc, ConnectionClosed):
        return CliError(f"cannot connect to {where}: {exc} (a wrong secret looks like this "
                        f"too)", EXIT_CONNECTION)
    return CliError(f"cannot connect to {where}: {exc}", exit_code_for(exc))


@dataclass
class _Item:
    path: str
    kind: str  # "state_dict" or "file"
    checkpoint: Checkpoint | None = None  # opened (its layout checked) before connecting


def _plan(paths: list[str], args: argparse.Namespace) -> list[_Item]:
    """Every path checked before connecting: it exists, a checkpoint's layout
    is valid, and the formats asked for fit its tensors."""
    from .payloads.statedict import plan_state_dict

    items = []
    try:
        for path in paths:
            if not os.path.exists(path):
                raise CliError(f"{path}: no such file", EXIT_ERROR)
            if not os.path.isfile(path):
                raise CliError(f"{path}: not a regular file", EXIT_ERROR)
            if not os.access(path, os.R_OK):
                raise CliError(f"{path}: permission denied", EXIT_ERROR)
            kind = None if args.as_file else checkpoint_kind(path)
            if kind is None:
                items.append(_Item(path, "file"))
                continue
            # a malformed checkpoint, or a format its tensors cannot take, is refused
            # here, before connecting (planning reads no data)
            items.append(_Item(path, "state_dict", open_checkpoint(path, kind)))
            try:
                plan_state_dict(items[-1].checkpoint, _wire_format(args.quantize),
                                overrides=dict(args.override))
            except LlmwireError as exc:
                raise CliError(f"{path}: {exc}", exit_code_for(exc)) from None
    except BaseException:
        _close_all(items)
        raise
    return items


def _wire_format(quantize: str | None) -> str:
    return "raw" if quantize in (None, "fp32") else quantize


def _close_all(items: list[_Item]) -> None:
    for item in items:
        if item.checkpoint is not None:
            item.checkpoint.close()


def _landing_name(path: str) -> str:
    base = os.path.basename(path)
    stem = base[:-len(".safetensors")] if base.lower().endswith(".safetensors") \
        else os.path.splitext(base)[0]
    return (stem or "state_dict") + ".safetensors"


async def _send_one_state_dict(transport: Any, item: _Item, args: argparse.Namespace,
                               progress: _Progress) -> dict[str, Any]:
    from .payloads.statedict import send_state_dict

    assert item.checkpoint is not None
    name = _landing_name(item.path)
    fmt = args.quantize
    try:
        result = await send_state_dict(transport, item.checkpoint, _wire_format(fmt),
                                       overrides=dict(args.override), nonfinite=args.nonfinite,
                                       header={"name": name}, progress=progress)
    except (ConnectionClosed, TransferInterrupted):
        raise
    except LlmwireError as exc:  # the receiver's verdict, or our own refusal: name the file
        raise CliError(f"{item.path}: {exc}", exit_code_for(exc)) from None
    receipt = result.receipt
    return {"path": item.path, "kind": "state_dict", "name": name, "bytes": result.tensor_bytes,
            "file_bytes": os.path.getsize(item.path), "wire_bytes": result.wire_bytes,
            "seconds": round(result.seconds, 6), "format": fmt or "fp32",
            "entries": result.entries, "digest": receipt.get("digest"),
            "remote_path": receipt.get("path"), "formats": result.formats,
            "nonfinite": result.nonfinite, "kept_raw": list(result.kept_raw)}


async def _send_one_file(transport: Any, item: _Item, progress: _Progress) -> dict[str, Any]:
    from .payloads.files import send_file

    result = await send_file(transport, item.path, progress=progress)
    return {"path": item.path, "kind": "file", "name": result.name, "bytes": result.size,
            "wire_bytes": result.bytes_transferred, "seconds": round(result.seconds, 6),
            "format": "file", "resumed_from": result.resumed_from, "digest": result.digest}


def _quiet_expected_errors() -> None:
    """Errors the command reports itself (a handshake that timed out, a lost
    connection) must not also print "Task exception was never retrieved"."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), (LlmwireError, OSError)):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def _send_all(args: argparse.Namespace, secret: bytes, items: list[_Item],
                    report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    from .transport import connect

    _quiet_expected_errors()

    host, port = args.to
    try:
        transport = await connect(host, port, secret=secret, timeout=args.timeout)
    except (LlmwireError, OSError) as exc:
        raise _connect_error(exc, host, port) from None
    done = []
    try:
        for item in items:
            progress = _Progress(os.path.basename(item.path), _bars_enabled(args),
                                 args.limit_rate)
            try:
                if item.kind == "state_dict":
                    row = await _send_one_state_dict(transport, item, args, progress)
                else:
                    row = await _send_one_file(transport, item, progress)
            finally:
                progress.close()
            done.append(row)
            report(row)
    finally:
        await transport.close()
    return done


def _text_line(row: dict[str, Any], verb: str) -> str:
    size = row["bytes"]
    parts = [f"{size / 2**20:.1f} MiB"]
    if row["kind"] == "state_dict":
        parts.append(f"state dict as {row['format']}, {row['wire_bytes'] / 2**20:.1f} MiB on "
                     f"the wire ({row['wire_bytes'] / max(size, 1) * 100:.1f}%)")
        if row.get("kept_raw"):
            parts.append(f"{len(row['kept_raw'])} float64 tensor(s) sent as they are "
                         f"(the format takes float32/float16/bfloat16)")
        if row.get("nonfinite"):
            parts.append(f"WARNING: {row['nonfinite']} NaN/inf value(s) replaced "
                         "(NaN -> 0, inf -> +-absmax; --nonfinite raise refuses instead)")
    elif row.get("resumed_from"):
        parts.append(f"resumed from byte {row['resumed_from']}")
    secs = row.get("seconds") or 0.0
    parts.append(f"{secs:.2f}s" + (f", {size / secs / 1e9:.2f} GB/s" if secs > 0 else ""))
    return f"{verb} {row['path']}: " + ", ".join(parts)


def _run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine (uvloop where installed); SIGTERM stops it as
    Ctrl-C does (transfers in progress keep a durable checkpoint) and raises
    :class:`Terminated`."""
    from .transport import run

    async def guarded() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        terminated = []

        def on_sigterm() -> None:
            terminated.append(True)
            task.cancel()

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
            return await main
        try:
            return await main
        except asyncio.CancelledError:
            if terminated:
                raise Terminated() from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return run(guarded())


def run_send(args: argparse.Namespace) -> int:
    """``llmwire send``."""
    secret = read_secret(args.secret_file, args.secret_on_command_line)
    items = _plan(args.paths, args)

    def report(row: dict[str, Any]) -> None:
        if not args.json:
            print(_text_line(row, "sent"), flush=True)

    try:
        rows = _run(_send_all(args, secret, items, report))
    finally:
        _close_all(items)
    if args.json:
        total = {"bytes": sum(r["bytes"] for r in rows),
                 "wire_bytes": sum(r["wire_bytes"] for r in rows),
                 "seconds": round(sum(r["seconds"] for r in rows), 6)}
        print(json.dumps(rows[0] if len(rows) == 1 else {"transfers": rows, **total}))
    return 0


# ---------------------------------------------------------------- recv


def _state_dict_name(header: Any) -> str:
    """Where a state dict lands under --out (a checked relative name)."""
    from .payloads.files import check_file_name

    name = header.get("name") if isinstance(header, dict) else None
    if name is None:
        name = "state_dict.safetensors"
    check_file_name(name)
    if not name.endswith(".safetensors"):
        name += ".safetensors"
        check_file_name(name)
    return name


class _Receiver:
    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.root = root
        self.landed: list[dict[str, Any]] = []
        self.finished = asyncio.Event()

    def _report(self, row: dict[str, Any]) -> None:
        self.landed.append(row)
        if self.args.json:
            if not self.args.once:
                print(json.dumps(row), flush=True)
        else:
            print(f"received {row['name']} -> {row['path']} ({row['bytes'] / 2**20:.1f} MiB, "
                  f"{row['kind']}) in {row['seconds']:.2f}s, digest {row['digest']}", flush=True)

    def _warn(self, peer: str, message: str) -> None:
        print(f"llmwire recv: {peer}: {message}", file=sys.stderr, flush=True)

    async def handle(self, transport: Any) -> None:
        peer = str(getattr(transport, "peer_name", "peer"))
        landed_here = 0
        try:
            while True:
                try:
                    stream = await transport.accept_stream()
                except ConnectionClosed:
                    break
                kind = stream.header.get("kind") if isinstance(stream.header, dict) else None
                if kind == "state_dict":
                    ok = await self._state_dict(stream, peer)
                elif kind == "file-offer":
                    ok = await self._file(transport, stream, peer)
                elif kind == "file-done":  # leftover of a transfer we aborted
                    await stream.read_all(64 * 1024)
                    continue
                else:
                    from .payloads.verdict import refuse_stream
                    await refuse_stream(stream, PayloadRefused(
                        f"llmwire recv does not take {kind!r} streams"))
                    self._warn(peer, f"refused a stream of kind {kind!r}")
                    continue
                if ok is None:  # the connection is unusable
                    break
                landed_here += ok
        finally:
            if self.args.once and landed_here:
                self.finished.set()

    async def _state_dict(self, stream: Any, peer: str) -> int | None:
        from .payloads.sinks import SafetensorsSink
        from .payloads.statedict import receive_state_dict, refuse_state_dict

        started = time.perf_counter()
        name = stream.header.get("name")
        progress = _Progress(str(name), _bars_enabled(self.args))
        try:
            try:
                name = _state_dict_name(stream.header)
            except LlmwireError as exc:
                await refuse_state_dict(stream, exc)
                raise
            sink = SafetensorsSink(os.path.join(self.root, *name.split("/")),
                                   overwrite=self.args.overwrite, root=self.root)
            await receive_state_dict(stream, sink, progress=progress)
        except (LlmwireError, OSError) as exc:
            self._warn(peer, f"state dict {name!r} failed: {exc}")
            if isinstance(exc, (ConnectionClosed, TransferInterrupted)):
                return None
            return 0
        finally:
            progress.close()
        receipt = sink.receipt()
        self._report({"kind": "state_dict", "name": name, "path": receipt["path"],
                      "bytes": receipt["bytes"], "digest": receipt["digest"],
                      "seconds": round(time.perf_counter() - started, 6)})
        return 1

    async def _file(self, transport: Any, stream: Any, peer: str) -> int | None:
        from .payloads.files import receive_file

        name = stream.header.get("name")
        progress = _Progress(str(name), _bars_enabled(self.args))
        try:
            result = await receive_file(transport, self.root, overwrite=self.args.overwrite,
                                        stream=stream, progress=progress)
        except TransferInterrupted as exc:
            self._warn(peer, f"file {name!r} interrupted at byte {exc.offset}; "
                             f"{name}.part kept: send it again to resume")
            return None
        except (FileTransferError, OSError) as exc:
            self._warn(peer, f"file {name!r} failed: {exc}")
            return 0
        except ConnectionClosed as exc:
            self._warn(peer, f"file {name!r}: {exc}")
            return None
        finally:
            progress.close()
        self._report({"kind": "file", "name": result.name, "path": result.path,
                      "bytes": result.size, "digest": result.digest,
                      "resumed_from": result.resumed_from,
                      "seconds": round(result.seconds, 6)})
        return 1


class _StderrLines(logging.Handler):
    """The server's lines about rejected connections (already rate-limited
    there: a few per interval, then one summary) as recv's stderr lines."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "more rejected connections" in message:
            print(f"llmwire recv: {message.removeprefix('llmwire: ')}", file=sys.stderr,
                  flush=True)
        elif "handshake" in message and "failed" in message:
            print(f"llmwire recv: rejected a connection: {message}", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace, secret: bytes, root: str) -> list[dict[str, Any]]:
    from .transport import serve

    _quiet_expected_errors()
    host, port = args.listen
    receiver = _Receiver(args, root)
    try:
        server = await serve(receiver.handle, host, port, secret=secret)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE \
            else (exc.strerror or str(exc))
        raise CliError(f"cannot listen on {format_address(host, port)}: {reason}",
                       EXIT_CONNECTION) from None
    try:
        bound = server.sockets[0].getsockname()
        print(f"llmwire recv: listening on {format_address(bound[0], bound[1])}, "
              f"writing to {root}", file=sys.stderr, flush=True)
        if args.once:
            await receiver.finished.wait()
        else:
            await server.serve_forever()
    finally:
        await server.close()
    return receiver.landed


def run_recv(args: argparse.Namespace) -> int:
    """``llmwire recv``."""
    secret = read_secret(args.secret_file, args.secret_on_command_line)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create the output directory {args.out!r}: "
                       f"{exc.strerror or exc}", EXIT_ERROR) from None
    if not os.access(args.out, os.W_OK):
        raise CliError(f"the output directory {args.out!r} is not writable", EXIT_ERROR)
    root = os.path.realpath(args.out)
    log = logging.getLogger("llmwire.transport")
    handler = _StderrLines(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        landed = _run(_serve(args, secret, root))
    finally:
        log.removeHandler(handler)
    if args.json and args.once:
        print(json.dumps(landed[0] if len(landed) == 1 else {"transfers": landed}))
    return 0
