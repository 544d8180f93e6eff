"""``llmwire bench nvflare``'s harness on a tiny model: real simulator jobs,
stock, llmwire's filters (sites sending weights, as_diff, and the downlink
as deltas) and out of band (their finals agree with stock's to nf4's error;
llmwire moves far fewer bytes), NVFlare's own nf4 filter on this CPU-only
machine reported as the failure it is (not a job that "completed" with
nothing aggregated), and every process stopped. Runs once, in the pass with
the C kernels."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch", reason="the jobs train torch models")
pytest.importorskip("nvflare", reason="needs NVFlare: pip install 'llmwire[nvflare]'")

from llmwire.cli.bench import nvflare as bench  # noqa: E402
from llmwire.cli.bench._tree import descendants  # noqa: E402

PURE = os.environ.get("LLMWIRE_PURE_PYTHON", "") not in ("", "0")


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
def test_stock_filters_and_out_of_band_jobs_and_nvflares_nf4_failure_on_a_cpu_site():
    before = descendants([os.getpid()])
    result = bench.measure(["stock", "nvflare-nf4", "filters", "oob"], params=200_000,
                           clients=2, rounds=2, timeout=300)
    rows = {r["mode"]: r for r in result["modes"]}
    stock, nf4, filters, oob = (rows[m] for m in ("stock", "nvflare-nf4", "filters", "oob"))
    for row in (stock, filters, oob):
        assert row["ok"], (row["mode"], row["error"])
        for key in ("seconds", "server_peak_mib", "client_peak_mib", "tree_peak_mib"):
            assert row[key] > 0, (row["mode"], key)
        assert row["tree_peak_mib"] > row["server_peak_mib"] + row["client_peak_mib"]
    model = 4 * 200_000  # about: the synthetic model's fp32 bytes
    assert stock["down_bytes"] == stock["up_bytes"] > 2 * 2 * 0.9 * model  # 2 sites x 2 rounds
    assert stock["max_abs_diff_vs_stock"] == 0.0
    for row in (filters, oob):
        assert row["wire_bytes"] < 0.5 * stock["wire_bytes"], row["mode"]
        assert 0 < row["max_abs_diff_vs_stock"] < 5e-3, row["mode"]  # nf4 of 1e-3 changes
    # round 2's downlink is an nf4 delta: far less than round 1's bf16 global
    assert filters["down_bytes"] < 0.75 * stock["down_bytes"] / 2
    # bitsandbytes missing, or CUDA missing: either way no update arrived
    assert not nf4["ok"] and nf4["error"] and nf4["seconds"] is None
    assert "bitsandbytes" in nf4["error"] or "CUDA" in nf4["error"], nf4["error"]
    assert descendants([os.getpid()]) <= before
