"""Container streaming of state dicts, over memory pairs and real loopback TCP."""

from __future__ import annotations

import asyncio
import os

import msgpack
import numpy as np
import pytest
import torch
from conftest import arun
from safetensors.torch import load_file
from transport_helpers import open_pair

import llmwire
from llmwire import (
    IntegrityError, ManifestError, NonFiniteError, PayloadError, StreamCancelled, TargetMismatch,
)
from llmwire import frames
from llmwire.frames import FrameType
from llmwire.payloads import statedict
from llmwire.protocol import StreamEvent
from llmwire.payloads.manifest import LENGTH_PREFIX, MAX_MANIFEST_BYTES, Manifest
from llmwire.quant.formats import FORMATS
from llmwire.cli.synthetic import llama_state_dict


def model_dict(params: int = 300_000, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = llama_state_dict(params, seed=seed)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied
    sd["step"] = torch.tensor(7)
    sd["mask"] = torch.rand(33) > 0.5
    sd["bf16.weight"] = torch.randn(64, 96).bfloat16()
    sd["t.weight"] = torch.randn(96, 80).t()  # not contiguous
    return sd


async def transfer(sd, *send_args, kind="memory", into=None, **send_kw):
    pair = await open_pair(kind, "/tmp")
    try:
        sent, got = await asyncio.gather(
            llmwire.send_state_dict(pair.client, sd, *send_args, **send_kw),
            llmwire.receive_state_dict(pair.server, into))
    finally:
        await pair.close()
    return sent, got


def max_error(fmt: str, tensor: torch.Tensor) -> float:
    """The largest error a format can make on ``tensor`` (bounds, not tuned)."""
    x = tensor.float()
    if fmt == "raw":
        return 0.0
    if fmt == "fp16":
        return float(x.abs().max()) * 2**-11
    if fmt == "bf16":
        return float(x.abs().max()) * 2**-8
    gap = float(np.diff(FORMATS[fmt].levels).max())
    # restored in the tensor's own dtype: its rounding comes on top
    rounding = {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(tensor.dtype, 0.0)
    return float(x.abs().max()) * (gap / 2 * 1.001 + rounding)


@pytest.mark.parametrize("kind", ["memory", "tcp"])
@pytest.mark.parametrize("fmt", ["raw", "fp16", "bf16", "blockwise8", "nf4", "fp4"])
def test_round_trip_every_format(kind, fmt):
    sd = model_dict()

    async def main():
        sent, got = await transfer(sd, fmt, kind=kind, slice_bytes=64 * 1024)
        assert list(got) == list(sd)
        for name, value in sd.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            if value.dtype in (torch.int64, torch.bool) or value.numel() < 4096:
                assert torch.equal(got[name], value), name
            else:
                err = float((got[name].float() - value.float()).abs().max())
                assert err <= max_error(fmt, value), (name, err)
        assert got["lm_head.weight"] is got["model.embed_tokens.weight"]
        assert sent.entries == len(sd)
        assert sent.formats.get(fmt if fmt != "raw" else "raw", 0) > 0
        if fmt == "nf4":
            assert sent.wire_bytes < 0.2 * sent.tensor_bytes
    arun(main(), timeout=60)


def test_overrides_min_elements_and_nested():
    sd = model_dict()
    manifest, _ = statedict.plan_state_dict(
        sd, "nf4", overrides={"model.layers.0.*": "bf16", "model.norm.weight": "fp16"},
        nested=True, block_size=128)
    specs = {e.name: e.spec for e in manifest.entries}
    assert specs["model.layers.0.mlp.up_proj.weight"].format == "bf16"
    assert specs["model.norm.weight"].format == "fp16"  # an override beats min_elements
    assert specs["model.layers.1.mlp.up_proj.weight"].format == "nf4"
    assert specs["model.layers.1.mlp.up_proj.weight"].nested
    assert specs["model.layers.1.mlp.up_proj.weight"].block_size == 128
    assert specs["model.layers.1.input_layernorm.weight"].format == "raw"  # small
    assert specs["step"].format == "raw" and specs["lm_head.weight"] is None


def test_receive_in_place_writes_into_the_given_tensors():
    sd = model_dict()
    target = {k: torch.zeros_like(v) for k, v in sd.items() if k != "t.weight"}
    target["t.weight"] = torch.zeros(80, 96)  # contiguous twin of the transposed one
    target["lm_head.weight"] = torch.zeros_like(sd["lm_head.weight"])  # not shared here
    before = {k: v.data_ptr() for k, v in target.items()}

    async def main():
        _, got = await transfer(sd, "raw", into=target)
        assert got is target
        assert {k: v.data_ptr() for k, v in target.items()} == before
        for name, value in sd.items():
            assert torch.equal(target[name], value), name
    arun(main())


@pytest.mark.parametrize("problem", ["missing", "shape", "dtype", "uncovered"])
def test_in_place_target_mismatch_touches_nothing(problem):
    # larger than the flow-control window: the sender is still sending when
    # the receiver refuses, so it learns of the refusal
    sd = {"a": torch.randn(2500, 2000), "b": torch.randn(10)}
    target = {k: torch.zeros_like(v) for k, v in sd.items()}
    if problem == "missing":
        del target["b"]
    elif problem == "shape":
        target["a"] = torch.zeros(2500, 1999)
    elif problem == "dtype":
        target["a"] = torch.zeros(2500, 2000, dtype=torch.float64)
    else:
        target["c"] = torch.zeros(3)

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_state_dict(a, sd))
        with pytest.raises(TargetMismatch) as mine:
            await llmwire.receive_state_dict(b, target)
        # the sender is told, with the receiver's reason: never a normal return
        with pytest.raises(llmwire.PayloadRefused) as theirs:
            await send
        assert theirs.value.remote_error == "TargetMismatch"
        assert theirs.value.reason == str(mine.value)
        assert all(not v.any() for v in target.values())
        # the connection survives: a good transfer follows on it
        ok = {"a": sd["a"]}
        _, got = await asyncio.gather(llmwire.send_state_dict(a, ok),
                                      llmwire.receive_state_dict(b))
        assert torch.equal(got["a"], sd["a"])
        await a.close()
        await b.close()
    arun(main())


def test_non_strict_in_place_accepts_a_subset():
    target = {"a": torch.zeros(5), "b": torch.zeros(5)}

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        await asyncio.gather(llmwire.send_state_dict(a, {"a": torch.ones(5)}),
                             llmwire.receive_state_dict(b, target, strict=False))
        assert torch.equal(target["a"], torch.ones(5)) and not target["b"].any()
        await a.close()
        await b.close()
    arun(main())


@pytest.mark.parametrize("fmt", ["raw", "nf4"])
def test_receive_into_safetensors_file(tmp_path, fmt):
    sd = model_dict()
    path = tmp_path / "model.safetensors"

    async def main():
        _, got = await transfer(sd, fmt, kind="tcp", into=str(path), slice_bytes=16384,
                                metadata={"round": "3", "ignored": 5})
        assert got == path and path.exists()
        assert not (tmp_path / "model.safetensors.part").exists()
    arun(main())
    loaded = load_file(path)
    assert set(loaded) == set(sd)
    for name, value in sd.items():
        err = float((loaded[name].float() - value.float()).abs().max())
        assert err <= max_error(fmt, value), name
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"round": "3"}


