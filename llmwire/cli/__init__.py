"""The ``llmwire`` command line: the applications of the library, thin over
its public API, one module per command (``send``, ``recv``, ``demo``,
``profile``; ``bench/`` holds one per benchmark; ``common`` what the
transfer commands share).

``main(argv=None) -> int`` never lets a traceback reach the user for an
expected failure: every :class:`~llmwire.LlmwireError` (and bad input such as
an unreadable file) becomes one line on stderr and a non-zero exit status,
listed in docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from types import ModuleType
from typing import Sequence

from .. import __version__
from ..errors import LlmwireError
from .common import (
    EXIT_AUTH, EXIT_CONNECTION, EXIT_ERROR, EXIT_INTEGRITY, EXIT_INTERRUPTED, EXIT_OK,
    EXIT_REFUSED, EXIT_TERMINATED, EXIT_USAGE, Terminated, exit_code_for,
)

__all__ = ["main", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_CONNECTION", "EXIT_AUTH",
           "EXIT_REFUSED", "EXIT_INTEGRITY", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

_BENCHES = ("quant", "wire", "stream", "file", "link", "round", "learn", "flower", "nvflare",
            "scale")

_EPILOG = """\
examples:
  export LLMWIRE_SECRET=...             the shared secret (or --secret-file F)
  llmwire recv --listen 0.0.0.0:7070 --out incoming/
  llmwire send model.safetensors --to HOST:7070 --quantize nf4
  llmwire send MODEL_DIR/ --to HOST:7070 --quantize nf4
                                        a Hugging Face model directory, landed whole
  llmwire send data.tar --to HOST:7070  run it again after a failure: it resumes
  llmwire demo                          send a built-in 25M-parameter model in every format
  llmwire demo --params 100M --formats nf4,fp16
  llmwire bench quant --params 100M     speed, size and error of each format
  llmwire bench quant --json            the same as one JSON list
  llmwire bench learn --plot learn.png  does FedAvg still learn with nf4 updates? (tiny model)
  llmwire profile --plot mem.png        memory of each transfer mode, sender and receiver
  llmwire profile --sizes 0.25,0.5,1 --sweep-plot sweep.png
                                        peak memory against model size, per mode
  llmwire info                          version and which kernels are in use

exit status: 0 ok, 1 error, 2 usage, 3 connection, 4 wrong secret, 5 refused by
the receiver, 6 integrity, 130 interrupted, 143 terminated (docs/cli.md)
"""


def _bench_modules() -> dict[str, ModuleType]:
    modules = {}
    for name in _BENCHES:
        try:
            modules[name] = importlib.import_module(f"{__package__}.bench.{name}")
        except ModuleNotFoundError as exc:  # a benchmark not shipped in this build
            if exc.name != f"{__package__}.bench.{name}":
                raise
    return modules


def _info_text() -> str:
    from ..quant import IMPLEMENTATION
    from ..quant.formats import FORMATS

    lines = [f"llmwire {__version__}", f"kernels: {IMPLEMENTATION}"
             + (" (LLMWIRE_PURE_PYTHON forces the NumPy reference)"
                if IMPLEMENTATION == "reference" else " (C extension llmwire._native)"),
             f"formats: {', '.join(name for name in FORMATS if name != 'raw')}",
             f"python: {sys.version.split()[0]}"]
    try:
        import torch
        lines.append(f"torch: {torch.__version__}")
    except ImportError:
        lines.append("torch: not installed (NumPy arrays only)")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmwire",
        description="Move very large model state between machines: quantized, streamed, "
                    "with bounded memory.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"llmwire {__version__} (kernels: %s)" % _implementation())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser("info", help="version, kernels in use, formats",
                               description="Print the version, which kernels are in use "
                                           "(C extension or NumPy reference) and the formats.")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    from . import recv, send
    send_parser = commands.add_parser(
        "send", allow_abbrev=False, help="send files and state dicts to a receiver",
        description="Send files and state dicts to `llmwire recv`, over one authenticated "
                    "connection, in order.",
        epilog=send.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_arguments(send_parser)
    recv_parser = commands.add_parser(
        "recv", allow_abbrev=False, help="receive files and state dicts into a directory",
        description="Listen for authenticated senders and land what they send in a directory.",
        epilog=recv.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    recv.add_arguments(recv_parser)

    from . import demo
    demo_parser = commands.add_parser(
        "demo", help="run the built-in demonstration",
        description=demo.DESCRIPTION, epilog=demo.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(demo_parser)

    from . import profile
    profile_parser = commands.add_parser(
        "profile", help="memory of a sender and receiver over loopback, per transfer mode",
        description=profile.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    profile.add_arguments(profile_parser)

    bench = commands.add_parser("bench", help="benchmarks (quant, wire, stream, file, link, round, "
                                              "learn, flower, nvflare, scale)",
                                description="Benchmarks; each prints medians of repeated runs "
                                            "and ratios against a baseline measured in the "
                                            "same run (learn: held-out loss against fp32's).")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in _bench_modules().items():
        doc = (module.__doc__ or "").strip().splitlines()[0].replace("``", "")
        sub = kinds.add_parser(name, help=doc, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    return parser


def _implementation() -> str:
    from ..quant import IMPLEMENTATION
    return IMPLEMENTATION


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "info":
        if args.json:
            from ..quant import IMPLEMENTATION
            from ..quant.formats import FORMATS
            print(json.dumps({"version": __version__, "implementation": IMPLEMENTATION,
                              "formats": [f for f in FORMATS if f != "raw"]}))
        else:
            print(_info_text())
        return EXIT_OK
    if args.command in ("send", "recv"):
        from . import recv, send
        return (send if args.command == "send" else recv).run(args)
    if args.command == "demo":
        from . import demo
        return demo.run(args)
    if args.command == "profile":
        from . import profile
        return profile.run(args)
    if args.command == "bench":
        return _bench_modules()[args.bench].run(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects others


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmwire`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        return _run(args, parser)
    except KeyboardInterrupt:
        print(f"llmwire: interrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"llmwire: terminated (SIGTERM) after {time.monotonic() - started:.1f}s",
              file=sys.stderr)
        return EXIT_TERMINATED
    except (LlmwireError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"llmwire: error: {message}", file=sys.stderr)
        return exit_code_for(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
