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


def _expected(initial, rounds):
    """FedAvg of the clients' diffs, weighted by their steps (10, 20)."""
    model = {k: v.double().clone() for k, v in initial.items()}
    for round_ in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in model.items()}
        for site, weight in ((1, 10), (2, 20)):
            for name, value in model.items():
                g = torch.Generator().manual_seed(1000 * site + 10 * round_ + len(name))
                if value.dim() > 1:
                    total[name] += weight * 0.01 * torch.randn(value.shape, generator=g).double()
        for name in model:
            model[name] += total[name] / 30
    return model


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
def test_filters_in_a_simulated_job_match_fedavg_of_the_clients_updates(tmp_path):
    from nvflare import FedJob
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from llmwire.integrations.nvflare import add_filters

    sys.path.insert(0, str(HERE))
    try:
        from net import Net
    finally:
        sys.path.remove(str(HERE))
    rounds, sites = 2, ["site-1", "site-2"]
    job = FedJob(name="llmwire_filters", min_clients=2)
    job.to_server(FedAvg(num_clients=2, num_rounds=rounds), id="controller")
    job.to_server(PTFileModelPersistor(model=Net(), allow_numpy_conversion=False),
                  id="persistor")
    for site in sites:
        job.to(ScriptRunner(script=str(HERE / "client.py"), framework=FrameworkType.PYTORCH,
                            server_expected_format=ExchangeFormat.PYTORCH), site,
               tasks=["train"])
    job.to(str(HERE / "net.py"), sites[0])  # shipped with the job, beside client.py
    add_filters(job, sites, tasks=["train"], weights="bf16", diffs="nf4")
    rc = job.simulator_run(str(tmp_path), threads=2)
    assert not rc, f"simulator_run returned {rc}"
    final = tmp_path / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    got = torch.load(final, weights_only=True)["model"]
    want = _expected(Net().state_dict(), rounds)
    for name, value in want.items():
        error = float((got[name].double() - value).abs().max())
        assert torch.isfinite(got[name]).all(), name
        # nf4 deltas of 0.01-scale noise: ~1e-3 per round; the filters ran (not exact)
        assert error < 5e-3, (name, error)
        if value.dim() > 1:
            assert error > 0, f"{name}: exact, so the filters never ran"
