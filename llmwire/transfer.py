"""``llmwire send`` and ``llmwire recv``: the command line's transfer commands.

A thin layer over the public API. One connection per ``send``; the paths go
in order. A ``.safetensors`` file or a torch checkpoint (``.pt``, ``.pth``,
``.bin`` holding a state dict) travels as a state dict, read lazily (safetensors
through a copy-on-write map of its data region, torch checkpoints with
``torch.load(mmap=True)``); anything else travels as a file, which resumes
where a killed transfer stopped. After each state dict the receiver answers
one ``cli-landed`` or ``cli-failed`` message so the sender knows it landed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from .errors import (
    AuthenticationError, ConnectionClosed, FileTransferError, IntegrityError, LlmwireError,
    PayloadError, StreamCancelled, TransferInterrupted, TransferRefused,
)

__all__ = ["SECRET_ENV", "CliError", "add_send_arguments", "add_recv_arguments", "run_send",
           "run_recv", "read_secret", "parse_address", "parse_rate", "state_dict_kind"]

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
state dicts, quantized with --quantize if given; the receiver writes
<name>.safetensors. Anything else goes as a file under its base name.
"""

RECV_EPILOG = f"""\
examples:
  export {SECRET_ENV}=...                  (or --secret-file F; never on the command line)
  llmwire recv --listen 0.0.0.0:7070 --out incoming/
  llmwire recv --listen 127.0.0.1:7070 --out incoming/ --once --json

Files land in --out under their sent names (relative names only; "..",
absolute paths and names leaving --out are refused). State dicts land as
<name>.safetensors. Interrupted files keep <name>.part and resume when sent
again. Ctrl-C stops the receiver (exit status 130).
"""


class CliError(LlmwireError):
    """A command-line failure with its exit status; the message is one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# exit statuses, documented in docs/cli.md
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3  # cannot connect or listen, connection lost
EXIT_AUTH = 4  # wrong secret
EXIT_REFUSED = 5  # the receiver refused a name or a target
EXIT_INTEGRITY = 6  # a digest did not match


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception that ended a command."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, AuthenticationError):
        return EXIT_AUTH
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, TransferRefused):
        return EXIT_REFUSED
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
    parser.add_argument("--as-file", action="store_true",
                        help="send state-dict files byte for byte, as plain files")
    parser.add_argument("--limit-rate", type=parse_rate, metavar="RATE",
                        help="put at most RATE bytes per second on the wire, e.g. 50M")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
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


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}


def state_dict_kind(path: str) -> str | None:
    """``"safetensors"``, ``"torch"`` or None (send as a plain file)."""
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith((".pt", ".pth")):
        return "torch"
    if lower.endswith(".bin"):
        # A .bin is a torch checkpoint only if it looks like one: a zip archive
        # (torch.save's format) or a legacy pickle; otherwise it is a file.
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            return "torch"  # let the loader report why it is unreadable
        if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
            return "torch"
    return None


def load_safetensors_lazily(path: str) -> dict[str, Any]:
    """Torch tensors viewing a copy-on-write map of the file: pages are read
    as the sender reaches them and never copied into private memory."""
    import numpy as np
    import torch

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PayloadError(f"{path!r} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if header_len > min(size - 8, 100 << 20):
            raise PayloadError(f"{path!r} is not a safetensors file (header length "
                               f"{header_len} out of range)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise PayloadError(f"{path!r} is not a safetensors file (bad JSON header)") from None
    if not isinstance(header, dict):
        raise PayloadError(f"{path!r} is not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    start = 8 + header_len
    data = (np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(size - start,))
            if size > start else np.zeros(0, np.uint8))
    out: dict[str, Any] = {}
    for name, info in header.items():
        try:
            dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise PayloadError(f"{path!r}: unsupported or malformed entry {name!r}") from None
        if not 0 <= begin <= end <= data.shape[0]:
            raise PayloadError(f"{path!r}: entry {name!r} lies outside the file")
        raw = torch.from_numpy(data[begin:end])
        out[name] = raw.view(dtype).reshape(shape)
    return out


def load_torch_checkpoint(path: str) -> dict[str, Any]:
    """A state dict from a torch checkpoint, memory-mapped where torch can."""
    try:
        import torch
    except ImportError:
        raise CliError(f"{path!r} is a torch checkpoint and torch is not installed",
                       EXIT_ERROR) from None
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except OSError:
        raise
    except Exception:
        try:  # legacy (non-zip) checkpoints cannot be mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:
            raise PayloadError(f"{path!r} is not a loadable torch checkpoint: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                               ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise PayloadError(f"{path!r} does not hold a state dict (a mapping of names to tensors)")
    return obj


def file_digest(path: str) -> str:
    """xxh3-128 of a file, hex (the digest file transfers use)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


