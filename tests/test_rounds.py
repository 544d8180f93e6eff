"""Federated rounds: deltas against a named reference, error feedback,
unchanged tensors for free, broadcast-once with slow and vanishing peers,
streaming aggregation of exactly the uploads that verified, round identity.
Over the in-memory pair and real TCP loopback."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from conftest import arun
import llmwire
from llmwire import PayloadRefused, rounds
from llmwire.payloads.manifest import Manifest
from llmwire.quant.codec import TensorSpec, decode_slice, encode_slice_into, make_spec
from llmwire.rounds import ErrorFeedback, Reference, ReferenceMismatch
from transport_helpers import close_pairs, open_pairs

SECRET = b"rounds-secret"


def model(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(512, 96, generator=g).to(dtype),
            "layers.0.weight": torch.randn(256, 192, generator=g).to(dtype),
            "layers.0.bias": torch.randn(192, generator=g).to(dtype),
            "frozen.weight": torch.randn(300, 64, generator=g).to(dtype),
            "steps": torch.tensor([7, 8, 9])}


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def trained(base, seed: int, scale: float = 1e-2):
    """A 'local model': every trainable float tensor moved a little; frozen and ints not."""
    g = torch.Generator().manual_seed(100 + seed)
    out = clone(base)
    for name in ("embed.weight", "layers.0.weight", "layers.0.bias"):
        out[name] = (base[name].float() + scale * torch.randn(base[name].shape, generator=g)
                     ).to(base[name].dtype)
    return out


def bits(state):
    return {k: v.view(torch.int16).clone() if v.dtype == torch.bfloat16 else v.clone()
            for k, v in state.items()}


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(bits(a).values(), bits(b).values()))


# ------------------------------------------------------------ references


def test_reference_digest_is_of_bits_names_and_order_free():
    a = model()
    assert rounds.state_digest(a) == rounds.state_digest(dict(reversed(list(a.items()))))
    b = clone(a)
    b["layers.0.bias"][3] = -b["layers.0.bias"][3]
    assert rounds.state_digest(a) != rounds.state_digest(b)
    c = clone(a)
    c["renamed"] = c.pop("steps")
    assert rounds.state_digest(a) != rounds.state_digest(c)
    ref = Reference.of(a, 4)
    assert Reference.from_wire(ref.to_wire()) == ref


@pytest.mark.parametrize("kind", ["memory", "tcp"])
@pytest.mark.parametrize("wrong", ["round", "bits"])
def test_an_update_of_another_reference_is_refused_before_anything_is_touched(tmp_path, kind,
                                                                             wrong):
    server_state = model()
    ref = Reference.of(server_state, 3)
    client_state = clone(server_state)
    if wrong == "bits":
        client_state["layers.0.weight"][0, 0] += 1.0
        have = Reference.of(client_state, 3)
    else:
        have = Reference(2, ref.digest)
    before = bits(client_state)
    update = {"layers.0.weight": torch.full((256, 192), 0.5).numpy()}

    async def main():
        handles, servers, clients = await open_pairs(kind, 1, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_update(servers, update, clone(server_state), ref, "nf4"),
                rounds.receive_update(clients[0], client_state, have),
                return_exceptions=True)
        finally:
            await close_pairs(handles)

    result, got = arun(main())
    assert isinstance(got, ReferenceMismatch), got
    assert got.theirs == ref and got.ours == have
    assert result.peers[0].status == "failed"
    assert isinstance(result.peers[0].error, PayloadRefused)
    assert "ReferenceMismatch" == result.peers[0].error.remote_error
    assert all(torch.equal(before[k], v) for k, v in bits(client_state).items())


# ------------------------------------------------------------ downlink: same bits everywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["raw", "bf16", "nf4", "blockwise8"])
def test_broadcast_update_leaves_server_and_clients_with_the_same_bits(tmp_path, dtype, fmt):
    global_ = model(dtype=dtype)
    ref = Reference.of(global_, 0)
    copies = [clone(global_) for _ in range(3)]
    update = {name: (0.01 * torch.randn(t.shape)).numpy() for name, t in global_.items()
              if t.is_floating_point() and name != "frozen.weight"}

    async def main():
        handles, servers, clients = await open_pairs("memory", 3, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_update(servers, update, global_, ref, fmt),
                *(rounds.receive_update(c, s, ref) for c, s in zip(clients, copies)))
        finally:
            await close_pairs(handles)

    result, *haves = arun(main())
    assert [p.status for p in result.peers] == ["landed"] * 3
    assert result.reference.round == 1 and all(h == result.reference for h in haves)
    for copy in copies:
        assert same_bits(copy, global_)
    assert result.reference == Reference.of(global_, 1)
    # the update really moved the global, by about what was asked
    moved = (global_["layers.0.weight"].float() - model(dtype=dtype)["layers.0.weight"].float())
    want = torch.from_numpy(update["layers.0.weight"])
    assert float((moved - want).abs().max()) < 0.02 + 0.01 * (fmt in ("nf4",))


def test_unchanged_tensors_carry_no_data(tmp_path):
    """90 % of the model frozen: the update is about 10 % of the bytes, and
    the frozen tensors are manifest lines with nothing behind them."""
    base = {f"frozen.{i}": torch.randn(1024, 64) for i in range(9)}
    base["trained"] = torch.randn(1024, 64)
    local = clone(base)
    local["trained"] += 0.01
    manifest, _ = rounds.plan_delta(local, base, "raw", reference=Reference.of(base, 0))
    modes = {e.name: e.mode for e in manifest.entries}
    assert modes == {**{f"frozen.{i}": "zero" for i in range(9)}, "trained": "delta"}
    assert all(e.nbytes == 0 for e in manifest.entries if e.mode == "zero")
    assert manifest.body_nbytes == 1024 * 64 * 4
    parsed = Manifest.from_bytes(manifest.to_bytes()[8:])
    assert parsed == manifest

    async def main():
        handles, servers, clients = await open_pairs("tcp", 1, tmp_path)
        agg = rounds.Aggregator(base, Reference.of(base, 0))
        try:
            sent, _ = await asyncio.gather(
                rounds.send_update(clients[0], local, base, agg.reference, "raw", client="a"),
                agg.receive(servers[0]))
            return sent, agg.close()
        finally:
            await close_pairs(handles)

    sent, aggregate = arun(main())
    assert sent.unchanged == 9 and sent.deltas == 1
    assert sent.wire_bytes < 0.11 * 10 * 1024 * 64 * 4
    assert not any(aggregate.update[f"frozen.{i}"].any() for i in range(9))
    np.testing.assert_allclose(aggregate.update["trained"], 0.01, rtol=0, atol=1e-6)


# ------------------------------------------------------------ error feedback


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "blockwise8", "bf16"])
def test_error_feedback_residual_against_numpy(fmt):
    """The residual is exactly (delta + old residual) - dequant(quant(...)),
    with the kernels' own encoding, slice by slice."""
    rng = np.random.default_rng(1)
    base = {"w": torch.from_numpy(rng.standard_normal((64, 1024)).astype(np.float32))}
    ref = Reference.of(base, 0)
    feedback = ErrorFeedback()
    expected_residual = np.zeros(64 * 1024, np.float32)
    sent_total = np.zeros(64 * 1024, np.float64)
    true_total = np.zeros(64 * 1024, np.float64)
    for step in range(3):
        local = {"w": base["w"] + torch.from_numpy(
            (1e-3 * rng.standard_normal((64, 1024))).astype(np.float32))}
        manifest, views = rounds.plan_delta(local, base, fmt, reference=ref, feedback=feedback,
                                            slice_bytes=8192)
        entry = manifest.entries[0]
        spec = entry.spec
        view = views["w"]
        wanted_all = (local["w"] - base["w"]).numpy().reshape(-1) + expected_residual
        for start, stop in entry.slices(manifest.slice_elements):
            scratch = np.empty((stop - start) * 4, np.uint8)
            values = view.slice(start, stop, scratch)
            np.testing.assert_array_equal(values, wanted_all[start:stop])
            layout = spec.part_layout(stop - start)
            parts = [np.empty(n, dt) for _, dt, n in layout]
            encode_slice_into(spec, values, parts)
            view.encoded(spec, start, stop, parts, values)
            restored = np.empty(stop - start, np.float32)
            decode_slice(spec, parts, restored)
            expected_residual[start:stop] = wanted_all[start:stop] - restored
            sent_total[start:stop] += restored
        true_total += (local["w"] - base["w"]).numpy().reshape(-1)
        got = feedback.residual("uplink", "w", 64 * 1024)
        np.testing.assert_array_equal(got, expected_residual)
    # telescoping: what was sent plus what is still owed is what was asked
    np.testing.assert_allclose(sent_total + expected_residual, true_total, atol=1e-6)