def test_safetensors_target_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        big = {"x": torch.ones(5_000_000)}  # more than the window: still sending
        send = asyncio.ensure_future(llmwire.send_state_dict(a, big))
        with pytest.raises(llmwire.TargetExists, match="overwrite"):
            await llmwire.receive_state_dict(b, path)
        with pytest.raises(llmwire.PayloadRefused, match="overwrite") as theirs:
            await send
        assert theirs.value.remote_error == "TargetExists"
        assert path.read_bytes() == b"precious"
        await asyncio.gather(llmwire.send_state_dict(a, {"x": torch.ones(4)}),
                             llmwire.receive_state_dict(b, path, overwrite=True))
        assert torch.equal(load_file(path)["x"], torch.ones(4))
        await a.close()
        await b.close()
    arun(main())


def test_iter_yields_entries_in_order_as_they_complete():
    sd = model_dict()

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_state_dict(a, sd, "bf16"))
        names = []
        async for name, tensor in llmwire.iter_state_dict(b):
            names.append(name)
            assert tensor.shape == sd[name].shape
        assert names == list(sd)
        await send
        await a.close()
        await b.close()
    arun(main())


def test_a_corrupted_stream_commits_nothing(tmp_path, monkeypatch):
    """A byte changed after the frame checksum was computed (so frames look
    fine) is caught by the stream digest: no file appears, no dict returns."""
    sd = {"w": torch.randn(300, 300)}
    path = tmp_path / "m.safetensors"

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")

        def bad_end(conn, sid):  # END carries a digest of other bytes
            st = conn._send_stream(sid)
            conn._transition(st, StreamEvent.SEND_END)
            conn._emit(FrameType.END, 0, sid, frames.encode_end(st.length, bytes(16)))
            conn._forget(st)
            return bytes(16)
        monkeypatch.setattr(type(a._conn), "end_stream", bad_end)
        send = asyncio.ensure_future(llmwire.send_state_dict(a, sd))
        with pytest.raises(IntegrityError):
            await llmwire.receive_state_dict(b, path)
        with pytest.raises(IntegrityError):  # the sender hears it: no "done"
            await send
        assert not path.exists() and not list(tmp_path.iterdir())
        await a.close()
        await b.close()
    arun(main())


