"""What lands is exactly what was sent, or nothing (docs/streaming.md,
"Guarantees"): one transfer per target, links never followed, the verdict
taken on the bytes on disk, sources that change refused, the sender told.

Real TCP loopback where two connections race; real files throughout.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from conftest import arun
import llmwire
from llmwire import (
    FileIntegrityError, FileWriteError, IntegrityError, PayloadRefused, SourceChanged,
    TargetBusy, UnsafeFileName,
)
from llmwire.checkpoints import open_checkpoint
from llmwire.payloads.files import FileResult, receive_file, send_file
from transport_helpers import open_pair

SECRET = b"landing-secret"
MiB = 1 << 20


def make_file(path: pathlib.Path, size: int, seed: int) -> pathlib.Path:
    block = bytes((i * 131 + seed * 7) % 251 for i in range(1 << 16))
    with open(path, "wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[:min(len(block), size - start)])
    return path


def digest(path: pathlib.Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


async def serve_each(handler):
    """A TCP server running ``handler(transport)`` per connection; results in order."""
    results: list = []

    async def run(t):
        try:
            results.append(await handler(t))
        except Exception as exc:
            results.append(exc)

    srv = await llmwire.serve(run, "127.0.0.1", 0, secret=SECRET)
    return srv, results


async def wait_for(condition, what: str, tries: int = 1000) -> None:
    for _ in range(tries):  # bounded: 10 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------- one owner per target


@pytest.mark.parametrize("same_content", [True, False], ids=["same", "different"])
def test_two_senders_of_one_name_never_mix(tmp_path, same_content):
    """The second sender of a name in flight is refused (TargetBusy); the first
    lands byte for byte; nothing else ever touched its .part."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_file(tmp_path / "a" / "x.bin", 24 * MiB, seed=1)
    b = make_file(tmp_path / "b" / "x.bin", 24 * MiB, seed=1 if same_content else 2)
    dest = tmp_path / "dest"
    dest.mkdir()

    async def main():
        srv, results = await serve_each(lambda t: receive_file(t, dest))
        try:
            first_done = asyncio.Event()
            slow = []

            def progress(done, total):  # hold the first transfer open a while
                if done >= 4 * MiB and not slow:
                    slow.append(True)
                    first_done.set()

            ca = await llmwire.connect("127.0.0.1", srv.port, secret=SECRET)
            cb = await llmwire.connect("127.0.0.1", srv.port, secret=SECRET)
            first = asyncio.ensure_future(send_file(ca, a, chunk=256 * 1024,
                                                    progress=progress))
            await first_done.wait()
            with pytest.raises(TargetBusy) as busy:
                await send_file(cb, b)
            assert "another transfer" in busy.value.reason
            sent = await first
            await ca.close()
            await cb.close()
            await wait_for(lambda: len(results) == 2, "both receivers")
            return sent, results
        finally:
            await srv.close()

    sent, results = arun(main(), timeout=60)
    landed = [r for r in results if isinstance(r, FileResult)]
    refused = [r for r in results if isinstance(r, TargetBusy)]
    assert len(landed) == 1 and len(refused) == 1, results
    assert landed[0].digest == sent.digest == digest(a) == digest(dest / "x.bin")
    assert listing(dest) == ["x.bin"]


def test_two_state_dicts_into_one_safetensors_target(tmp_path):
    target = tmp_path / "model.safetensors"
    big = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(12)}   # 48 MiB
    other = {f"w{i}": torch.full((1024, 1024), -1.0) for i in range(12)}

    async def main():
        srv, results = await serve_each(lambda t: llmwire.receive_state_dict(t, target))
        try:
            halfway = asyncio.Event()

            def progress(done, total):
                if done >= total // 4:
                    halfway.set()

            ca = await llmwire.connect("127.0.0.1", srv.port, secret=SECRET)
            cb = await llmwire.connect("127.0.0.1", srv.port, secret=SECRET)
            first = asyncio.ensure_future(llmwire.send_state_dict(
                ca, big, slice_bytes=256 * 1024, progress=progress))
            await halfway.wait()
            with pytest.raises(PayloadRefused) as busy:
                await llmwire.send_state_dict(cb, other)
            assert busy.value.remote_error == "TargetBusy"
            sent = await first
            await ca.close()
            await cb.close()
            await wait_for(lambda: len(results) == 2, "both receivers")
            return sent, results
        finally:
            await srv.close()

    sent, results = arun(main(), timeout=60)
    assert sum(isinstance(r, TargetBusy) for r in results) == 1, results
    assert sent.receipt["digest"] == digest(target)
    loaded = load_file(target)
    assert all(torch.equal(loaded[k], v) for k, v in big.items())
    assert listing(tmp_path) == ["model.safetensors"]


