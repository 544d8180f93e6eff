"""The wire and file benches run end to end on a tiny size (no timing is asserted)."""

from __future__ import annotations

import argparse
import json

from llmwire.cli.bench import wire


def test_bench_wire_json_keys(capsys):
    parser = argparse.ArgumentParser()
    wire.add_arguments(parser)
    args = parser.parse_args(["--bytes", str(1 << 20), "--runs", "1", "--chunk", "65536",
                              "--json"])
    assert wire.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"raw_gbps", "llmwire_gbps", "ratio"} <= out.keys()
    assert out["raw_gbps"] > 0 and out["llmwire_gbps"] > 0


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
