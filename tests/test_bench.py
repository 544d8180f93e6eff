"""The wire and file benches run end to end on a tiny size (no timing is asserted)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from llmwire.cli.bench import wire


def test_bench_wire_json_keys(capsys):
    parser = argparse.ArgumentParser()
    wire.add_arguments(parser)
    args = parser.parse_args(["--bytes", str(1 << 20), "--runs", "1", "--chunk", "65536",
                              "--json"])
    assert wire.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"raw_gbps", "llmwire_gbps", "ratio", "raw_sender_cpu_s_per_gib",
            "llmwire_sender_cpu_s_per_gib", "sender_cpu_s_per_gib_over_raw"} <= out.keys()
    assert out["raw_gbps"] > 0 and out["llmwire_gbps"] > 0
    assert out["llmwire_sender_cpu_s_per_gib"] >= 0 and out["raw_sender_cpu_s_per_gib"] >= 0


def test_bench_file_json_keys(capsys, tmp_path):
    """``llmwire bench file`` (once tools/measure_file_transfer.py) end to end."""
    from llmwire.cli.bench import file

    parser = argparse.ArgumentParser()
    file.add_arguments(parser)
    args = parser.parse_args(["--size", "2MiB", "--runs", "1", "--chunk", "65536",
                              "--dir", str(tmp_path), "--json"])
    assert file.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"raw_socket_gbps", "raw_socket_to_file_gbps", "llmwire_file_gbps",
            "ratio_vs_raw_socket_to_file", "sender_peak_rss_over_baseline_mib",
            "receiver_peak_rss_over_baseline_mib"} <= out.keys()
    assert out["llmwire_file_gbps"] > 0 and list(tmp_path.iterdir()) == []


def test_bench_round_json_keys(capsys, tmp_path):
    """``llmwire bench round``: a server and two client processes, two rounds."""
    from llmwire.cli.bench import round as round_bench

    parser = argparse.ArgumentParser()
    round_bench.add_arguments(parser)
    args = parser.parse_args(["--clients", "2", "--params", "1M", "--formats", "fp32,nf4",
                              "--spool-dir", str(tmp_path), "--json"])
    assert round_bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["clients"] == 2 and out["params"] == 1_000_000
    by_format = {row["format"]: row for row in out["formats"]}
    for row in by_format.values():
        assert {"format", "wire_bytes", "round_seconds", "raw_seconds", "server_peak_mib",
                "client_peak_mib", "max_abs_err"} <= row.keys()
        assert row["round_seconds"] > 0 and row["raw_seconds"] > 0
    assert by_format["raw"]["max_abs_err"] < 1e-6             # lossless: fp32 rounding only
    assert by_format["nf4"]["wire_bytes"] <= 0.16 * by_format["raw"]["wire_bytes"]
    assert list(tmp_path.iterdir()) == []                      # the undo logs are gone


def _link_args(*argv: str) -> argparse.Namespace:
    from llmwire.cli.bench import link

    parser = argparse.ArgumentParser()
    link.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_link_over_the_relay(capsys):
    """``llmwire bench link`` on the loopback relay (any user): llmwire and the
    raw stream of the same bytes, both over a 20 ms link."""
    from llmwire.cli.bench import link

    args = _link_args("--params", "300k", "--formats", "nf4", "--rtt", "20ms",
                      "--peers", "none", "--runs", "1", "--emulation", "relay", "--json")
    assert link.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["emulation"] == "relay" and out["params"] == 300_000
    rows = {r["system"]: r for r in out["runs"]}
    assert set(rows) == {"llmwire", "raw"}
    for r in rows.values():
        assert {"system", "format", "rate_bps", "rtt_ms", "wire_bytes", "seconds",
                "link_seconds"} <= r.keys()
        assert r["format"] == "nf4" and r["rtt_ms"] == 20 and r["rate_bps"] == 10**9
        assert r["link_seconds"] == round(r["wire_bytes"] * 8 / 1e9, 4)
        assert r["seconds"] >= 0.01          # one one-way delay at least
    assert rows["raw"]["wire_bytes"] == rows["llmwire"]["wire_bytes"] < 0.2 * 4 * 300_000
    assert rows["llmwire"]["vs_raw"] > 0


def test_bench_link_with_nvflare_in_namespaces(capsys):
    """The NVFlare CellNet peer on the same link; in namespaces where root."""
    pytest.importorskip("nvflare", reason="the NVFlare peer needs nvflare (extra [nvflare])")
    from llmwire.cli.bench import _netns, link

    args = _link_args("--params", "300k", "--formats", "fp32", "--rtt", "0ms",
                      "--runs", "1", "--json")
    assert link.run(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["emulation"] == ("relay" if _netns.unavailable() else "netns+veth+htb")
    rows = {r["system"]: r for r in out["runs"]}
    assert set(rows) == {"llmwire", "raw", "nvflare"}
    assert rows["nvflare"]["wire_bytes"] == rows["llmwire"]["wire_bytes"]
    assert rows["nvflare"]["seconds"] > 0 and "vs_raw" in rows["nvflare"]
    assert not [n for n in _netns._namespaces() if n.startswith(f"{_netns.PREFIX}{os.getpid()}-")]


@pytest.mark.parametrize("argv", [["--formats", "fp33"], ["--peers", "flower"],
                                  ["--runs", "0"]])
def test_bench_link_refuses_bad_arguments(argv, capsys):
    from llmwire.cli.bench import link

    assert link.run(_link_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmwire bench link:") and err.count("\n") == 1


@pytest.mark.parametrize("parser,text", [("parse_rate", "fast"), ("parse_rate", "0bit"),
                                         ("parse_rtt", "-5ms"), ("parse_rtt", "20s")])
def test_bench_link_rate_and_rtt_parsers_refuse(parser, text):
    from llmwire.cli.bench import link

    with pytest.raises(argparse.ArgumentTypeError):
        getattr(link, parser)(text)
