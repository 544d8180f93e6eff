"""The command line, run in-process through ``main(argv)`` and once as a real
subprocess (the installed entry point's module)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import llmwire
from llmwire.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main


def test_version_names_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert llmwire.__version__ in out and llmwire.IMPLEMENTATION in out


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["implementation"] == llmwire.IMPLEMENTATION
    assert set(info["formats"]) == {"fp16", "bf16", "blockwise8", "fp4", "nf4"}


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "demo" in capsys.readouterr().out


def test_demo_json_small(capsys: pytest.CaptureFixture[str]) -> None:
    """Two processes per format over loopback: keys, sizes, errors and memory."""
    assert main(["demo", "--params", "200k", "--formats", "fp32,nf4,nf4+nested",
                 "--json"]) == EXIT_OK
    rows = {r["format"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["fp32", "nf4", "nf4+nested"]
    assert rows["fp32"]["max_abs_err"] == 0
    assert 0 < rows["nf4"]["max_abs_err"] < 0.1
    assert rows["nf4+nested"]["wire_bytes"] < rows["nf4"]["wire_bytes"] < rows["fp32"]["wire_bytes"]
    assert 0.12 < rows["nf4"]["ratio"] < 0.20  # small tensors stay raw, headers count
    for row in rows.values():
        assert {"seconds", "gbps", "sender_peak_mib", "receiver_peak_mib"} <= set(row)
        assert row["seconds"] > 0 and row["gbps"] > 0


def test_bad_format_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--params", "100k", "--formats", "nf5"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nf5" in err and "Traceback" not in err


def test_bad_size_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--params", "lots"])
    assert exc.value.code == EXIT_USAGE
    assert "lots" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--params", "0"], ["demo", "--params", "5000"],
                                  ["bench", "round", "--params", "0"],
                                  ["bench", "quant", "--params", "9999"]])
def test_too_small_a_model_is_a_usage_error_before_any_process_starts(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "at least 10000 parameters" in capsys.readouterr().err


@pytest.mark.parametrize("formats", ["", ","])
def test_bench_round_without_formats_says_so(formats: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "round", "--formats", formats]) == EXIT_USAGE
    assert capsys.readouterr().err == "llmwire bench round: --formats names no format\n"


def test_bench_quant_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "quant", "--params", "300k", "--formats", "nf4,blockwise8,fp16",
                 "--repeat", "1", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in rows] == ["nf4", "blockwise8", "fp16"]
    for row in rows:
        assert {"format", "ratio", "quant_gbps", "dequant_gbps", "max_abs_err", "rel_mae",
                "implementation"} <= set(row)
        assert row["quant_gbps"] > 0 and row["dequant_gbps"] > 0
        assert row["implementation"] == llmwire.IMPLEMENTATION
    assert "torch_gbps" in rows[2]


def test_module_entry_point_subprocess() -> None:
    proc = subprocess.run([sys.executable, "-m", "llmwire", "info"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"llmwire {llmwire.__version__}")


def test_the_cli_and_every_bench_load_without_torch_or_the_engines() -> None:
    """torch, Flower and NVFlare are optional: the CLI and its benches'
    options must load without them (each bench says what it needs when run)."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'flwr', 'nvflare', 'transformers'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from llmwire.cli import main\n"
        "for argv in (['--help'], ['bench', '--help'], ['bench', 'nvflare', '--help'],\n"
        "             ['bench', 'flower', '--help'], ['bench', 'link', '--help'],\n"
        "             ['bench', 'scale', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "print('loaded')\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.endswith("loaded\n"), done.stderr[-2000:]
