"""The wire bench runs end to end on a tiny size (no timing is asserted)."""

from __future__ import annotations

import argparse
import json

from llmwire.bench import wire


def test_bench_wire_json_keys(capsys):
    parser = argparse.ArgumentParser()
    wire.add_arguments(parser)
    args = parser.parse_args(["--bytes", str(1 << 20), "--runs", "1", "--chunk", "65536",
                              "--json"])
    assert wire.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"raw_gbps", "llmwire_gbps", "ratio"} <= out.keys()
    assert out["raw_gbps"] > 0 and out["llmwire_gbps"] > 0