# ---------------------------------------------------------------- send


def _connect_error(exc: BaseException, host: str, port: int) -> CliError:
    where = f"{host}:{port}"
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
    loader: str | None = None  # "safetensors" or "torch"


def _plan(paths: list[str], as_file: bool) -> list[_Item]:
    items = []
    for path in paths:
        if not os.path.exists(path):
            raise CliError(f"{path}: no such file", EXIT_ERROR)
        if not os.path.isfile(path):
            raise CliError(f"{path}: not a regular file", EXIT_ERROR)
        if not os.access(path, os.R_OK):
            raise CliError(f"{path}: permission denied", EXIT_ERROR)
        loader = None if as_file else state_dict_kind(path)
        if loader == "safetensors":
            load_safetensors_lazily(path)  # refuse a bad file before connecting (cheap: a map)
        items.append(_Item(path, "state_dict" if loader else "file", loader))
    return items


def _state_dict_name(path: str) -> str:
    base = os.path.basename(path)
    stem = base[:-len(".safetensors")] if base.lower().endswith(".safetensors") \
        else os.path.splitext(base)[0]
    return (stem or "state_dict") + ".safetensors"


async def _send_one_state_dict(transport: Any, item: _Item, fmt: str | None,
                               progress: _Progress) -> dict[str, Any]:
    from .payloads.statedict import send_state_dict

    state = (load_safetensors_lazily(item.path) if item.loader == "safetensors"
             else load_torch_checkpoint(item.path))
    name = _state_dict_name(item.path)
    wire_fmt = "raw" if fmt in (None, "fp32") else fmt
    try:
        result = await send_state_dict(transport, state, wire_fmt, header={"name": name},
                                       progress=progress)
    except StreamCancelled as exc:
        raise CliError(f"{item.path}: the receiver refused it: {exc.reason or exc}",
                       EXIT_REFUSED) from None
    reply = await transport.receive_message(64 * 1024)
    header = reply.header if isinstance(reply.header, dict) else {}
    if header.get("kind") != "cli-landed":
        reason = header.get("reason", f"unexpected reply {header.get('kind')!r}")
        raise CliError(f"{item.path}: the receiver did not keep it: {reason}",
                       int(header.get("code", EXIT_ERROR)))
    return {"path": item.path, "kind": "state_dict", "name": name, "bytes": result.tensor_bytes,
            "file_bytes": os.path.getsize(item.path), "wire_bytes": result.wire_bytes,
            "seconds": round(result.seconds, 6), "format": fmt or "fp32",
            "entries": result.entries, "digest": header.get("digest"),
            "remote_path": header.get("path")}


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
                    row = await _send_one_state_dict(transport, item, args.quantize, progress)
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
    elif row.get("resumed_from"):
        parts.append(f"resumed from byte {row['resumed_from']}")
    secs = row.get("seconds") or 0.0
    parts.append(f"{secs:.2f}s" + (f", {size / secs / 1e9:.2f} GB/s" if secs > 0 else ""))
    return f"{verb} {row['path']}: " + ", ".join(parts)


