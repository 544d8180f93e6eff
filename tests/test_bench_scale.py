"""``llmwire bench scale`` end to end on a small Llama-shaped model (no timing
is asserted), and its checker catching a wrong value."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from llmwire.cli.bench import scale
from llmwire.cli.bench._generated import ARCHS, VerifySink, generated_state_dict
from llmwire.errors import PayloadError
from llmwire.payloads.statedict import plan_state_dict


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    parser = argparse.ArgumentParser()
    scale.add_arguments(parser)
    assert scale.run(parser.parse_args(["--params", "16M", "--runs", "1", "--json", *argv])) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_scale_verify_and_shards(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    # the model written as a sharded checkpoint first, and sent from there lazily
    out = _run(capsys, "--formats", "bf16,nf4", "--source", "checkpoint", "--max-shard-size",
               "12MB", "--checkpoint-dir", str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert out["parameters"] == ARCHS["16M"].params and out["raw_gbps"] > 0
    rows = {row["format"]: row for row in out["runs"]}
    for row in rows.values():
        assert {"format", "params", "bytes", "seconds", "sender_peak_mib",
                "receiver_peak_mib"} <= row.keys()
        assert row["bytes"] == 2 * ARCHS["16M"].params and row["seconds"] > 0
        assert row["checked"]["elements"] == ARCHS["16M"].params
        assert row["source"] == "checkpoint"
    assert rows["bf16"]["checked"]["compared"] == ARCHS["16M"].params  # every element
    assert 0 < rows["nf4"]["checked"]["compared"] < ARCHS["16M"].params  # sampled windows
    assert rows["nf4"]["wire_bytes"] < 0.3 * rows["bf16"]["wire_bytes"]
    # generated in the sender, landed as shards on disk, loaded back and checked
    shards = _run(capsys, "--formats", "bf16", "--receiver", "shards", "--max-shard-size",
                  "12MB", "--workdir", str(tmp_path))
    (row,) = shards["runs"]
    assert row["checked"] == {"elements": ARCHS["16M"].params,
                              "compared": ARCHS["16M"].params, "shards": 3}
    assert list(tmp_path.iterdir()) == []  # loaded back, checked, removed



@pytest.mark.parametrize("fmt", ["raw", "nf4"])
def test_the_checker_catches_a_wrong_value(fmt: str) -> None:
    state = generated_state_dict(ARCHS["16M"])
    manifest, views = plan_state_dict(state, fmt)
    sink = VerifySink(ARCHS["16M"])
    sink.prepare(manifest)
    entry = manifest.entries[0]  # the embedding: 28 M elements
    values = views[entry.name].slice(0, 1 << 16).copy()
    if fmt == "nf4":  # what nf4 restores: the reference decoding, checked in windows
        from llmwire.payloads.slices import carve
        from llmwire.quant import codec
        wire = np.empty(1 << 20, np.uint8)
        parts, _ = carve(wire, entry.spec, values.size)
        codec.encode_slice_into(entry.spec, values, parts)
        codec.decode_slice(entry.spec, parts, values)
    sink.write(entry, 0, values)  # right: accepted
    values[0] ^= 0x0100
    with pytest.raises(PayloadError, match="embed_tokens"):
        sink.write(entry, 0, values)
