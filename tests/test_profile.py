"""The memory profiler (``llmwire profile``, tools/memprofile.py): real sender
and receiver processes over loopback, sampled from /proc."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import pytest

from llmwire.cli import EXIT_OK, EXIT_USAGE, main
from llmwire.profile import profile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEYS = {"sender_peak_mib", "receiver_peak_mib", "seconds", "wire_bytes"}


def test_json_csv_and_png_for_every_mode(tmp_path: pathlib.Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    csv_path, png_path = tmp_path / "mem.csv", tmp_path / "mem.png"
    assert main(["profile", "--params", "1M", "--formats", "raw,nf4", "--json",
                 "--csv", str(csv_path), "--plot", str(png_path)]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    modes = out["modes"]
    assert set(modes) == {"regular/raw", "regular/nf4", "container/raw/memory",
                          "container/nf4/memory", "file/raw"}
    for label, r in modes.items():
        assert KEYS <= set(r), label
        assert r["seconds"] > 0 and r["wire_bytes"] > 0, label
        assert r["sender_baseline_mib"] > 0 and r["receiver_baseline_mib"] > 0, label
    assert modes["regular/raw"]["max_abs_err"] == 0.0
    assert modes["container/raw/memory"]["max_abs_err"] == 0.0
    assert 0 < modes["container/nf4/memory"]["max_abs_err"] < 1
    # nf4 is about 4.5 bits per weight against 32
    assert modes["container/nf4/memory"]["wire_bytes"] < modes["container/raw/memory"][
        "wire_bytes"] / 5
    assert modes["file/raw"]["wire_bytes"] > 4_000_000  # the whole checkpoint
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == set(modes)
    assert {r["process"] for r in rows} == {"sender", "receiver"}
    for label in modes:
        times = [float(r["seconds"]) for r in rows
                 if r["run"] == label and r["process"] == "sender"]
        assert len(times) > 20 and times == sorted(times)
        # sampled at 5 ms; allow for a loaded machine, the issue asks <= 10 ms typical
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        assert gaps[len(gaps) // 2] <= 0.011
    assert all(int(r["rss_bytes"]) >= int(r["anon_rss_bytes"]) >= 0 for r in rows)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_with_inplace_and_safetensors_receivers(
        capsys: pytest.CaptureFixture[str]) -> None:
    for into in ("inplace", "safetensors"):
        assert main(["profile", "--params", "1M", "--modes", "container", "--formats",
                     "fp16", "--receiver", into]) == EXIT_OK
        out = capsys.readouterr().out
        assert "sender +MiB" in out and "receiver +MiB" in out and "wire MiB" in out
        assert f"container/fp16/{into}" in out


def test_regular_mode_peaks_above_container_mode() -> None:
    """50M parameters (200 MB fp32): the regular receiver holds the message and
    the unpacked tensors, the sender the serialized copy; container mode neither."""
    r = profile(50_000_000, ["regular", "container"], ["raw"], "memory")["runs"]
    regular, container = r["regular/raw"], r["container/raw/memory"]
    model_mib = 50_000_000 * 4 / 2**20
    assert regular["receiver_peak_mib"] > container["receiver_peak_mib"] + model_mib / 2
    assert regular["sender_peak_mib"] > container["sender_peak_mib"] + model_mib / 2
    assert container["sender_peak_mib"] < model_mib / 4
    # the timeline starts before the model is built: the sender's first samples are
    # well under its baseline
    first = regular["timelines"]["sender"][0][1] / 2**20
    assert first < regular["sender_baseline_mib"] - model_mib / 2


def test_usage_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--modes", "bogus"]) == EXIT_USAGE
    assert main(["profile", "--interval", "0.05"]) == EXIT_USAGE
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["profile", "--plot", "x.png"]) == EXIT_USAGE
    assert "needs matplotlib" in capsys.readouterr().err


def test_tools_wrapper_help() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "memprofile.py"), "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--plot" in out and "--csv" in out and "regular" in out