def test_error_feedback_in_bfloat16_and_reset():
    fb = ErrorFeedback("bfloat16")
    r = fb.residual("p", "w", 10)
    assert r.dtype == np.uint16 and fb.is_zero("p", "w")
    wanted = np.linspace(-1, 1, 10, dtype=np.float32)
    fb.store("p", "w", 10, 0, wanted, np.zeros(10, np.float32))
    assert not fb.is_zero("p", "w")
    out = np.zeros(10, np.float32)
    fb.add_into("p", "w", 0, out)
    np.testing.assert_allclose(out, wanted, atol=2 ** -7)
    assert fb.memory_bytes() == 20
    fb.reset("p")
    assert fb.is_zero("p", "w") and fb.memory_bytes() == 0
    with pytest.raises(llmwire.PayloadError):
        ErrorFeedback("float16")


def test_error_feedback_helps_a_quantized_chain_converge():
    """Over rounds the error-fed sum of nf4 updates tracks the true sum;
    without feedback it drifts by the accumulated quantization error."""
    rng = np.random.default_rng(2)
    base = {"w": torch.zeros(16384)}
    deltas = [torch.from_numpy((1e-3 * rng.standard_normal(16384) + 2e-4).astype(np.float32))
              for _ in range(8)]
    errors = {}
    for use in (False, True):
        fb = ErrorFeedback() if use else None
        got = np.zeros(16384, np.float64)
        for d in deltas:
            manifest, views = rounds.plan_delta({"w": base["w"] + d}, base, "nf4",
                                                reference=Reference(0, "x"), feedback=fb)
            entry, view = manifest.entries[0], views["w"]
            for start, stop in entry.slices(manifest.slice_elements):
                values = view.slice(start, stop, np.empty((stop - start) * 4, np.uint8))
                parts = [np.empty(n, dt) for _, dt, n in entry.spec.part_layout(stop - start)]
                encode_slice_into(entry.spec, values, parts)
                if view.encoded is not None:  # (only with feedback)
                    view.encoded(entry.spec, start, stop, parts, values)
                out = np.empty(stop - start, np.float32)
                decode_slice(entry.spec, parts, out)
                got[start:stop] += out
        errors[use] = np.abs(got - sum(d.numpy().astype(np.float64) for d in deltas)).max()
    assert errors[True] < errors[False] / 2, errors


