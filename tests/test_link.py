"""llmwire.integrations._link, engine-neutral: the server and client ends
of out-of-band rounds (what Flower's and NVFlare's adapters build on), over
TLS, with string site names as NVFlare has them."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch", reason="the link moves torch state dicts")

from llmwire.integrations._link import LinkClient, LinkError, LinkServer  # noqa: E402
from transport_helpers import tls_contexts  # noqa: E402


def model():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(300, 257, generator=g), "n": torch.ones(16)}


def test_rounds_over_tls_match_fedavg_and_go_down_as_updates(tmp_path):
    client_ctx, server_ctx = tls_contexts(str(tmp_path))
    global_ = model()
    exact = global_["w"].double().clone()
    sites = ["site-1", "site-2"]
    with LinkServer(global_, down="raw", up="raw", ssl=server_ctx, gather_timeout=20) as server:
        for round_ in range(3):
            server.expect(round_, "train", sites)
            links = {s: server.link(round_, "train", s) for s in sites}
            assert links["site-1"]["token"] != links["site-2"]["token"] and links["site-1"]["tls"]
            errors, pulled = {}, {}

            def work(site):
                state = {k: torch.zeros_like(v) for k, v in model().items()}
                try:
                    with LinkClient(links[site], site, state, cache_dir=tmp_path / "cache",
                                    ssl=client_ctx) as link:
                        link.pull()
                        pulled[site] = link.pulled
                        state["w"] += 0.001 * (1 + sites.index(site))
                        link.push(1 + sites.index(site))
                except Exception as exc:  # reported below
                    errors[site] = exc

            threads = [threading.Thread(target=work, args=(s,)) for s in sites]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert set(pulled.values()) == ({"whole"} if round_ == 0 else {"update"})
            record = server.finish(round_, sites)
            assert sorted(record["clients"]) == sites and not record["failed"]
            exact += (1 * 0.001 + 2 * 0.002) / 3
    assert float((global_["w"].double() - exact).abs().max()) < 1e-6
    assert len(server.history) == 3


def test_a_client_without_tls_or_for_another_site_is_refused(tmp_path):
    _, server_ctx = tls_contexts(str(tmp_path))
    with LinkServer(model(), ssl=server_ctx, gather_timeout=1) as server:
        server.expect(0, "train", ["site-1"])
        link = server.link(0, "train", "site-1")
        state = model()
        with pytest.raises(LinkError, match="uses TLS"):
            LinkClient(link, "site-1", state, cache_dir=tmp_path)
        with pytest.raises(LinkError, match="is for node"):
            LinkClient(link, "site-2", state, cache_dir=tmp_path, ssl=object())
        with pytest.raises(LinkError, match="no llmwire link"):
            LinkClient({}, "site-1", state, cache_dir=tmp_path)
        server.finish(0, [])
    with pytest.raises(ValueError, match="purpose"):
        LinkServer(model()).expect(0, "predict", ["site-1"])
