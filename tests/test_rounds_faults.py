"""Federated rounds under hostile or failing peers: tied weights in the
aggregator, uploads that are not finite or would overflow the sums, weights
out of range, cancellations while a failure is answered, peers that stall or
never answer, a spool that cannot be opened, error feedback's reset rules.
Over real TCP loopback unless the in-memory pair says enough."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
import torch

from conftest import arun
import llmwire
from llmwire import PayloadRefused, rounds
from llmwire.payloads.statedict import STREAM_KIND
from llmwire.rounds import ErrorFeedback, Reference, aggregate
from transport_helpers import close_pairs, open_pairs


def nonzero(agg: rounds.Aggregator) -> int:
    return sum(int(np.count_nonzero(a)) for a in {id(a): a for a in agg.sums.values()}.values())


def upload_once(tmp, agg, local, base, ref, kind: str = "memory", **send):
    """One client's ``send_update`` against ``agg.receive``, over one pair:
    ``(what the client got, what the server got)``, exceptions returned."""
    async def main():
        handles, servers, clients = await open_pairs(kind, 1, tmp)
        try:
            return await asyncio.wait_for(asyncio.gather(
                rounds.send_update(clients[0], local, base, ref, send.pop("fmt", "raw"),
                                   client=send.pop("client", "a"), **send),
                agg.receive(servers[0]), return_exceptions=True), 20)
        finally:
            await close_pairs(handles)
    return arun(main())


def tied_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(512, 64, generator=g)
    return {"embed.weight": embed, "layer.weight": torch.randn(128, 64, generator=g),
            "lm_head.weight": embed}  # one storage, two names (SmolLM2, Llama-style)


# ------------------------------------------------------------ tied weights


@pytest.mark.parametrize("fmt", ["raw", "nf4"])
def test_the_aggregator_takes_a_model_with_tied_weights(tmp_path, fmt):
    base = tied_model()
    ref = Reference.of(base, 0)
    locals_ = []
    for i in range(2):
        embed = base["embed.weight"] + 0.01 * (i + 1)
        locals_.append({"embed.weight": embed, "layer.weight": base["layer.weight"] - 0.01,
                        "lm_head.weight": embed})

    async def main():
        handles, servers, clients = await open_pairs("tcp", 2, tmp_path)
        agg = rounds.Aggregator(base, ref)
        try:
            sent = await asyncio.gather(
                *(rounds.send_update(c, loc, base, ref, fmt, client=f"c{i}")
                  for i, (c, loc) in enumerate(zip(clients, locals_))),
                *(agg.receive(s) for s in servers))
            return sent, agg.close()
        finally:
            await close_pairs(handles)

    sent, mean = arun(main(), timeout=60)
    assert sorted(mean.clients) == ["c0", "c1"]
    assert np.shares_memory(mean.update["embed.weight"], mean.update["lm_head.weight"])
    atol = 1e-6 if fmt == "raw" else 2e-3
    np.testing.assert_allclose(mean.update["embed.weight"], np.full((512, 64), 0.015), atol=atol)
    np.testing.assert_allclose(mean.update["layer.weight"], np.full((128, 64), -0.01),
                               atol=atol)
    assert sent[0].deltas == 2  # the tied name travels as a tie, not a third delta


def test_a_tie_the_reference_does_not_have_is_refused(tmp_path):
    x = torch.randn(256, 64)
    server = {"a": x.clone(), "b": x.clone()}  # equal bits, distinct tensors
    client = {"a": x, "b": x}                   # the same digest, but tied
    ref = Reference.of(server, 0)
    assert Reference.of(client, 0) == ref
    local = {"a": x + 1.0}
    local["b"] = local["a"]

    agg = rounds.Aggregator(server, ref)
    sent, got = upload_once(tmp_path, agg, local, client, ref, client="x")
    assert isinstance(got, llmwire.TargetMismatch) and "distinct" in str(got)
    assert isinstance(sent, PayloadRefused) and sent.remote_error == "TargetMismatch"
    assert nonzero(agg) == 0 and not agg.clients


def test_an_applied_update_must_tie_what_the_receiver_ties_and_only_that(tmp_path):
    x = torch.randn(256, 64)
    ref = Reference.of({"a": x, "b": x}, 0)
    update = {"a": np.full((256, 64), 0.5, np.float32), "b": np.full((256, 64), 0.5, np.float32)}

    async def send(server_state, client_state):
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        before = {k: v.clone() for k, v in client_state.items()}
        try:
            result, got = await asyncio.gather(
                rounds.broadcast_update(servers, update, server_state, ref, "raw"),
                rounds.receive_update(clients[0], client_state, ref), return_exceptions=True)
        finally:
            await close_pairs(handles)
        return result, got, all(torch.equal(before[k], client_state[k]) for k in before)

    # the server ties a and b, the receiver holds them apart: the tie would copy one over
    server = x.clone()
    result, got, untouched = arun(send({"a": server, "b": server},
                                       {"a": x.clone(), "b": x.clone()}))
    assert isinstance(got, llmwire.TargetMismatch) and "distinct" in str(got) and untouched
    assert result.peers[0].status == "failed"
    # the server holds them apart, the receiver ties them: both deltas would land on one
    y = x.clone()
    result, got, untouched = arun(send({"a": x.clone(), "b": x.clone()}, {"a": y, "b": y}))
    assert isinstance(got, llmwire.TargetMismatch) and "shares storage" in str(got)
    assert untouched


# ------------------------------------------------------------ values the sums cannot take


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_an_upload_of_values_the_sums_cannot_take_is_refused_and_taken_back(tmp_path, bad):
    n = 1 << 18
    base = {"w0": torch.zeros(n), "w1": torch.zeros(n)}
    ref = Reference.of(base, 0)
    honest = {k: v + 1e-3 for k, v in base.items()}
    victim = {"w0": base["w0"] + 0.5, "w1": base["w1"] + 0.5}
    victim["w1"][n // 2] = {"nan": float("nan"), "inf": float("inf"), "huge": 3e38}[bad]

    async def main():
        handles, servers, clients = await open_pairs("tcp", 2, tmp_path)
        agg = rounds.Aggregator(base, ref)
        try:
            out = await asyncio.gather(
                rounds.send_update(clients[0], honest, base, ref, "raw", client="honest"),
                rounds.send_update(clients[1], victim, base, ref, "raw", client="victim",
                                   slice_bytes=1 << 16),
                *(agg.receive(s) for s in servers), return_exceptions=True)
            return out, agg.close()
        finally:
            await close_pairs(handles)

    (_, refused, _, raised), mean = arun(main(), timeout=60)
    assert isinstance(raised, rounds.NonFiniteUpdate), raised
    assert isinstance(refused, PayloadRefused) and refused.remote_error == "NonFiniteUpdate"
    assert mean.clients == {"honest": 1.0}
    for array in mean.update.values():  # w0 was added whole, then taken back out:
        # to the float32 rounding of 1e-3 + 0.5 - 0.5 (half an ulp of 0.5)
        np.testing.assert_allclose(array, 1e-3, rtol=0, atol=3e-8)


@pytest.mark.parametrize("weight", [1e39, 2.0 ** 63, aggregate.MAX_WEIGHT * 2, -1.0])
def test_weights_out_of_range_are_refused_before_anything_is_added(tmp_path, weight):
    base = {"w": torch.zeros(1024)}
    ref = Reference.of(base, 0)

    agg = rounds.Aggregator(base, ref)
    sent, got = upload_once(tmp_path, agg, {"w": base["w"] + 1}, base, ref, weight=weight)
    assert isinstance(got, PayloadRefused) and "weight" in str(got)
    assert isinstance(sent, PayloadRefused) and nonzero(agg) == 0


def test_client_names_are_bounded(tmp_path):
    base = {"w": torch.zeros(16)}
    ref = Reference.of(base, 0)

    sent, got = upload_once(tmp_path, rounds.Aggregator(base, ref), {"w": base["w"] + 1}, base,
                            ref, client="x" * (aggregate.MAX_CLIENT_NAME + 1))
    assert isinstance(got, PayloadRefused) and "characters" in str(got)


def test_float64_sums_hold_weight_times_value_in_float64(tmp_path):
    base = {"w": torch.zeros(4096)}
    ref = Reference.of(base, 0)
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(4096, generator=g) * 1e-3 for _ in range(2)]
    weights = [0.1, 0.3]

    async def main():
        handles, servers, clients = await open_pairs("memory", 2, tmp_path)
        agg = rounds.Aggregator(base, ref, dtype="float64")
        try:
            await asyncio.gather(
                *(rounds.send_update(c, {"w": base["w"] + d}, base, ref, "raw", client=f"c{i}",
                                     weight=w)
                  for i, (c, d, w) in enumerate(zip(clients, deltas, weights))),
                *(agg.receive(s) for s in servers))
            return agg.sums["w"].copy()
        finally:
            await close_pairs(handles)

    sums = arun(main())
    want = sum(w * d.numpy().astype(np.float64) for w, d in zip(weights, deltas))
    np.testing.assert_array_equal(sums, want)  # two terms: the order cannot matter


# ------------------------------------------------------------ failures while answering


def test_a_second_cancel_while_the_failure_is_answered_still_undoes(tmp_path, monkeypatch):
    real_reply = aggregate.reply_quietly

    async def slow_reply(*args, **kwargs):  # a peer whose window is full: the reply waits
        await asyncio.sleep(0.2)
        return await real_reply(*args, **kwargs)
    monkeypatch.setattr(aggregate, "reply_quietly", slow_reply)
    m = 1 << 20
    base = {"w0": torch.zeros(m), "w1": torch.zeros(m)}
    ref = Reference.of(base, 0)

    async def main():
        handles, servers, clients = await open_pairs("tcp", 1, tmp_path)
        agg = rounds.Aggregator(base, ref)
        send = asyncio.ensure_future(rounds.send_update(
            clients[0], {k: v + 1.0 for k, v in base.items()}, base, ref, "raw", client="v",
            slice_bytes=1 << 16))
        recv = asyncio.ensure_future(agg.receive(servers[0]))
        try:
            for _ in range(20000):
                if agg.sums["w0"].any():
                    break
                await asyncio.sleep(0.0005)
            recv.cancel()
            await asyncio.sleep(0.05)  # inside the failure reply now
            recv.cancel()
            await asyncio.gather(recv, return_exceptions=True)
            return agg, agg.close()
        finally:
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
            await close_pairs(handles)

    agg, mean = arun(main(), timeout=60)
    assert agg.sums["w0"].size and nonzero(agg) == 0 and mean.clients == {}


def test_a_spool_that_cannot_be_opened_is_a_verdict_not_a_wedge(tmp_path):
    base = {"w": torch.zeros(1024)}
    ref = Reference.of(base, 0)

    agg = rounds.Aggregator(base, ref, spool_dir=tmp_path / "missing")
    sent, got = upload_once(tmp_path, agg, {"w": base["w"] + 1}, base, ref, kind="tcp")
    assert isinstance(got, llmwire.PayloadError) and "spool" in str(got)
    assert isinstance(sent, llmwire.PayloadError) and "spool" in str(sent)
    assert agg.close().clients == {}  # not wedged: nothing "still arriving"


def test_a_broken_aggregator_answers_every_upload(tmp_path):
    base = {"w": torch.zeros(1024)}
    ref = Reference.of(base, 0)

    agg = rounds.Aggregator(base, ref)
    agg._broken = "an undo missed 1 slice"  # what a failed undo leaves
    sent, got = upload_once(tmp_path, agg, {"w": base["w"] + 1}, base, ref, kind="tcp")
    assert isinstance(got, rounds.AggregationError)
    assert isinstance(sent, llmwire.PayloadError) and "undo" in str(sent)


def test_spool_files_are_closed(tmp_path):
    base = {"w": torch.zeros(4096)}
    ref = Reference.of(base, 0)

    async def main():
        handles, servers, clients = await open_pairs("memory", 3, tmp_path)
        agg = rounds.Aggregator(base, ref)
        before = len(os.listdir("/proc/self/fd"))
        try:
            await asyncio.gather(
                *(rounds.send_update(c, {"w": base["w"] + 1}, base, ref, "raw", client=f"c{i}")
                  for i, c in enumerate(clients)),
                *(agg.receive(s) for s in servers))
            return before, len(os.listdir("/proc/self/fd"))
        finally:
            await close_pairs(handles)

    before, after = arun(main())
    assert after <= before


# ------------------------------------------------------------ peers that stall


async def _stall(transport, base, ref, name: str) -> None:
    """Open an upload, send its manifest and 1 KB, then nothing."""
    manifest, _ = rounds.plan_delta({"w": base["w"] + 1}, base, "raw", reference=ref)
    stream = await transport.open_stream({"kind": STREAM_KIND, "id": uuid.uuid4().hex,
                                          "round": ref.round, "client": name, "weight": 1.0})
    await stream.send(manifest.to_bytes())
    await stream.send(b"\0" * 1024)
    await asyncio.sleep(3600)


def test_stalled_uploads_give_their_slots_up_after_the_progress_timeout(tmp_path):
    base = {"w": torch.zeros(1 << 18)}
    ref = Reference.of(base, 0)

    async def main():
        handles, servers, clients = await open_pairs("tcp", 3, tmp_path)
        agg = rounds.Aggregator(base, ref, concurrency=2, progress_timeout=0.4)
        stalls = [asyncio.ensure_future(_stall(clients[i], base, ref, f"slow{i}"))
                  for i in range(2)]
        receives = [asyncio.ensure_future(agg.receive(s)) for s in servers]
        try:
            await asyncio.sleep(0.1)  # both slots taken by the stalled uploads
            honest = await asyncio.wait_for(rounds.send_update(
                clients[2], {"w": base["w"] + 0.5}, base, ref, "raw", client="honest"), 10)
            got = await asyncio.gather(*receives, return_exceptions=True)
            return honest, got, agg.close()
        finally:
            for task in stalls:
                task.cancel()
            await asyncio.gather(*stalls, return_exceptions=True)
            await close_pairs(handles)

    honest, got, mean = arun(main(), timeout=60)
    assert isinstance(got[0], rounds.UploadStalled) and isinstance(got[1], rounds.UploadStalled)
    assert mean.clients == {"honest": 1.0}
    np.testing.assert_array_equal(mean.update["w"], np.full(1 << 18, 0.5, np.float32))
    with pytest.raises(llmwire.PayloadError):
        rounds.Aggregator(base, ref, progress_timeout=0)


async def _reads_all_never_answers(transport) -> None:
    stream = await transport.accept_stream()
    await stream.read_all(1 << 30)
    await asyncio.sleep(3600)


async def _never_accepts(transport) -> None:
    await asyncio.sleep(3600)


@pytest.mark.parametrize("bad", [_reads_all_never_answers, _never_accepts])
def test_drop_drops_a_peer_that_never_answers(tmp_path, bad):
    m = 1 << 18  # small: everything fits in the send window
    g = {f"w{i}": torch.zeros(m) for i in range(2)}
    ref = Reference.of(g, 0)
    copies = [{k: v.clone() for k, v in g.items()} for _ in range(2)]
    update = {k: np.full(m, 1e-3, np.float32) for k in g}

    async def main():
        handles, servers, clients = await open_pairs("tcp", 3, tmp_path)
        stuck = asyncio.ensure_future(bad(clients[1]))
        try:
            return await asyncio.wait_for(asyncio.gather(
                rounds.broadcast_update(servers, update, g, ref, "nf4", policy="drop",
                                        progress_timeout=0.4),
                rounds.receive_update(clients[0], copies[0], ref),
                rounds.receive_update(clients[2], copies[1], ref)), 20)
        finally:
            stuck.cancel()
            await asyncio.gather(stuck, return_exceptions=True)
            await close_pairs(handles)

    result, *haves = arun(main(), timeout=60)
    assert [p.status for p in result.peers] == ["landed", "dropped", "landed"]
    assert all(h == result.reference for h in haves)


def test_the_broadcast_keeps_the_window_it_is_given(tmp_path, monkeypatch):
    from llmwire.payloads import slices
    from llmwire.rounds import broadcast

    pools = []
    real = broadcast.SliceEncoder

    def recording(*args, **kwargs):
        pools.append(kwargs.get("buffers"))
        return real(*args, **kwargs)
    monkeypatch.setattr(broadcast, "SliceEncoder", recording)
    state = {"w": torch.randn(1024)}

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            await asyncio.gather(rounds.broadcast_state(servers, state, 0, window=3),
                                 rounds.receive_update(clients[0], dict(state), None))
        finally:
            await close_pairs(handles)

    arun(main())
    assert pools == [slices.PIPELINE_DEPTH + 3]


def test_a_client_that_holds_other_bits_after_the_update_is_diverged(tmp_path, monkeypatch):
    g = {"w": torch.zeros(4096)}
    ref = Reference.of(g, 0)
    copy = {"w": g["w"].clone()}
    monkeypatch.setattr(rounds.ApplySink, "receipt",
                        lambda self: {"round": 1, "digest": "0" * 32})

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_update(servers, {"w": np.ones(4096, np.float32)}, g, ref,
                                        "raw"),
                rounds.receive_update(clients[0], copy, ref))
        finally:
            await close_pairs(handles)

    result, _ = arun(main())
    assert result.peers[0].status == "failed"
    assert isinstance(result.peers[0].error, rounds.Diverged)


def test_a_concurrent_upload_under_the_same_name_is_a_duplicate(tmp_path):
    base = {"w": torch.zeros(1 << 16)}
    ref = Reference.of(base, 0)

    async def main():
        handles, servers, clients = await open_pairs("tcp", 2, tmp_path)
        agg = rounds.Aggregator(base, ref)
        first = asyncio.ensure_future(_stall(clients[0], base, ref, "a"))
        receives = [asyncio.ensure_future(agg.receive(servers[0]))]
        try:
            await asyncio.sleep(0.1)  # "a" is being received
            second = await asyncio.gather(
                rounds.send_update(clients[1], {"w": base["w"] + 1}, base, ref, "raw",
                                   client="a"),
                agg.receive(servers[1]), return_exceptions=True)
            return second
        finally:
            first.cancel()
            for task in receives:
                task.cancel()
            await asyncio.gather(first, *receives, return_exceptions=True)
            await close_pairs(handles)

    sent, got = arun(main())
    assert isinstance(sent, PayloadRefused) and sent.remote_error == "DuplicateUpload"


# ------------------------------------------------------------ non-finite broadcasts


def test_broadcast_update_raise_checks_before_anything_is_applied(tmp_path):
    g = {"a": torch.ones(100_000), "b": torch.ones(100_000)}
    ref = Reference.of(g, 0)
    update = {"a": np.full(100_000, 0.5, np.float32), "b": np.full(100_000, 0.5, np.float32)}
    update["b"][77] = np.nan

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            with pytest.raises(llmwire.NonFiniteError) as info:
                await rounds.broadcast_update(servers, update, g, ref, "nf4", nonfinite="raise")
            with pytest.raises(asyncio.TimeoutError):  # nothing was sent
                await asyncio.wait_for(clients[0].accept_stream(), 0.3)
            return info.value
        finally:
            await close_pairs(handles)

    error = arun(main())
    assert error.count == 1 and error.name == "b"
    assert Reference.of(g, 0) == ref  # the server's global is untouched


# ------------------------------------------------------------ error feedback's rules


def _encode(state, base, fmt, ef, ref):
    """Plan and encode an update to nobody: what a send would leave in ``ef``."""
    manifest, views = rounds.plan_delta(state, base, fmt, reference=ref, feedback=ef)

    async def go():
        await rounds.broadcast_planned([], manifest, views)
    arun(go())
    return manifest


def test_a_residual_cleared_slice_by_slice_counts_as_zero_again():
    base = {"w": torch.zeros(1 << 16)}
    ref = Reference.of(base, 0)
    ef = ErrorFeedback()
    local = {"w": base["w"] + torch.linspace(-1e-2, 1e-2, 1 << 16)}
    _encode(local, base, "nf4", ef, ref)
    assert not ef.is_zero("uplink", "w")
    _encode(local, base, "raw", ef, ref)  # raw drops nothing: every slice is cleared
    assert ef.is_zero("uplink", "w")
    manifest = _encode(dict(base), base, "nf4", ef, ref)
    assert [e.mode for e in manifest.entries] == ["zero"] and manifest.body_nbytes == 0


def test_a_non_finite_value_leaves_no_residual():
    base = {"w": torch.zeros(4096)}
    ref = Reference.of(base, 0)
    ef = ErrorFeedback()
    local = {"w": base["w"] + 1e-3}
    local["w"][5] = float("nan")
    _encode(local, base, "nf4", ef, ref)
    residual = ef.residual("uplink", "w", 4096)
    assert np.isfinite(residual).all()


def test_whole_weights_reset_the_clients_error_feedback(tmp_path):
    state = {"w": torch.randn(4096)}
    copy = {"w": torch.zeros(4096)}
    ef = ErrorFeedback()
    ef.residual("uplink", "w", 4096)[:] = 1.0
    ef.store("uplink", "w", 4096, 0, np.ones(4096, np.float32), np.zeros(4096, np.float32))
    assert not ef.is_zero("uplink", "w")

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            return await asyncio.gather(rounds.broadcast_state(servers, state, 3),
                                        rounds.receive_update(clients[0], copy, None,
                                                              feedback=ef))
        finally:
            await close_pairs(handles)

    arun(main())
    assert ef.is_zero("uplink", "w") and ef.memory_bytes() == 0


def test_a_refused_upload_resets_the_uplink_residual(tmp_path):
    base = {"w": torch.zeros(4096)}
    ref = Reference.of(base, 0)
    ef = ErrorFeedback()

    agg = rounds.Aggregator(base, Reference(1, ref.digest))  # another round: refused
    sent, _ = upload_once(tmp_path, agg, {"w": base["w"] + 1e-3}, base, ref, fmt="nf4",
                          feedback=ef)
    assert isinstance(sent, PayloadRefused) and sent.remote_error == "StaleRound"
    assert ef.memory_bytes("uplink") == 0
