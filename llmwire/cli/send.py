"""``llmwire send``: files, state dicts and model directories to a receiver,
over one connection.

A ``.safetensors`` file or a torch checkpoint (``.pt``, ``.pth``, ``.bin``
holding a state dict) travels as a state dict, read lazily through
:func:`llmwire.open_checkpoint`; a model directory as one directory
transfer (:mod:`llmwire.payloads.directories`: its weights as one state
dict, its other files as files); anything else travels as a file. Files and
state dicts resume where a killed transfer stopped. Every transfer ends with
the receiver's verdict (the payload protocols carry it), so ``send`` exits 0
only for what landed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..checkpoints import Checkpoint, checkpoint_kind, open_checkpoint
from ..errors import (
    AuthenticationError, CheckpointError, ConnectionClosed, LlmwireError, NonFiniteError,
    TransferInterrupted,
)
from .common import (
    EXIT_AUTH, EXIT_CONNECTION, EXIT_ERROR, SECRET_ENV, CliError, Progress, add_common_arguments,
    bars_enabled, exit_code_for, format_address, parse_address, parse_rate, parse_timeout,
    quiet_expected_errors, read_secret, run as run_command,
)

__all__ = ["EPILOG", "QUANT_FORMATS", "add_arguments", "run", "parse_override"]

QUANT_FORMATS = ("fp32", "fp16", "bf16", "blockwise8", "fp4", "nf4")

EPILOG = f"""\
examples:
  export {SECRET_ENV}=...                  (or --secret-file F; never on the command line)
  llmwire send model.safetensors --to 10.0.0.2:7070
  llmwire send model.safetensors --to 10.0.0.2:7070 --quantize nf4
  llmwire send pytorch_model.bin tokenizer.json --to gpu-box:7070 --json
  llmwire send Llama-3-70B/ --to gpu-box:7070 --quantize nf4
  llmwire send big.tar --to gpu-box:7070      run it again after a failure: it resumes

.safetensors, .pt, .pth and .bin (torch checkpoints holding a state dict) go as
state dicts, quantized with --quantize if given (float64 tensors, which the
formats cannot take, go as they are and are reported); the receiver writes
<name>.safetensors. A model directory (Hugging Face: sharded .safetensors with
model.safetensors.index.json, or one model.safetensors, or pytorch_model*.bin)
goes whole: its weights as one state dict, landed as shards with an index, and
its other files (config, tokenizer; hidden names left out) as files; the
receiver shows it under its name only once all of it landed. Anything else
goes as a file under its base name. A killed or dropped send resumes when run
again (state dicts from the last verified slice: --json says resumed_from); a
source that changed since is refused (--restart starts over). A source that
changes while it is sent ends the send (exit 1), and nothing of it is kept as
complete.
"""
def parse_override(text: str) -> tuple[str, str]:
    """``PATTERN=FMT`` (a tensor name or glob, and a format) -> (pattern, format)."""
    pattern, sep, fmt = text.rpartition("=")
    if not sep or not pattern or fmt not in QUANT_FORMATS + ("raw",):
        raise argparse.ArgumentTypeError(
            f"expected NAME_OR_GLOB=FMT with FMT one of {', '.join(QUANT_FORMATS)}, raw; "
            f"got {text!r}")
    return pattern, fmt

def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--restart", action="store_true",
                        help="start state dicts over: the receiver discards what an "
                             "interrupted send of them landed (needed when the source changed "
                             "since)")
    parser.add_argument("--limit-rate", type=parse_rate, metavar="RATE",
                        help="put at most RATE bytes per second on the wire, e.g. 50M")
    parser.add_argument("--timeout", type=parse_timeout, default=30.0, metavar="S",
                        help="seconds to wait for the connection and handshake (default: 30)")
    add_common_arguments(parser)

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
    kind: str  # "state_dict", "file" or "directory"
    checkpoint: Checkpoint | None = None  # opened (its layout checked) before connecting
    files: list[str] = field(default_factory=list)  # a directory's other files


def _plan(paths: list[str], args: argparse.Namespace) -> list[_Item]:
    """Every path checked before connecting: it exists, a checkpoint's layout
    is valid, and the formats asked for fit its tensors."""
    from ..payloads.files import check_file_name

    items = []
    try:
        for path in paths:
            if not os.path.exists(path):
                raise CliError(f"{path}: no such file", EXIT_ERROR)
            if os.path.isdir(path) and not args.as_file:
                items.append(_plan_directory(path, args))
                continue
            if not os.path.isfile(path):
                raise CliError(f"{path}: not a regular file", EXIT_ERROR)
            if not os.access(path, os.R_OK):
                raise CliError(f"{path}: permission denied", EXIT_ERROR)
            kind = None if args.as_file else checkpoint_kind(path)
            # a name the receiver would refuse is refused here, before connecting
            check_file_name(os.path.basename(path) if kind is None else _landing_name(path))
            if kind is None:
                items.append(_Item(path, "file"))
                continue
            # a malformed checkpoint, or a format its tensors cannot take, is refused
            # here, before connecting (planning reads no data)
            items.append(_Item(path, "state_dict", open_checkpoint(path, kind)))
            _check_plan(items[-1], args)
    except BaseException:
        _close_all(items)
        raise
    return items


def _check_plan(item: _Item, args: argparse.Namespace) -> None:
    from ..payloads.statedict import plan_state_dict

    assert item.checkpoint is not None
    try:
        manifest, _ = plan_state_dict(item.checkpoint, _wire_format(args.quantize),
                                      overrides=_overrides(args),
                                      metadata=item.checkpoint.metadata)
        manifest.to_bytes()  # over the manifest's size limit: refused here too
    except LlmwireError as exc:
        raise CliError(f"{item.path}: {exc}", exit_code_for(exc)) from None


def _named(path: str, exc: LlmwireError) -> str:
    """The error's line, naming ``path`` once (a CheckpointError names its file)."""
    return str(exc) if isinstance(exc, CheckpointError) else f"{path}: {exc}"


