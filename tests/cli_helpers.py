"""Helpers for the command-line tests: run ``python -m llmwire`` in a
subprocess, and an ``llmwire recv`` receiver that learns its own port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import xxhash

ROOT = Path(__file__).resolve().parent.parent
SECRET = "cli-test-secret"
TIMEOUT = 60


def env(secret: str | None = SECRET) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("LLMWIRE_SECRET", None)
    if secret is not None:
        out["LLMWIRE_SECRET"] = secret
    return out


def cli(*args: str, secret: str | None = SECRET, timeout: float = TIMEOUT,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmwire", *args], cwd=cwd, env=env(secret),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def digest(path: Path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


class Receiver:
    """``llmwire recv --listen 127.0.0.1:0`` in a subprocess; learns its port."""

    def __init__(self, out: Path, *extra: str, secret: str = SECRET,
                 listen: str = "127.0.0.1:0") -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmwire", "recv", "--listen", listen, "--out",
             str(out), "--json", *extra], cwd=ROOT, env=env(secret),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.first_line = self.proc.stderr.readline()
        assert "listening on" in self.first_line, self.first_line + self.proc.stderr.read()
        self.address = self.first_line.split("listening on ")[1].split(",")[0]
        self.port = int(self.address.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=TIMEOUT)
