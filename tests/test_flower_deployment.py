"""One real Flower deployment per mode (SuperLink, two SuperNodes, `flwr run`
on 127.0.0.1), through the bench's harness: stock FedAvg, the mod, the
in-message helpers, out of band. Runs once, in the pass with the C kernels."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch", reason="the Flower app trains torch models")
pytest.importorskip("flwr", reason="needs Flower: pip install 'llmwire[flower]'")

from llmwire.cli.bench import flower as bench  # noqa: E402
from llmwire.cli.bench._tree import descendants  # noqa: E402

PURE = os.environ.get("LLMWIRE_PURE_PYTHON", "") not in ("", "0")


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
def test_every_mode_runs_in_a_real_deployment_and_matches_stock_fedavg():
    before = descendants([os.getpid()])
    result = bench.measure(list(bench.MODES), params=200_000, clients=2, rounds=2,
                           timeout=600)
    rows = {r["mode"]: r for r in result["modes"]}
    assert set(rows) == set(bench.MODES)
    stock = rows["stock"]
    assert stock["max_abs_diff_vs_stock"] == 0.0
    for mode in ("mod", "inmessage", "oob"):
        row = rows[mode]
        # quantized both ways (bf16 or nf4 down, nf4 up) of changes of 1e-3 per element
        assert 0 < row["max_abs_diff_vs_stock"] < 5e-3, mode
        assert row["wire_bytes"] < 0.5 * stock["wire_bytes"], mode
        assert row["serverapp_peak_mib"] > 0 and row["clientapp_peak_mib"] > 0, mode
    for mode in bench.MODES:
        history = rows[mode]["history"]
        assert len([h for h in history if h.get("purpose", "train") == "train"]) == 2, mode
    oob = rows["oob"]["history"]
    assert set(oob[0]["downlink"].values()) == {"whole"}
    assert set(oob[1]["downlink"].values()) == {"update"}
    # every process the deployments started is gone
    assert descendants([os.getpid()]) <= before


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
@pytest.mark.parametrize("row, said", [
    ({"round": 1, "flower_failures": [(7, "RuntimeError: no torch")]}, "node 7: RuntimeError"),
    ({"round": 2, "rejected": [(8, "not an llmwire update")], "flower_failures": []},
     "round 2: 1 update(s) lost (rejected), node 8"),
    ({"round": 1, "failed": [(9, "digest mismatch")]}, "(failed), node 9: digest"),
    ({"round": 1, "flower_failures": [], "no_reply": [3]}, "no reply from nodes [3]"),
])
def test_a_run_that_lost_an_update_is_refused_with_its_reason(row, said):
    # Flower reports such a run "finished:completed" and returns the initial
    # (for stock FedAvg: empty) arrays; the bench must not compare them
    history = [{"round": 0, "purpose": "evaluate", "flower_failures": [(1, "x")]}, row]
    assert said in bench._lost_updates(history)
    assert bench._lost_updates([{"round": 1, "flower_failures": [], "no_reply": []}]) == ""
