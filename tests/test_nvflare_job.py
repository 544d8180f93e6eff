"""The filters in a real NVFlare job (FedJob.simulator_run: a server and two
client processes over CellNet on localhost), wired by add_filters with NVFlare's
own FedAvg controller and Client API. The final global model file is checked
against the expected FedAvg of the clients' (deterministic) updates: this run
fails if a filter never runs (tasks "*"), corrupts shared task data, or drops
what a client sent. Runs once, in the pass with the C kernels."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the job trains torch models")
pytest.importorskip("nvflare", reason="needs NVFlare: pip install 'llmwire[nvflare]'")

PURE = os.environ.get("LLMWIRE_PURE_PYTHON", "") not in ("", "0")
HERE = Path(__file__).with_name("nvflare_job")


def _net():
    sys.path.insert(0, str(HERE))
    try:
        import net
    finally:
        sys.path.remove(str(HERE))
    return net


def _expected(net, rounds):
    """FedAvg of the clients' diffs, weighted by their steps (10, 20)."""
    model = {k: v.double().clone() for k, v in net.Net().state_dict().items()}
    for round_ in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in model.items()}
        for site, weight in ((1, 10), (2, 20)):
            for name, value in model.items():
                total[name] += weight * net.update(site, round_, name, value.float()).double()
        for name in model:
            model[name] += total[name] / 30
    return model


def _job(name, controller, script, sites):
    from nvflare import FedJob
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    job = FedJob(name=name, min_clients=len(sites))
    job.to_server(controller, id="controller")
    job.to_server(PTFileModelPersistor(model=_net().Net(), allow_numpy_conversion=False),
                  id="persistor")
    for site in sites:
        job.to(ScriptRunner(script=str(HERE / script), framework=FrameworkType.PYTORCH,
                            server_expected_format=ExchangeFormat.PYTORCH), site,
               tasks=["train"])
    job.to(str(HERE / "net.py"), sites[0])  # shipped with the job, beside the script
    return job


def _check_final(workspace, rounds, tolerance, quantized=True):
    final = workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    got = torch.load(final, weights_only=True)["model"]
    want = _expected(_net(), rounds)
    assert set(got) == set(want)
    for name, value in want.items():
        error = float((got[name].double() - value).abs().max())
        assert torch.isfinite(got[name]).all(), name
        assert error < tolerance, (name, error)
        if quantized and value.dim() > 1:
            assert error > 0, f"{name}: exact, so the update was never quantized"


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
def test_filters_in_a_simulated_job_match_fedavg_of_the_clients_updates(tmp_path, monkeypatch):
    from nvflare.app_common.workflows.fedavg import FedAvg

    from llmwire.integrations.nvflare import add_filters

    monkeypatch.setenv("LLMWIRE_NVFLARE_CACHE", str(tmp_path / "cache"))  # the sites' globals
    rounds, sites = 2, ["site-1", "site-2"]
    job = _job("llmwire_filters", FedAvg(num_clients=2, num_rounds=rounds), "client.py", sites)
    add_filters(job, sites, tasks=["train"], weights="bf16", diffs="nf4")
    rc = job.simulator_run(str(tmp_path), threads=2)
    assert not rc, f"simulator_run returned {rc}"
    # nf4 deltas of 0.01-scale noise: ~1e-3 per round; bf16 weights: ~4e-3
    _check_final(tmp_path, rounds, 5e-3)
    log = (tmp_path / "server" / "log.txt").read_text()
    for site in sites:  # round 0 whole (bf16), round 1 the nf4 delta against it
        assert f"llmwire downlink to {site}: whole" in log
        assert f"llmwire downlink to {site}: update" in log


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
def test_out_of_band_job_matches_fedavg_and_sends_deltas_down(tmp_path, monkeypatch):
    from llmwire.integrations.nvflare import OutOfBandFedAvg

    monkeypatch.setenv("LLMWIRE_NVFLARE_CACHE", str(tmp_path / "cache"))
    rounds, sites = 3, ["site-1", "site-2"]
    # raw both ways, so the result is FedAvg's to float32 rounding (nf4's
    # quality: tests/test_rounds.py, docs/learning.md, llmwire bench nvflare)
    job = _job("llmwire_oob", OutOfBandFedAvg(num_clients=2, num_rounds=rounds, down="raw",
                                              up="raw", gather_timeout=30),
               "client_oob.py", sites)
    rc = job.simulator_run(str(tmp_path / "ws"), threads=2)
    assert not rc, f"simulator_run returned {rc}"
    _check_final(tmp_path / "ws", rounds, 1e-5, quantized=False)
    log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert "round 0: 2 of 2 updates" in log and "(site-1: whole, site-2: whole)" in log
    for round_ in range(1, rounds):  # the sites hold the last global: the mean update
        assert f"round {round_}: 2 of 2 updates" in log
    assert log.count("(site-1: update, site-2: update)") == rounds - 1