def test_sender_disconnect_mid_stream_leaves_nothing(tmp_path):
    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MiB: beyond the window
    path = tmp_path / "m.safetensors"

    async def main():
        pair = await open_pair("tcp", str(tmp_path))
        a, b = pair.client, pair.server

        def progress(done, total):
            if done > total // 4:  # the sender's socket vanishes mid-stream
                a._transport.abort()
        send = asyncio.ensure_future(
            llmwire.send_state_dict(a, sd, slice_bytes=65536, progress=progress))
        with pytest.raises(llmwire.ConnectionClosed):
            await llmwire.receive_state_dict(b, path)
        with pytest.raises(llmwire.ConnectionClosed):
            await send
        assert not path.exists() and not [p for p in tmp_path.iterdir() if p.suffix != ".sock"]
        await pair.close()
    arun(main())


def test_receiver_cancel_stops_the_sender():
    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_state_dict(a, sd, slice_bytes=65536))
        async for name, _ in llmwire.iter_state_dict(b):
            break  # the consumer walks away: the stream is cancelled
        with pytest.raises(StreamCancelled):
            await send
        await a.close()
        await b.close()
    arun(main())


def test_nonfinite_raise_names_the_tensor():
    sd = {"ok": torch.randn(8192), "bad": torch.full((8192,), float("inf"))}

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        recv = asyncio.ensure_future(llmwire.receive_state_dict(b))
        with pytest.raises(NonFiniteError) as info:
            await llmwire.send_state_dict(a, sd, "nf4", nonfinite="raise")
        assert info.value.name == "bad"
        with pytest.raises(StreamCancelled):
            await recv
        await a.close()
        await b.close()
    arun(main())


def test_numpy_state_dicts_and_containers():
    sd = {"a": np.random.default_rng(0).standard_normal((64, 70)).astype(np.float32),
          "b": np.arange(10, dtype=np.int32)}

    async def main():
        _, got = await transfer(sd, "fp16")
        assert isinstance(got["a"], torch.Tensor)  # container="torch" by default
        a, b = await llmwire.memory_pair(secret=b"s")
        _, got = await asyncio.gather(llmwire.send_state_dict(a, sd, "fp16"),
                                      llmwire.receive_state_dict(b, container="numpy"))
        assert isinstance(got["a"], np.ndarray) and np.array_equal(got["b"], sd["b"])
        assert np.abs(got["a"] - sd["a"]).max() <= 2**-11 * np.abs(sd["a"]).max()
        await a.close()
        await b.close()
    arun(main())