# ------------------------------------------------------------ aggregation


def fp64_mean(base, locals_, weights):
    total = sum(weights)
    return {name: sum(w * (loc[name].double() - base[name].double())
                      for loc, w in zip(locals_, weights)) / total
            for name in base if base[name].is_floating_point()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_concurrent_uploads_aggregate_to_the_fp64_weighted_mean(tmp_path, dtype):
    base = model()
    ref = Reference.of(base, 5)
    locals_ = [trained(base, i) for i in range(6)]
    weights = [1.0, 2.0, 3.5, 1.0, 0.5, 4.0]

    async def main():
        handles, servers, clients = await open_pairs("tcp", 6, tmp_path)
        agg = rounds.Aggregator(base, ref, dtype=dtype, spool_dir=tmp_path)
        try:
            await asyncio.gather(
                *(rounds.send_update(c, loc, base, ref, "raw", client=f"c{i}", weight=w)
                  for i, (c, loc, w) in enumerate(zip(clients, locals_, weights))),
                *(agg.receive(s) for s in servers))
            return agg.close()
        finally:
            await close_pairs(handles)

    aggregate = arun(main(), timeout=60)
    assert aggregate.clients == {f"c{i}": w for i, w in enumerate(weights)}
    want = fp64_mean(base, locals_, weights)
    tol = 1e-7 if dtype == "float64" else 2e-6
    for name, array in aggregate.update.items():
        np.testing.assert_allclose(array, want[name].numpy(), rtol=0, atol=tol, err_msg=name)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []  # spools are gone


def test_a_client_killed_mid_upload_never_poisons_the_round(tmp_path):
    base = {f"w{i}": torch.randn(1024, 1024) for i in range(6)}  # 24 MiB: many windows
    undone: list[int] = []
    ref = Reference.of(base, 1)
    locals_ = [{k: v + 0.001 * (j + 1) for k, v in base.items()} for j in range(4)]

    async def main():
        handles, servers, clients = await open_pairs("tcp", 4, tmp_path)
        agg = rounds.Aggregator(base, ref, spool_dir=tmp_path)
        real_undo = agg._undo

        async def undo(*args):  # the victim's slices already added are taken back
            undone.append(len(args[2].added))
            return await real_undo(*args)
        agg._undo = undo
        victim = clients[2]

        def cut(done, total):
            if done > total // 4 and not victim.is_closed:
                victim._transport.abort()       # the client process dies mid-upload

        async def doomed():
            return await rounds.send_update(victim, locals_[2], base, ref, "raw",
                                            client="c2", slice_bytes=1 << 18, progress=cut)

        sends = [rounds.send_update(c, locals_[i], base, ref, "raw", client=f"c{i}")
                 for i, c in enumerate(clients) if i != 2]
        results = await asyncio.gather(*sends, doomed(), *(agg.receive(s) for s in servers),
                                       return_exceptions=True)
        try:
            return results, agg.close()
        finally:
            await close_pairs(handles)

    results, aggregate = arun(main(), timeout=60)
    assert sorted(aggregate.clients) == ["c0", "c1", "c3"], results
    assert len(undone) == 1 and undone[0] > 0  # it had added slices: they were taken back
    assert isinstance(results[3], llmwire.ConnectionClosed), results[3]
    want = fp64_mean(base, [locals_[i] for i in (0, 1, 3)], [1.0, 1.0, 1.0])
    for name, array in aggregate.update.items():
        np.testing.assert_allclose(array, want[name].numpy(), rtol=0, atol=1e-6)


def test_stale_duplicate_and_late_uploads_are_refused(tmp_path):
    base = model()
    ref = Reference.of(base, 2)
    local = trained(base, 0)

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        c, s = clients[0], servers[0]
        agg = rounds.Aggregator(base, ref)
        outcomes = []
        try:
            # stale: for round 1
            outcomes.append(await asyncio.gather(
                rounds.send_update(c, local, base, Reference(1, ref.digest), client="a"),
                agg.receive(s), return_exceptions=True))
            # another reference with the right round number
            outcomes.append(await asyncio.gather(
                rounds.send_update(c, local, base, Reference(2, "f" * 32), client="a"),
                agg.receive(s), return_exceptions=True))
            # the real one, then a duplicate
            await asyncio.gather(rounds.send_update(c, local, base, ref, client="a"),
                                 agg.receive(s))
            outcomes.append(await asyncio.gather(
                rounds.send_update(c, local, base, ref, client="a"), agg.receive(s),
                return_exceptions=True))
            agg.close()
            outcomes.append(await asyncio.gather(
                rounds.send_update(c, local, base, ref, client="b"), agg.receive(s),
                return_exceptions=True))
            return outcomes, agg
        finally:
            await close_pairs(handles)

    outcomes, agg = arun(main())
    stale, foreign, dup, late = outcomes
    assert stale[0].remote_error == "StaleRound" and "stale" in stale[0].reason
    assert foreign[0].remote_error == "ReferenceMismatch"
    assert dup[0].remote_error == "DuplicateUpload" and "duplicate" in dup[0].reason
    assert late[0].remote_error == "RoundClosed"
    assert all(isinstance(pair[1], PayloadRefused) for pair in outcomes)
    assert agg.clients == {"a": 1.0}


def test_integer_buffers_must_not_change_in_an_update(tmp_path):
    base = model()
    ref = Reference.of(base, 0)
    local = trained(base, 0)
    local["steps"] = local["steps"] + 1

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        agg = rounds.Aggregator(base, ref)
        try:
            return await asyncio.gather(
                rounds.send_update(clients[0], local, base, ref, client="a"),
                agg.receive(servers[0]), return_exceptions=True), agg
        finally:
            await close_pairs(handles)

    (sent, got), agg = arun(main())
    assert isinstance(got, PayloadRefused) and "'steps'" in str(got)
    assert isinstance(sent, PayloadRefused) and "integer" in sent.reason
    assert agg.weight == 0 and not agg.clients


def test_tied_weights_update_once(tmp_path):
    embed = torch.randn(100, 16)
    original = embed.clone()
    base = {"embed": embed, "head": embed}                  # one storage, two names
    ref = Reference.of(base, 0)
    update = {"embed": np.full((100, 16), 0.25, np.float32)}
    copy_embed = embed.clone()
    copy = {"embed": copy_embed, "head": copy_embed}

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_update(servers, update, base, ref, "raw"),
                rounds.receive_update(clients[0], copy, ref))
        finally:
            await close_pairs(handles)

    result, have = arun(main())
    assert result.landed == [0] and have == result.reference
    assert base["head"].data_ptr() == base["embed"].data_ptr()
    assert torch.equal(copy["head"], copy["embed"]) and torch.equal(copy["embed"], embed)
    assert float((embed - (original + 0.25)).abs().max()) < 1e-6  # applied once, not twice


