"""What the engine benches (``bench flower``, ``bench nvflare``) check
before they start a deployment."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..synthetic import model_size

__all__ = ["engine_modes", "add_engine_arguments", "DEFAULT_PARAMS"]

DEFAULT_PARAMS = 64 << 20  # about 256 MiB in fp32


def add_engine_arguments(parser: argparse.ArgumentParser, modes: tuple[str, ...],
                         clients: str) -> None:
    """The options every engine bench takes (``clients``: what they are called)."""
    parser.add_argument("--params", type=model_size, default=DEFAULT_PARAMS,
                        help=f"parameters of the synthetic model (default: {DEFAULT_PARAMS}, "
                             "about 256 MiB in fp32)")
    parser.add_argument("--clients", type=int, default=2, help=f"{clients} (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="FedAvg rounds (default: 2)")
    parser.add_argument("--modes", default=",".join(modes),
                        help=f"comma-separated, of {', '.join(modes)} (default: all)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one mode's run may take (default: 1800)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object with a "modes" list')


def engine_modes(bench: str, engine: str, package: str, args: argparse.Namespace,
                 choices: tuple[str, ...]) -> list[str] | None:
    """The modes asked for, or None after one line on stderr: ``engine``
    (the Python ``package``, in the extra named like the bench) is
    not installed, a mode is unknown, ``--clients``/``--rounds`` are not
    positive, or this is not Linux (RSS comes from /proc)."""
    name = f"llmwire bench {bench}"
    try:
        importlib.import_module(package)
    except ImportError:
        print(f"{name}: needs {engine}: pip install 'llmwire[{bench}]'", file=sys.stderr)
        return None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in choices for m in modes):
        print(f"{name}: --modes takes {', '.join(choices)}, got {args.modes!r}",
              file=sys.stderr)
        return None
    if args.clients < 1 or args.rounds < 1:
        print(f"{name}: --clients and --rounds must be positive", file=sys.stderr)
        return None
    if not sys.platform.startswith("linux"):
        print(f"{name}: samples memory through /proc: Linux only", file=sys.stderr)
        return None
    return modes