def _plan_directory(path: str, args: argparse.Namespace) -> _Item:
    """A model directory: its weights opened lazily, its other files listed."""
    from ..payloads.directories import directory_files
    from ..payloads.files import check_file_name

    name = _directory_name(path)
    try:
        check_file_name(name)
        checkpoint = open_checkpoint(path, "sharded")
    except LlmwireError as exc:
        raise CliError(_named(path, exc), exit_code_for(exc)) from None
    item = _Item(path, "directory", checkpoint)
    try:
        index = checkpoint.path if checkpoint.path.endswith(".index.json") else None
        item.files = directory_files(path, checkpoint.shards, index)
        for file in item.files:
            check_file_name(file)
            if not os.access(os.path.join(path, file), os.R_OK):
                raise CliError(f"{os.path.join(path, file)}: permission denied", EXIT_ERROR)
        _check_plan(item, args)
    except LlmwireError as exc:
        checkpoint.close()
        if isinstance(exc, CliError):
            raise
        raise CliError(_named(path, exc), exit_code_for(exc)) from None
    except BaseException:
        checkpoint.close()
        raise
    return item


def _directory_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """``--override`` in order, the first of a repeated pattern winning (as
    its first match wins among patterns)."""
    chosen: dict[str, str] = {}
    for pattern, fmt in args.override:
        chosen.setdefault(pattern, fmt)
    return chosen


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
                               progress: Progress, name: str | None = None,
                               header: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..payloads.statedict import send_state_dict

    assert item.checkpoint is not None
    name = name or _landing_name(item.path)
    fmt = args.quantize
    try:
        result = await send_state_dict(transport, item.checkpoint, _wire_format(fmt),
                                       overrides=_overrides(args), nonfinite=args.nonfinite,
                                       metadata=item.checkpoint.metadata,
                                       header={"name": name, **(header or {})},
                                       progress=progress, resumable=True,
                                       restart=args.restart)
    except (ConnectionClosed, TransferInterrupted):
        raise
    except NonFiniteError as exc:
        raise CliError(f"{item.path}: {exc.count} NaN/inf value(s) in {exc.name!r}, refused "
                       "(--nonfinite raise; --nonfinite saturate sends them by the documented "
                       "rule)", EXIT_ERROR) from None
    except LlmwireError as exc:  # the receiver's verdict, or our own refusal: name the file
        raise CliError(f"{item.path}: {exc}", exit_code_for(exc)) from None
    receipt = result.receipt
    return {"path": item.path, "kind": "state_dict", "name": name, "bytes": result.tensor_bytes,
            "file_bytes": sum(os.path.getsize(p) for p in item.checkpoint.shards),
            "wire_bytes": result.wire_bytes, "resumed_from": result.resumed_from,
            "seconds": round(result.seconds, 6), "format": fmt or "fp32",
            "entries": result.entries, "digest": receipt.get("digest"),
            "remote_path": receipt.get("path"), "formats": result.formats,
            "nonfinite": result.nonfinite, "kept_raw": list(result.kept_raw)}