# ------------------------------------------------------------ broadcast


class SlowReader:
    """A receiver that takes its time: sleeps between reads of the stream."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def __call__(self, transport, state, have):
        stream = await transport.accept_stream()
        real = stream.readinto

        async def slow(buffer):
            await asyncio.sleep(self.delay)
            return await real(buffer)
        stream.readinto = slow
        return await rounds.receive_update(stream, state, have)


@pytest.mark.parametrize("kind", ["memory", "tcp"])
def test_broadcast_sends_one_encoding_to_every_peer(tmp_path, kind):
    state = {f"w{i}": torch.randn(512, 1024) for i in range(4)}
    copies = [clone(state) for _ in range(4)]

    async def main():
        handles, servers, clients = await open_pairs(kind, 4, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_state(servers, state, 7),
                *(rounds.receive_update(c, s, None) for c, s in zip(clients, copies)))
        finally:
            await close_pairs(handles)

    result, *haves = arun(main(), timeout=60)
    assert result.landed == [0, 1, 2, 3]
    assert all(h == result.reference == Reference.of(state, 7) for h in haves)
    body = 4 * 512 * 1024 * 4
    assert [p.sent_bytes for p in result.peers] == [body] * 4 and result.wire_bytes > body


def test_broadcast_encodes_each_slice_once(tmp_path, monkeypatch):
    from llmwire.payloads import slices

    calls = []
    real = slices._encode_job

    def counting(spec, view, start, stop, parts, scratch):
        calls.append((view.name if hasattr(view, "name") else id(view), start))
        return real(spec, view, start, stop, parts, scratch)
    monkeypatch.setattr(slices, "_encode_job", counting)
    global_ = {"w": torch.randn(1024, 1024)}
    ref = Reference.of(global_, 0)
    copies = [clone(global_) for _ in range(5)]
    update = {"w": np.full((1024, 1024), 1e-3, np.float32)}

    async def main():
        handles, servers, clients = await open_pairs("memory", 5, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_update(servers, update, global_, ref, "nf4",
                                        slice_bytes=1 << 18),
                *(rounds.receive_update(c, s, ref) for c, s in zip(clients, copies)))
        finally:
            await close_pairs(handles)

    result, *_ = arun(main())
    assert result.landed == [0, 1, 2, 3, 4]
    assert len(calls) == len(set(calls)) == (1024 * 1024) // (1 << 16)


@pytest.mark.parametrize("kind", ["memory", "tcp"])
def test_a_slow_peer_holds_back_by_its_window_or_is_dropped(tmp_path, kind):
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(6)}   # 24 MiB
    copies = [clone(state) for _ in range(3)]

    async def run(policy):
        handles, servers, clients = await open_pairs(kind, 3, tmp_path)
        try:
            return await asyncio.gather(
                rounds.broadcast_state(servers, state, 1, policy=policy,
                                       progress_timeout=0.3 if policy == "drop" else None,
                                       window=2),
                rounds.receive_update(clients[0], copies[0], None),
                SlowReader(0.6 if policy == "drop" else 0.002)(clients[1], copies[1], None),
                rounds.receive_update(clients[2], copies[2], None),
                return_exceptions=True)
        finally:
            await close_pairs(handles)

    waited = arun(run("wait"), timeout=60)
    assert waited[0].landed == [0, 1, 2], waited
    dropped = arun(run("drop"), timeout=60)
    result = dropped[0]
    assert [p.status for p in result.peers] == ["landed", "dropped", "landed"], result
    assert isinstance(dropped[2], llmwire.StreamCancelled), dropped[2]
    assert same_bits(copies[0], state) and same_bits(copies[2], state)


def test_a_peer_that_disconnects_leaves_the_others_alone(tmp_path):
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(6)}
    copies = [clone(state) for _ in range(3)]

    async def main():
        handles, servers, clients = await open_pairs("tcp", 3, tmp_path)

        async def vanishing():
            stream = await clients[1].accept_stream()
            await stream.readinto(bytearray(1 << 20))
            clients[1]._transport.abort()

        try:
            return await asyncio.gather(
                rounds.broadcast_state(servers, state, 1, window=2),
                rounds.receive_update(clients[0], copies[0], None), vanishing(),
                rounds.receive_update(clients[2], copies[2], None), return_exceptions=True)
        finally:
            await close_pairs(handles)

    result, *_ = arun(main(), timeout=60)
    assert [p.status for p in result.peers] == ["landed", "failed", "landed"], result
    assert isinstance(result.peers[1].error, llmwire.ConnectionClosed)
    assert same_bits(copies[0], state) and same_bits(copies[2], state)


def test_whole_weights_for_a_client_that_missed_rounds(tmp_path):
    global_ = model()
    stale = clone(global_)
    stale["layers.0.bias"] += 1.0
    stale_ref = Reference.of(stale, 3)

    async def main():
        handles, servers, clients = await open_pairs("memory", 1, tmp_path)
        try:
            hello = asyncio.ensure_future(rounds.read_announce(servers[0]))
            await rounds.announce(clients[0], "late", stale_ref)
            client, have = await hello
            assert client == "late" and have == stale_ref
            result, got = await asyncio.gather(rounds.broadcast_state(servers, global_, 5),
                                               rounds.receive_update(clients[0], stale, have))
            return result, got
        finally:
            await close_pairs(handles)

    result, got = arun(main())
    assert got == result.reference == Reference.of(global_, 5) and same_bits(stale, global_)


def test_plain_receivers_refuse_updates(tmp_path):
    base = model()
    local = trained(base, 0)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(
                rounds.send_update(a, local, base, Reference.of(base, 0), client="x"),
                llmwire.receive_state_dict(b), return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(got, PayloadRefused) and "update" in str(got)
    assert isinstance(sent, PayloadRefused)


def test_update_manifests_are_validated():
    spec = make_spec("float32", (4,), "raw").to_header()
    import msgpack
    bad = [
        {"version": 1, "slice_elements": 4, "metadata": {}, "reference": {"round": 0,
                                                                         "digest": "d"},
         "entries": []},
        {"version": 2, "slice_elements": 4, "metadata": {}, "reference": {"round": -1,
                                                                         "digest": "d"},
         "entries": []},
        {"version": 2, "slice_elements": 4, "metadata": {},
         "entries": [{"name": "a", "spec": spec, "nbytes": 16, "mode": "delta",
                      "dtype": "int64"}]},
        {"version": 2, "slice_elements": 4, "metadata": {},
         "entries": [{"name": "a", "spec": spec, "nbytes": 16, "mode": "sideways"}]},
        {"version": 2, "slice_elements": 4, "metadata": {},
         "entries": [{"name": "a", "spec": make_spec("float32", (4,), "nf4").to_header(),
                      "nbytes": 0, "mode": "zero"}]},
        {"version": 1, "slice_elements": 4, "metadata": {},
         "entries": [{"name": "a", "spec": spec, "nbytes": 0, "mode": "zero"}]},
    ]
    for body in bad:
        with pytest.raises(llmwire.ManifestError):
            Manifest.from_bytes(msgpack.packb(body))
    ok = Manifest.from_bytes(msgpack.packb(
        {"version": 2, "slice_elements": 4, "metadata": {},
         "entries": [{"name": "a", "spec": TensorSpec("raw", "int64", (3,)).to_header(),
                      "nbytes": 0, "mode": "zero"}]}))
    assert ok.entries[0].mode == "zero" and ok.body_nbytes == 0


def test_the_rounds_docs_example_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "rounds.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "async def main" in c]
    code = code.replace("llmwire.run(main())", "llmwire.run(asyncio.wait_for(main(), 30))")
    exec(compile(code, "docs/rounds.md", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out
    assert "every client holds the server's global: True" in out
    assert out.count("landed at [0, 1]") == 2 and "1 tensor(s) unchanged" in out
