"""The memory profiler (``llmwire profile``): real sender
and receiver processes over loopback, sampled from /proc."""

from __future__ import annotations

import csv
import json
import pathlib
import statistics
import subprocess
import sys
from typing import Any

import pytest

from llmwire.cli.bench._models import ModelSource
from llmwire.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from llmwire.cli.profile import _aggregate, parse_model_size, profile

torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEYS = {"sender_peak_mib", "receiver_peak_mib", "seconds", "wire_bytes"}
PNG = b"\x89PNG\r\n\x1a\n"


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_json_csv_and_png_for_every_mode(tmp_path: pathlib.Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    csv_path, png_path = tmp_path / "mem.csv", tmp_path / "mem.png"
    assert main(["profile", "--params", "1M", "--formats", "raw,nf4", "--json",
                 "--csv", str(csv_path), "--plot", str(png_path)]) == EXIT_OK
    out = _json(capsys)
    modes = out["modes"]
    assert set(modes) == {"regular/raw", "regular/nf4", "container/raw/memory",
                          "container/nf4/memory", "file/raw"}
    assert out["repeat"] == 1 and out["model_bytes"] > 3_900_000
    for label, r in modes.items():
        assert KEYS <= set(r), label
        assert r["seconds"] > 0 and r["wire_bytes"] > 0, label
        assert r["sender_baseline_mib"] > 0 and r["receiver_baseline_mib"] > 0, label
        assert "total_peak_mib" in r, label
    assert modes["regular/raw"]["max_abs_err"] == 0.0
    assert modes["container/raw/memory"]["max_abs_err"] == 0.0
    assert 0 < modes["container/nf4/memory"]["max_abs_err"] < 1
    # nf4 is about 4.5 bits per weight against 32
    assert modes["container/nf4/memory"]["wire_bytes"] < modes["container/raw/memory"][
        "wire_bytes"] / 5
    assert modes["file/raw"]["wire_bytes"] > out["model_bytes"]  # checkpoint with its header
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == set(modes)
    assert {r["process"] for r in rows} == {"sender", "receiver"}
    assert {r["repeat"] for r in rows} == {"0"}
    assert {r["params"] for r in rows} == {str(out["params"])}
    for label in modes:
        times = [float(r["seconds"]) for r in rows
                 if r["run"] == label and r["process"] == "sender"]
        assert len(times) >= 10 and times == sorted(times)
        assert times[0] < 0 < times[-1]  # from before the model is built, seconds since go
        # sampled at 5 ms; allow for a loaded machine, the issue asks <= 10 ms typical
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        assert gaps[len(gaps) // 2] <= 0.011
    assert all(int(r["rss_bytes"]) >= int(r["anon_rss_bytes"]) >= 0 for r in rows)
    assert png_path.read_bytes()[:8] == PNG


def test_table_with_inplace_and_safetensors_receivers(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--params", "1M", "--modes", "container", "--formats",
                 "fp16", "--receiver", "inplace,safetensors"]) == EXIT_OK
    out = capsys.readouterr().out
    for column in ("sender +MiB", "receiver +MiB", "both +MiB", "wire MiB", "model MiB"):
        assert column in out
    assert "container/fp16/inplace" in out and "container/fp16/safetensors" in out


def test_repeats_report_medians_and_sizes_sweep(tmp_path: pathlib.Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    sweep_png, csv_path = tmp_path / "sweep.png", tmp_path / "sweep.csv"
    assert main(["profile", "--sizes", "8MB,4MB", "--modes", "container", "--repeat", "3",
                 "--json", "--sweep-plot", str(sweep_png), "--csv", str(csv_path)]) == EXIT_OK
    out = _json(capsys)
    points = out["sizes"]
    # smallest first; a synthetic Llama has about the parameters asked for
    assert [p["params"] for p in points] == [ModelSource("llama", n).count()
                                             for n in (1_000_000, 2_000_000)]
    assert points[0]["model_bytes"] < points[1]["model_bytes"]
    for point in points:
        r = point["modes"]["container/raw/memory"]
        for key in ("sender_peak_mib", "receiver_peak_mib", "total_peak_mib", "seconds"):
            runs = r["runs"][key]
            assert len(runs) == 3
            assert r[key] == pytest.approx(statistics.median(runs), abs=0.11)
    assert sweep_png.read_bytes()[:8] == PNG
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["params"], r["repeat"]) for r in rows} == {
        (str(p["params"]), i) for p in points for i in ("0", "1", "2")}