# ---- hostile manifests ------------------------------------------------------

async def send_raw_body(transport, body: bytes, kind: str = "state_dict"):
    stream = await transport.open_stream({"kind": kind})
    await stream.send(body)
    await stream.end()


def manifest_body(entries, slice_elements=1024, extra=b""):
    packed = msgpack.packb({"version": 1, "slice_elements": slice_elements, "metadata": {},
                            "entries": entries})
    return LENGTH_PREFIX.pack(len(packed)) + packed + extra


GOOD_SPEC = {"format": "raw", "dtype": "float32", "shape": [4], "block_size": 0, "nested": False}


@pytest.mark.parametrize("body", [
    LENGTH_PREFIX.pack(MAX_MANIFEST_BYTES + 1),
    LENGTH_PREFIX.pack(5) + b"\xc1\xc1\xc1\xc1\xc1",
    manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 15}], extra=b"\0" * 15),
    manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 16},
                   {"name": "a", "spec": GOOD_SPEC, "nbytes": 16}]),
    manifest_body([{"name": "a", "tied_to": "nope"}]),
    manifest_body([{"name": "a", "spec": {**GOOD_SPEC, "shape": [-1]}, "nbytes": 0}]),
    manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 16}], slice_elements=2**40),
    manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 16}], extra=b"\0" * 8),
    manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 16}], extra=b"\0" * 24),
    manifest_body([{"name": "", "spec": GOOD_SPEC, "nbytes": 16}]),
    manifest_body("not a list"),
], ids=["too-long", "garbage", "bad-nbytes", "duplicate", "bad-tie", "negative-dim",
        "huge-slices", "short-body", "long-body", "empty-name", "entries-not-list"])
def test_hostile_manifests_are_refused_with_a_clear_error(tmp_path, body):
    path = tmp_path / "m.safetensors"

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        sender = asyncio.ensure_future(send_raw_body(a, body))
        with pytest.raises(ManifestError):
            await llmwire.receive_state_dict(b, path)
        await asyncio.gather(sender, return_exceptions=True)
        assert not list(tmp_path.iterdir())
        await a.close()
        await b.close()
    arun(main())


def test_wrong_stream_kind_is_refused():
    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        await a.send_message({"kind": "object"}, b"x")
        with pytest.raises(ManifestError, match="object"):
            await llmwire.receive_state_dict(b)
        await a.close()
        await b.close()
    arun(main())


def test_max_bytes_refuses_big_state_dicts():
    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_state_dict(a, {"x": torch.ones(1000)}))
        with pytest.raises(PayloadError, match="max_bytes"):
            await llmwire.receive_state_dict(b, max_bytes=3999)
        await asyncio.gather(send, return_exceptions=True)
        await a.close()
        await b.close()
    arun(main())


def test_manifest_round_trip_and_slices_cover_each_entry():
    sd = model_dict()
    manifest, _ = statedict.plan_state_dict(sd, "nf4", nested=True, slice_bytes=4096)
    parsed = Manifest.from_bytes(manifest.to_bytes()[LENGTH_PREFIX.size:])
    assert parsed == manifest
    for entry in parsed.entries:
        if entry.spec is None:
            continue
        slices = list(entry.slices(parsed.slice_elements))
        covered = sum(stop - start for start, stop in slices)
        assert covered == entry.spec.numel
        assert all(start % entry.spec.alignment == 0 for start, _ in slices)


def test_no_leaked_file_descriptors_after_failures(tmp_path):
    body = manifest_body([{"name": "a", "spec": GOOD_SPEC, "nbytes": 16}], extra=b"\0" * 8)

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        for i in range(5):
            sender = asyncio.ensure_future(send_raw_body(a, body))
            with pytest.raises(ManifestError):
                await llmwire.receive_state_dict(b, tmp_path / f"m{i}.safetensors")
            await asyncio.gather(sender, return_exceptions=True)
        await a.close()
        await b.close()
    arun(main())  # warm-up: imports and lazily opened files
    fds = len(os.listdir("/proc/self/fd"))
    arun(main())
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not list(tmp_path.iterdir())
