"""``llmwire recv``: accept authenticated senders and land what they send in
a directory (files under their names, state dicts as ``.safetensors``, model
directories as directories with sharded weights and an index)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import sys
import time
from typing import Any

from ..sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..errors import (
    ConnectionClosed, FileTransferError, LlmwireError, PayloadRefused, StreamCancelled,
    TransferInterrupted,
)
from .common import (
    EXIT_CONNECTION, EXIT_ERROR, SECRET_ENV, CliError, Progress, add_common_arguments,
    bars_enabled, format_address, parse_address, quiet_expected_errors, read_secret,
    run as run_command,
)

__all__ = ["EPILOG", "add_arguments", "run"]

EPILOG = f"""\
examples:
  export {SECRET_ENV}=...                  (or --secret-file F; never on the command line)
  llmwire recv --listen 0.0.0.0:7070 --out incoming/
  llmwire recv --listen 127.0.0.1:7070 --out incoming/ --once --json

Files land in --out under their sent names (relative names only; "..",
absolute paths and names leaving --out are refused). State dicts land as
<name>.safetensors. A model directory lands as <name>/ (weights as shards of at
most --max-shard-size with model.safetensors.index.json, or one
model.safetensors, loadable by transformers' from_pretrained), staged as
<name>.part/ until every part of it landed. Interrupted files and state dicts
keep their .part (and .part.json) and resume when sent again. Ctrl-C stops the
receiver (exit status 130), SIGTERM too (143).
"""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", required=True, type=parse_address, metavar="HOST:PORT",
                        help="address to listen on (port 0: a free port, printed at start)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory the transfers land in (created if missing)")
    parser.add_argument("--once", action="store_true",
                        help="exit after the first connection that landed a transfer")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files (default: refuse them)")
    parser.add_argument("--max-shard-size", type=_shard_size, default=DEFAULT_MAX_SHARD_SIZE,
                        metavar="SIZE",
                        help="largest weight shard of a received model directory, e.g. 5GB "
                             "or 500MiB (default: 50GB, as transformers' save_pretrained)")
    add_common_arguments(parser)


def _shard_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

def _state_dict_name(header: Any) -> str:
    """Where a state dict lands under --out (a checked relative name)."""
    from ..payloads.files import check_file_name

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
        self._landing: Any = None  # the directory this connection is sending, if any
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
                elif kind in ("dir-begin", "dir-done"):
                    ok = await self._directory(transport, stream, peer, kind)
                elif kind == "file-done":  # leftover of a transfer we aborted
                    await stream.read_all(64 * 1024)
                    continue
                else:
                    from ..payloads.verdict import refuse_stream
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

    async def _directory(self, transport: Any, stream: Any, peer: str, kind: str) -> int:
        """``dir-begin`` stages a directory; ``dir-done`` places it."""
        from ..payloads.directories import DirectoryLanding, refuse_directory
        from ..payloads.verdict import failure_fields, send_control

        header = stream.header
        await stream.read_all(64 * 1024)
        key = header.get("id")
        if kind == "dir-begin":
            try:
                self._landing = DirectoryLanding.open(header, self.root, self.args.overwrite)
                self._landing.started = time.perf_counter()
            except (LlmwireError, OSError) as exc:
                self._landing = None
                self._warn(peer, f"directory {header.get('name')!r} refused: {exc}")
                await refuse_directory(transport, key, exc)
                return 0
            await send_control(transport, "dir-accept", id=key)
            return 0
        landing, self._landing = self._landing, None
        try:
            if landing is None or landing.key != key:
                raise PayloadRefused("a dir-done for no directory this connection sent")
            landing.finish()
        except (LlmwireError, OSError) as exc:
            self._warn(peer, f"directory {header.get('name', getattr(landing, 'name', None))!r} "
                             f"failed: {exc}")
            await send_control(transport, "dir-failed", id=key, **failure_fields(exc))
            return 0
        await send_control(transport, "dir-ok", id=key, path=landing.path)
        weights = landing.weights or {}
        self._report({"kind": "directory", "name": landing.name, "path": landing.path,
                      "bytes": weights.get("bytes", 0), "digest": weights.get("digest"),
                      "files": len(landing.files), "shards": len(weights.get("files", ())),
                      "seconds": round(time.perf_counter() - landing.started, 6)})
        return 1

    def _sink_for(self, header: dict[Any, Any], name: str) -> Any:
        """Where a state dict lands: a staged directory's shards, or a file."""
        from ..payloads.filesinks import SafetensorsSink, ShardedSink

        if "dir" not in header:
            return SafetensorsSink(os.path.join(self.root, *name.split("/")),
                                   overwrite=self.args.overwrite, root=self.root)
        landing = self._landing
        if landing is None or header["dir"] != landing.key:
            raise PayloadRefused("the weights of a directory this connection did not announce")
        return ShardedSink(landing.staged, self.args.max_shard_size, overwrite=True,
                           root=self.root, stage=False)

    async def _state_dict(self, stream: Any, peer: str) -> int | None:
        from ..payloads.statedict import receive_state_dict, refuse_state_dict

        started = time.perf_counter()
        name = stream.header.get("name")
        progress = Progress(str(name), bars_enabled(self.args))
        try:
            try:
                name = _state_dict_name(stream.header)
                sink = self._sink_for(stream.header, name)
            except LlmwireError as exc:
                await refuse_state_dict(stream, exc)
                raise
            await receive_state_dict(stream, sink, progress=progress)
        except (LlmwireError, OSError) as exc:
            kept = " (what landed is kept as .part: send it again to resume)" if isinstance(
                exc, (ConnectionClosed, TransferInterrupted, StreamCancelled)) \
                and "resume" in stream.header else ""
            self._warn(peer, f"state dict {name!r} failed: {exc}{kept}")
            if isinstance(exc, (ConnectionClosed, TransferInterrupted)):
                return None
            return 0
        finally:
            progress.close()
        receipt = sink.receipt()
        if self._landing is not None and "dir" in stream.header:
            self._landing.weights = receipt
            return 0
        self._report({"kind": "state_dict", "name": name, "path": receipt["path"],
                      "bytes": receipt["bytes"], "digest": receipt["digest"],
                      "seconds": round(time.perf_counter() - started, 6)})
        return 1

    async def _file(self, transport: Any, stream: Any, peer: str) -> int | None:
        from ..payloads.files import receive_file

        name = stream.header.get("name")
        progress = Progress(str(name), bars_enabled(self.args))
        landing = self._landing
        try:
            # a staged directory's files: nothing there is final, an earlier attempt's go
            result = await receive_file(transport, landing.staged if landing else self.root,
                                        overwrite=self.args.overwrite or landing is not None,
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
        if landing is not None:
            landing.file_landed(result.name)
            return 0
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
    from ..transport import serve

    quiet_expected_errors()
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


def run(args: argparse.Namespace) -> int:
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
        landed = run_command(_serve(args, secret, root))
    finally:
        log.removeHandler(handler)
    if args.json and args.once:
        print(json.dumps(landed[0] if len(landed) == 1 else {"transfers": landed}))
    return 0
