"""What the command line's transfer commands share: exit statuses and the
error that carries one, the secret, addresses, rates and timeouts on the
command line, progress bars, and running a command's coroutine so that
SIGTERM stops it as Ctrl-C does."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any, Coroutine

from ..errors import (
    AuthenticationError, ChecksumMismatch, ConnectionClosed, FileWriteError, IntegrityError,
    LlmwireError, PayloadRefused, PeerError, SourceChanged, TransferInterrupted,
)
from ..frames import ErrorCode

__all__ = ["SECRET_ENV", "CliError", "Terminated", "exit_code_for", "read_secret",
           "parse_address", "format_address", "parse_rate", "parse_timeout",
           "add_common_arguments", "Progress", "bars_enabled", "quiet_expected_errors", "run",
           "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_CONNECTION", "EXIT_AUTH",
           "EXIT_REFUSED", "EXIT_INTEGRITY", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

SECRET_ENV = "LLMWIRE_SECRET"

# exit statuses, documented in docs/cli.md
EXIT_OK = 0
EXIT_ERROR = 1  # an LlmwireError or an OS error: the message says which
EXIT_USAGE = 2  # bad command line (argparse's own convention)
EXIT_CONNECTION = 3  # cannot connect or listen, connection lost
EXIT_AUTH = 4  # wrong secret
EXIT_REFUSED = 5  # the receiver refused a name or a target
EXIT_INTEGRITY = 6  # a digest did not match, bytes arrived corrupted
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


class CliError(LlmwireError):
    """A command-line failure with its exit status; the message is one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Terminated(Exception):
    """The command got SIGTERM and stopped as it would on Ctrl-C."""

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
    if any(isinstance(e, PeerError) and e.code in _CORRUPTION_CODES
           or isinstance(e, (ChecksumMismatch, IntegrityError)) for e in _causes(exc)):
        return EXIT_INTEGRITY  # corrupted bytes, seen by either side: not the network
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

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secret-file", metavar="F",
                        help=f"read the shared secret from file F (default: the {SECRET_ENV} "
                             "environment variable; never on the command line)")
    parser.add_argument("--secret", dest="secret_on_command_line", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true",
                        help="print JSON on stdout instead of text lines")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they are off anyway when stderr is not a TTY)")

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
        env = os.environb.get(os.fsencode(SECRET_ENV))  # bytes as set, whatever the locale
        if env is None:
            raise CliError(f"no secret: set {SECRET_ENV} or pass --secret-file F", EXIT_USAGE)
        secret = env
        where = SECRET_ENV
    if not secret:
        raise CliError(f"the secret in {where} is empty", EXIT_USAGE)
    return secret

# ---------------------------------------------------------------- progress


class Progress:
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


def bars_enabled(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()

# ---------------------------------------------------------------- running


def quiet_expected_errors() -> None:
    """Errors the command reports itself (a handshake that timed out, a lost
    connection) must not also print "Task exception was never retrieved"."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), (LlmwireError, OSError)):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine (uvloop where installed); SIGTERM stops it as
    Ctrl-C does (transfers in progress keep a durable checkpoint) and raises
    :class:`Terminated`."""
    from ..transport import run as run_loop

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

    return run_loop(guarded())