async def _send_one_file(transport: Any, item: _Item, progress: Progress,
                         name: str | None = None) -> dict[str, Any]:
    from ..payloads.files import send_file

    result = await send_file(transport, item.path, name=name, progress=progress)
    return {"path": item.path, "kind": "file", "name": result.name, "bytes": result.size,
            "wire_bytes": result.bytes_transferred, "seconds": round(result.seconds, 6),
            "format": "file", "resumed_from": result.resumed_from, "digest": result.digest}

async def _send_directory(transport: Any, item: _Item, args: argparse.Namespace
                          ) -> dict[str, Any]:
    """A model directory: announce it, its weights, its files, then wait for
    the receiver to place it."""
    import time

    from ..payloads.directories import begin_directory, end_directory

    started = time.perf_counter()
    name = _directory_name(item.path)
    try:
        key = await begin_directory(transport, name, item.files)
    except (ConnectionClosed, TransferInterrupted):
        raise
    except LlmwireError as exc:
        raise CliError(f"{item.path}: {exc}", exit_code_for(exc)) from None
    progress = Progress(f"{name} (weights)", bars_enabled(args), args.limit_rate)
    try:
        weights = await _send_one_state_dict(transport, item, args, progress, name,
                                             {"dir": key})
    finally:
        progress.close()
    files = []
    for file in item.files:
        progress = Progress(f"{name}/{file}", bars_enabled(args), args.limit_rate)
        try:
            files.append(await _send_one_file(transport, _Item(os.path.join(item.path, file),
                                                               "file"), progress, file))
        finally:
            progress.close()
    try:
        reply = await end_directory(transport, key, name)
    except (ConnectionClosed, TransferInterrupted):
        raise
    except LlmwireError as exc:
        raise CliError(f"{item.path}: {exc}", exit_code_for(exc)) from None
    return {"path": item.path, "kind": "directory", "name": name,
            "bytes": weights["bytes"] + sum(f["bytes"] for f in files),
            "wire_bytes": weights["wire_bytes"] + sum(f["wire_bytes"] for f in files),
            "seconds": round(time.perf_counter() - started, 6), "format": weights["format"],
            "resumed_from": weights["resumed_from"], "entries": weights["entries"],
            "files": len(files), "digest": weights["digest"],
            "remote_path": reply.get("path"), "weights": weights, "other_files": files,
            "nonfinite": weights["nonfinite"], "kept_raw": weights["kept_raw"]}


async def _send_all(args: argparse.Namespace, secret: bytes, items: list[_Item],
                    report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    from ..transport import connect

    quiet_expected_errors()

    host, port = args.to
    try:
        transport = await connect(host, port, secret=secret, timeout=args.timeout)
    except (LlmwireError, OSError) as exc:
        raise _connect_error(exc, host, port) from None
    done = []
    try:
        for item in items:
            if item.kind == "directory":
                row = await _send_directory(transport, item, args)
                done.append(row)
                report(row)
                continue
            progress = Progress(os.path.basename(item.path), bars_enabled(args),
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
    if row["kind"] == "directory":
        parts.append(f"a model directory: weights as {row['format']} and {row['files']} "
                     f"file(s), {row['wire_bytes'] / 2**20:.1f} MiB on the wire")
    if row["kind"] in ("state_dict", "directory") and row.get("resumed_from"):
        parts.append(f"resumed from byte {row['resumed_from']} of the state dict")
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

def run(args: argparse.Namespace) -> int:
    """``llmwire send``."""
    secret = read_secret(args.secret_file, args.secret_on_command_line)
    items = _plan(args.paths, args)

    def report(row: dict[str, Any]) -> None:
        if not args.json:
            print(_text_line(row, "sent"), flush=True)

    try:
        rows = run_command(_send_all(args, secret, items, report))
    finally:
        _close_all(items)
    if args.json:
        total = {"bytes": sum(r["bytes"] for r in rows),
                 "wire_bytes": sum(r["wire_bytes"] for r in rows),
                 "seconds": round(sum(r["seconds"] for r in rows), 6)}
        print(json.dumps(rows[0] if len(rows) == 1 else {"transfers": rows, **total}))
    return 0