def test_a_foreign_write_to_the_part_is_caught_by_the_on_disk_verdict(tmp_path):
    """The bytes that crossed the network were right; the file was not:
    nothing is placed, both sides hear FileIntegrityError."""
    src = make_file(tmp_path / "x.bin", 6 * MiB, seed=3)
    dest = tmp_path / "dest"
    dest.mkdir()

    def vandal(done, total):
        if done >= 3 * MiB:
            with open(dest / "x.bin.part", "r+b") as f:  # another process's write
                f.write(b"\0" * 100)

    async def main():
        pair = await open_pair("tcp", str(tmp_path))
        try:
            return await asyncio.gather(send_file(pair.client, src, chunk=MiB),
                                        receive_file(pair.server, dest, progress=vandal),
                                        return_exceptions=True)
        finally:
            await pair.close()

    sent, got = arun(main())
    assert isinstance(got, FileIntegrityError) and isinstance(sent, FileIntegrityError), \
        (sent, got)
    assert listing(dest) == []


def test_a_foreign_write_to_a_safetensors_part_is_caught(tmp_path):
    target = tmp_path / "m.safetensors"
    sd = {f"w{i}": torch.randn(512, 512) for i in range(4)}

    def vandal(done, total):
        if done >= total // 2:
            with open(str(target) + ".part", "r+b") as f:
                f.seek(200)
                f.write(b"\xff" * 64)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(
                llmwire.send_state_dict(a, sd, slice_bytes=65536),
                llmwire.receive_state_dict(b, target, progress=vandal), return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(got, IntegrityError) and isinstance(sent, IntegrityError), (sent, got)
    assert "read back" in str(got)
    assert not target.exists() and listing(tmp_path) == []


# ------------------------------------------------------- links


def test_a_planted_part_link_is_never_followed_by_a_state_dict(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (out / "m.safetensors.part").symlink_to(victim)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(
                llmwire.send_state_dict(a, {"w": torch.ones(100)}, header={"name": "m"}),
                llmwire.receive_state_dict(b, llmwire.SafetensorsSink(out / "m.safetensors",
                                                                      root=out)),
                return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(got, UnsafeFileName) and "symlink" in got.reason, got
    assert isinstance(sent, UnsafeFileName), sent
    assert victim.read_bytes() == b"precious"
    assert not (out / "m.safetensors").exists()
    assert (out / "m.safetensors.part").is_symlink()


def test_a_linked_directory_below_the_root_is_not_followed(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(
                llmwire.send_state_dict(a, {"w": torch.ones(100)}, header={"name": "sub/m"}),
                llmwire.receive_state_dict(b, llmwire.SafetensorsSink(
                    out / "sub" / "m.safetensors", root=out)), return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(got, UnsafeFileName) and isinstance(sent, UnsafeFileName), (sent, got)
    assert list(elsewhere.iterdir()) == []


# ------------------------------------------------------- sources that change


def test_a_file_truncated_while_it_is_sent_is_source_changed(tmp_path):
    """No SIGBUS (the sender never maps its source), and no file lands."""
    src = make_file(tmp_path / "x.bin", 16 * MiB, seed=4)
    dest = tmp_path / "dest"
    dest.mkdir()

    def shrink(done, total):
        if done >= 2 * MiB and src.stat().st_size == total:
            os.truncate(src, 3 * MiB)

    async def main():
        pair = await open_pair("tcp", str(tmp_path))
        try:
            return await asyncio.gather(send_file(pair.client, src, chunk=MiB, progress=shrink),
                                        receive_file(pair.server, dest),
                                        return_exceptions=True)
        finally:
            await pair.close()

    sent, got = arun(main())
    assert isinstance(sent, SourceChanged), sent
    assert "ends at byte" in str(sent) or "size" in str(sent)
    assert not isinstance(got, FileResult) and not (dest / "x.bin").exists(), got


def test_a_file_rewritten_in_place_while_it_is_sent_is_source_changed(tmp_path):
    src = make_file(tmp_path / "x.bin", 8 * MiB, seed=5)
    dest = tmp_path / "dest"
    dest.mkdir()

    def rewrite(done, total):
        if done == MiB:  # same size, other bytes: only mtime/ctime say so
            with open(src, "r+b") as f:
                f.write(b"\x01" * MiB)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(send_file(a, src, chunk=MiB, progress=rewrite),
                                        receive_file(b, dest), return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(sent, SourceChanged) and "modified" in str(sent), sent
    assert not (dest / "x.bin").exists()


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_a_checkpoint_rewritten_during_a_send_is_refused(tmp_path, kind):
    """The realistic case: training saves the checkpoint again while it is sent."""
    old = {f"layer{i}.weight": torch.randn(512, 512) for i in range(8)}
    new = {k: v + 1 for k, v in old.items()}
    path = tmp_path / f"ckpt.{kind}"
    save = (lambda sd: torch.save(sd, path)) if kind == "pt" else \
        (lambda sd: save_file(sd, str(path)))
    save(old)
    target = tmp_path / "out.safetensors"
    checkpoint = open_checkpoint(path)

    def resave(done, total):
        if done >= total // 3 and not hasattr(resave, "done"):
            resave.done = True
            save(new)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(
                llmwire.send_state_dict(a, checkpoint, "nf4", slice_bytes=65536,
                                        progress=resave),
                llmwire.receive_state_dict(b, target), return_exceptions=True)
        finally:
            await a.close()
            await b.close()
            checkpoint.close()

    sent, got = arun(main())
    assert isinstance(sent, SourceChanged), sent
    assert isinstance(got, llmwire.StreamCancelled), got
    assert not target.exists() and listing(tmp_path) == [path.name]


def test_an_unchanged_checkpoint_streams_without_being_loaded(tmp_path):
    sd = {"a": torch.randn(300, 257), "b": torch.arange(7), "c": torch.randn(64).bfloat16(),
          "d": torch.randn(5000, dtype=torch.float64)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            with open_checkpoint(path) as checkpoint:
                return await asyncio.gather(llmwire.send_state_dict(a, checkpoint, "nf4"),
                                            llmwire.receive_state_dict(b))
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert sent.kept_raw == ("d",)              # float64: the format cannot take it
    assert torch.equal(got["d"], sd["d"]) and torch.equal(got["b"], sd["b"])
    assert got["c"].dtype == torch.bfloat16
    assert (got["a"] - sd["a"]).abs().max() <= 0.2 * sd["a"].abs().max()


# ------------------------------------------------------- disk space


def test_an_offer_larger_than_the_free_space_is_refused_up_front(tmp_path, monkeypatch):
    from llmwire.payloads import landing

    src = make_file(tmp_path / "x.bin", 2 * MiB, seed=6)
    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(landing, "free_bytes", lambda fd: MiB)

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(send_file(a, src), receive_file(b, dest),
                                        return_exceptions=True)
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert isinstance(got, FileWriteError) and got.errno == errno.ENOSPC, got
    assert isinstance(sent, FileWriteError) and sent.errno == errno.ENOSPC, sent
    assert "needed" in str(sent)
    assert listing(dest) == []


def test_a_stray_sidecar_without_its_part_is_harmless(tmp_path):
    import json

    from llmwire.payloads.files import file_id

    src = make_file(tmp_path / "x.bin", MiB, seed=7)
    dest = tmp_path / "dest"
    dest.mkdir()
    st = src.stat()
    # A sidecar that claims half the file, for this very version, but no .part
    (dest / "x.bin.part.json").write_text(json.dumps(
        {"version": 1, "offset": MiB // 2, "id": file_id("x.bin", st.st_size, st.st_mtime_ns),
         "name": "x.bin", "size": st.st_size, "mtime_ns": st.st_mtime_ns}))

    async def main():
        a, b = await llmwire.memory_pair(secret=SECRET)
        try:
            return await asyncio.gather(send_file(a, src), receive_file(b, dest))
        finally:
            await a.close()
            await b.close()

    sent, got = arun(main())
    assert got.resumed_from == 0 and digest(dest / "x.bin") == digest(src)
    assert listing(dest) == ["x.bin"]


# ------------------------------------------------------- found by review


def test_leaving_iter_state_dict_early_tells_the_sender_at_once(tmp_path):
    """Breaking out of the loop (the iterator closed by contextlib.aclosing, as
    documented) and returning at once still cancels the stream and answers
    the sender first."""
    import contextlib

    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}

    async def main():
        pair = await open_pair("tcp", str(tmp_path))
        try:
            async def walk_away():
                async with contextlib.aclosing(llmwire.iter_state_dict(pair.server)) as it:
                    async for _ in it:
                        break
                await pair.server.close()
            sent, _ = await asyncio.gather(
                llmwire.send_state_dict(pair.client, sd, slice_bytes=65536), walk_away(),
                return_exceptions=True)
            return sent
        finally:
            await pair.close()

    sent = arun(main())
    assert isinstance(sent, llmwire.StreamCancelled), sent
    assert "stopped reading" in sent.reason


def test_a_tensor_named_metadata_cannot_travel(tmp_path):
    with pytest.raises(llmwire.PayloadError, match="__metadata__"):
        llmwire.plan_state_dict({"__metadata__": torch.zeros(3)})
    with pytest.raises(llmwire.PayloadError, match="1 to"):
        llmwire.plan_state_dict({"": torch.zeros(3)})


def test_checkpoint_load_refuses_a_file_changed_while_it_is_read(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"a": torch.randn(100), "b": torch.randn(100)}, path)
    with open_checkpoint(path) as checkpoint:
        loaded = checkpoint.load()
        assert torch.equal(loaded["a"], torch.load(path)["a"])
        with open(path, "r+b") as f:  # rewritten in place after the layout was read
            f.seek(0, 2)
            f.write(b"\0")
        with pytest.raises(SourceChanged):
            checkpoint.load()
        with pytest.raises(SourceChanged):
            checkpoint["a"].load()


# --- the read-back that trails the writes --------------------------------------------

def test_trailing_digest_reads_back_what_was_written_as_it_is_written(tmp_path):
    from llmwire.payloads.landing import TrailingDigest

    data = os.urandom(3 * 4096 + 123)
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        trailing = TrailingDigest(fd, len(data), block=4096)
        try:
            for pos in range(0, len(data), 1000):   # writes that straddle blocks
                os.pwrite(fd, data[pos:pos + 1000], pos)
                trailing.advance(min(pos + 1000, len(data)))
            assert trailing.digest() == xxhash.xxh3_128_hexdigest(data)
        finally:
            trailing.close()
    finally:
        os.close(fd)


def test_trailing_digest_of_a_short_file_is_an_error_and_close_stops_it(tmp_path):
    from llmwire.payloads.landing import TrailingDigest

    fd = os.open(tmp_path / "y.part", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"abc", 0)
        short = TrailingDigest(fd, 10, block=4)
        try:
            with pytest.raises(OSError, match="ends at byte 3"):
                short.digest()
        finally:
            short.close()
        idle = TrailingDigest(fd, 1 << 20)          # never advanced: close ends it
        idle.close()
        assert not idle._thread.is_alive()
    finally:
        os.close(fd)