def run_send(args: argparse.Namespace) -> int:
    """``llmwire send``."""
    from .transport import run

    secret = read_secret(args.secret_file, args.secret_on_command_line)
    items = _plan(args.paths, args.as_file)

    def report(row: dict[str, Any]) -> None:
        if not args.json:
            print(_text_line(row, "sent"), flush=True)

    rows = run(_send_all(args, secret, items, report))
    if args.json:
        total = {"bytes": sum(r["bytes"] for r in rows),
                 "wire_bytes": sum(r["wire_bytes"] for r in rows),
                 "seconds": round(sum(r["seconds"] for r in rows), 6)}
        print(json.dumps(rows[0] if len(rows) == 1 else {"transfers": rows, **total}))
    return 0


# ---------------------------------------------------------------- recv


def _state_dict_target(root: str, header: Any) -> tuple[str, str]:
    from .errors import UnsafeFileName
    from .payloads.files import check_file_name

    name = header.get("name") if isinstance(header, dict) else None
    if name is None:
        name = "state_dict.safetensors"
    check_file_name(name)
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    final = os.path.join(root, *name.split("/"))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.commonpath([root, os.path.realpath(os.path.dirname(final))]) != root:
        raise UnsafeFileName(name, "the name resolves outside the target directory")
    return name, final


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
                    ok = await self._state_dict(transport, stream, peer)
                elif kind == "file-offer":
                    ok = await self._file(transport, stream, peer)
                elif kind == "file-done":  # leftover of a transfer we aborted
                    await stream.read_all(64 * 1024)
                    continue
                else:
                    await stream.cancel(reason=f"llmwire recv does not take {kind!r} streams")
                    self._warn(peer, f"refused a stream of kind {kind!r}")
                    continue
                if ok is None:  # the connection is unusable
                    break
                landed_here += ok
        finally:
            if self.args.once and landed_here:
                self.finished.set()

    async def _state_dict(self, transport: Any, stream: Any, peer: str) -> int | None:
        from .payloads.statedict import receive_state_dict

        started = time.perf_counter()
        name = stream.header.get("name")
        progress = _Progress(str(name), _bars_enabled(self.args))
        try:
            name, final = _state_dict_target(self.root, stream.header)
            if os.path.lexists(final) and not self.args.overwrite:
                from .errors import TargetExists
                raise TargetExists(name, "the file exists (recv --overwrite replaces it)")
            path = await receive_state_dict(stream, final, overwrite=self.args.overwrite,
                                            progress=progress)
        except (LlmwireError, OSError) as exc:
            progress.close()
            code = exit_code_for(exc)
            self._warn(peer, f"state dict {name!r} failed: {exc}")
            if isinstance(exc, (ConnectionClosed, TransferInterrupted)):
                return None
            try:
                await stream.cancel(reason=str(exc)[:200])
            except LlmwireError:
                pass
            try:
                await transport.send_message({"kind": "cli-failed", "reason": str(exc)[:500],
                                              "code": code})
            except (LlmwireError, OSError):
                return None
            return 0
        progress.close()
        path = str(path)
        digest = await asyncio.to_thread(file_digest, path)
        row = {"kind": "state_dict", "name": name, "path": path,
               "bytes": os.path.getsize(path), "digest": digest,
               "seconds": round(time.perf_counter() - started, 6)}
        await transport.send_message({"kind": "cli-landed", "path": path, "digest": digest})
        self._report(row)
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
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "handshake" in message and "failed" in message:
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
        raise CliError(f"cannot listen on {host}:{port}: {reason}", EXIT_CONNECTION) from None
    try:
        bound = server.sockets[0].getsockname()
        print(f"llmwire recv: listening on {bound[0]}:{bound[1]}, writing to {root}",
              file=sys.stderr, flush=True)
        if args.once:
            await receiver.finished.wait()
        else:
            await server.serve_forever()
    finally:
        await server.close()
    return receiver.landed


def run_recv(args: argparse.Namespace) -> int:
    """``llmwire recv``."""
    from .transport import run

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
        landed = run(_serve(args, secret, root))
    finally:
        log.removeHandler(handler)
    if args.json and args.once:
        print(json.dumps(landed[0] if len(landed) == 1 else {"transfers": landed}))
    return 0