def test_users_checkpoints(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model PATH: a safetensors file with bf16, fp16 and integer tensors, and
    a torch checkpoint wrapping a state dict with a tied and a transposed
    weight; every mode and receiver verifies."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    state = {"embed.weight": torch.randn(600, 256, generator=g).to(torch.bfloat16),
             "proj.weight": torch.randn(256, 256, generator=g).to(torch.float16),
             "norm.weight": torch.ones(256), "step": torch.tensor([12], dtype=torch.int64)}
    st_path, pt_path = tmp_path / "user.safetensors", tmp_path / "user.pt"
    save_file(state, str(st_path))

    assert main(["profile", "--model", str(st_path), "--formats", "nf4", "--receiver",
                 "inplace,safetensors", "--json"]) == EXIT_OK
    out = _json(capsys)
    params = sum(t.numel() for t in state.values())
    assert out["params"] == params
    assert out["model_bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    modes = out["modes"]
    assert set(modes) == {"regular/nf4", "container/nf4/inplace", "container/nf4/safetensors",
                          "file/raw"}
    assert modes["file/raw"]["wire_bytes"] == st_path.stat().st_size  # the user's own file
    for label in ("regular/nf4", "container/nf4/inplace", "container/nf4/safetensors"):
        assert 0 < modes[label]["max_abs_err"] < 1, label  # bf16 weights in nf4

    # a torch checkpoint with a tied weight and a transposed (non-contiguous) one
    tied = {"embed.weight": state["proj.weight"].float(), "lm_head.weight": None,
            "proj_t.weight": state["proj.weight"].t(), "step": state["step"]}
    tied["lm_head.weight"] = tied["embed.weight"]
    torch.save({"state_dict": tied, "epoch": 4}, pt_path)
    assert main(["profile", "--model", str(pt_path), "--json"]) == EXIT_OK
    out = _json(capsys)
    assert out["params"] == 2 * 256 * 256 + 1  # the tied weight once
    modes = out["modes"]
    assert modes["regular/raw"]["max_abs_err"] == 0.0
    assert modes["container/raw/memory"]["max_abs_err"] == 0.0
    assert modes["file/raw"]["wire_bytes"] == pt_path.stat().st_size
    # the sender holds the tied weight once, as the checkpoint does
    assert modes["container/raw/memory"]["wire_bytes"] < 2 * 256 * 256 * 4


def test_regular_mode_peaks_above_container_mode() -> None:
    """20M parameters (80 MB fp32): the regular receiver holds the message and
    the unpacked tensors, the sender the serialized copy; container mode neither."""
    r = profile(20_000_000, ["regular", "container"], ["raw"], "memory")["runs"]
    regular, container = r["regular/raw"], r["container/raw/memory"]
    model_mib = 20_000_000 * 4 / 2**20
    assert regular["receiver_peak_mib"] > container["receiver_peak_mib"] + model_mib / 2
    assert regular["sender_peak_mib"] > container["sender_peak_mib"] + model_mib / 2
    assert regular["total_peak_mib"] > container["total_peak_mib"] + model_mib / 2
    assert container["sender_peak_mib"] < model_mib / 4
    # the timeline starts before the model is built: the sender's first samples are
    # well under its baseline
    first = regular["timelines"]["sender"][0][1] / 2**20
    assert first < regular["sender_baseline_mib"] - model_mib / 2


def test_an_unsendable_checkpoint_is_one_line_and_exit_1(
        tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Refused when its layout is read, before any process starts."""
    path = tmp_path / "complex.pt"
    torch.save({"w": torch.zeros(8, dtype=torch.complex64)}, path)
    assert main(["profile", "--model", str(path), "--modes", "container"]) == EXIT_ERROR
    err = capfd.readouterr().err.strip().splitlines()  # the children's stderr too
    assert len(err) == 1, err
    assert err[0].startswith("llmwire profile: error: ") and str(path) in err[0]
    assert "entry 'w'" in err[0] and "complex64" in err[0]


def test_usage_errors(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    usage = [["--modes", "bogus"], ["--interval", "0.05"], ["--repeat", "0"],
             ["--receiver", "disk"], ["--formats", "nf4+nested"], ["--formats", "zz"],
             ["--sizes", "1x"], ["--sizes", "0"], ["--sweep-plot", "s.png"],
             ["--model", str(tmp_path / "missing.pt")],
             ["--model", str(text), "--params", "1M"], ["--params", "0"],
             ["--params", "5000"], ["--sizes", "inf"], ["--sizes", "-1"],
             ["--sizes", "1", "--params", "1M"], ["--dir", str(tmp_path / "none")],
             ["--sizes", "1e400MB"]]
    for argv in usage:
        assert main(["profile", *argv]) == EXIT_USAGE, argv
        assert capsys.readouterr().err.startswith("llmwire profile: "), argv
    assert main(["profile", "--model", str(text)]) == EXIT_ERROR  # exists, not a checkpoint
    assert capsys.readouterr().err.startswith("llmwire profile: error: ")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["profile", "--plot", "x.png"]) == EXIT_USAGE
    assert "needs matplotlib" in capsys.readouterr().err


def test_parse_model_size() -> None:
    assert parse_model_size("0.25") == 250_000_000
    assert parse_model_size("2") == 2_000_000_000
    assert parse_model_size("500MB") == 500_000_000
    assert parse_model_size("1.5GiB") == 3 * 2**29
    for bad in ("250M", "1x", ""):
        with pytest.raises(ValueError):
            parse_model_size(bad)


def test_aggregate_takes_medians_and_the_median_run() -> None:
    def run(peak: float, seconds: float) -> dict[str, Any]:
        figures: dict[str, Any] = {k: peak for k in (
            "sender_baseline_mib", "sender_peak_abs_mib", "sender_peak_mib",
            "receiver_baseline_mib", "receiver_peak_abs_mib", "receiver_peak_mib",
            "total_peak_mib")}
        return {**figures, "seconds": seconds, "max_abs_err": peak / 100,
                "timelines": {"peak": peak}}

    out = _aggregate([run(30, 1.0), run(10, 3.0), run(20, 2.0), run(40, 9.0)])
    assert out["total_peak_mib"] == 25 and out["seconds"] == 2.5
    assert out["max_abs_err"] == 0.4
    assert out["timelines"] == {"peak": 20}  # the lower median run by summed peak
    assert len(out["repeats"]) == 4


def test_checkpoint_models_are_built_faithfully(tmp_path: pathlib.Path) -> None:
    """The sender's private copy of a checkpoint: equal values, ties kept,
    an empty tensor beside a full one (safetensors gives both one address),
    a tied weight counted once even when one name holds it transposed."""
    from safetensors.torch import save_file

    st_path = tmp_path / "empty-first.safetensors"
    save_file({"a_empty": torch.zeros(0), "d": torch.arange(6.0)}, str(st_path))
    model = ModelSource.parse(str(st_path), 0)
    built = model.build()
    assert built["a_empty"].numel() == 0 and torch.equal(built["d"], torch.arange(6.0))
    assert model.count() == 6 and model.nbytes() == 24

    w = torch.randn(8, 4)
    pt_path = tmp_path / "tied.pt"
    torch.save({"w": w, "w_t": w.t(), "tail": w[4:], "b": torch.ones(3, dtype=torch.bfloat16)},
               pt_path)
    model = ModelSource.parse(str(pt_path), 0)
    assert model.count() == 32 + 16 + 3  # w and w.t() once; the slice is other elements
    assert model.nbytes() == 4 * (32 + 16) + 2 * 3
    built = model.build()
    assert built["w"].data_ptr() == built["w_t"].data_ptr()
    assert built["w"].untyped_storage().data_ptr() == built["tail"].untyped_storage().data_ptr()
    assert built["w"].data_ptr() != w.data_ptr()  # a copy, not the file's map
    for name, t in {"w": w, "w_t": w.t(), "tail": w[4:]}.items():
        assert torch.equal(built[name], t) and built[name].stride() == t.stride(), name
    assert built["b"].dtype == torch.bfloat16


def test_max_err_compares_in_chunks() -> None:
    from llmwire.cli.bench._peers import _max_err

    g = torch.Generator().manual_seed(5)
    want = {"a": torch.randn(1000, 7, generator=g), "b": torch.zeros(0)}
    got = {"a": want["a"].clone(), "b": torch.zeros(0)}
    got["a"][999, 6] += 0.5  # in the last chunk
    whole = _max_err(got, want)
    assert whole == pytest.approx(0.5, abs=1e-6)
    assert _max_err(got, want, chunk=64) == whole
    with pytest.raises(RuntimeError, match="arrived as"):
        _max_err({"a": got["a"].t(), "b": got["b"]}, want)


def test_a_model_too_big_for_the_machine_is_warned_about(
        capsys: pytest.CaptureFixture[str]) -> None:
    from llmwire.cli.profile import _warn_if_too_big

    _warn_if_too_big(ModelSource("llama", 10**6), ["container"])
    assert capsys.readouterr().err == ""
    _warn_if_too_big(ModelSource("llama", 10**14), ["regular"])  # 400 TB
    assert "warning" in capsys.readouterr().err


def test_profile_help_lists_its_options() -> None:
    out = subprocess.run([sys.executable, "-m", "llmwire", "profile", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--plot", "--csv", "--sizes", "--repeat", "--model", "--sweep-plot", "--dir"):
        assert flag in out
