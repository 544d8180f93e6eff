"""File streaming: round trips, hostile names, overwrite, resume, integrity,
disk full, cancel from either side, and no leaked descriptors or tasks.

Runs over the in-memory pair and real TCP loopback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pathlib
import re
import tempfile

import pytest

from conftest import arun
from llmwire.errors import (
    ConnectionClosed,
    FileIntegrityError,
    FileTransferError,
    FileWriteError,
    LlmwireError,
    TargetExists,
    TransferInterrupted,
    TransferRefused,
    UnsafeFileName,
)
from llmwire.payloads import files
from llmwire.payloads.files import FileResult, check_file_name, file_id, receive_file, send_file
from transport_helpers import open_pair

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = ["memory", "tcp"]
MiB = 1 << 20


def _fd_count() -> int:
    return len(_fds())


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor
            pass
    return out


@pytest.fixture(scope="module")
def warm_loop():
    # The first event loop of a process opens a pipe that outlives it (uvloop).
    arun(asyncio.to_thread(lambda: None))


@pytest.fixture(autouse=True)
def no_leaked_fds(warm_loop):
    before = _fds()
    yield
    after = _fds()
    assert after.keys() <= before.keys(), \
        f"file descriptors leaked: {[after[k] for k in after.keys() - before.keys()]}"


def make_file(path: pathlib.Path, size: int, seed: int = 0) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytes((i * 31 + seed) % 251 for i in range(65536)) + os.urandom(1024)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    return path


async def with_pair(kind: str, tmp: pathlib.Path, body):
    """Run ``body(client, server)`` on a fresh pair; close it; check no task is left."""
    before = asyncio.all_tasks()
    handle = await open_pair(kind, str(tmp))
    try:
        return await body(handle.client, handle.server)
    finally:
        await handle.close()
        for _ in range(5):
            await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        assert not left, f"tasks leaked: {left}"


async def both(send_coro, recv_coro):
    """Run a sender and a receiver together; return both results or exceptions."""
    return await asyncio.gather(send_coro, recv_coro, return_exceptions=True)


def listing(directory: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def dirs(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    return tmp_path, src, dest


# --------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size,window,chunk", [
    (0, files.DEFAULT_WINDOW, files.DEFAULT_CHUNK),
    (1, files.DEFAULT_WINDOW, files.DEFAULT_CHUNK),
    (65537, 65536, 10000),                      # odd chunks across window edges
    (3 * MiB + 17, MiB, 300_001),
    (50_000_000, files.DEFAULT_WINDOW, files.DEFAULT_CHUNK),
])
def test_round_trip_byte_identical(kind, size, window, chunk, dirs):
    tmp, src, dest = dirs
    path = make_file(src / "model.bin", size, seed=size % 7)
    seen = []

    async def body(c, s):
        return await both(send_file(c, path, window=window, chunk=chunk),
                          receive_file(s, dest, progress=lambda d, t: seen.append((d, t))))

    sent, got = arun(with_pair(kind, tmp, body), timeout=30)
    assert isinstance(sent, FileResult) and isinstance(got, FileResult), (sent, got)
    assert (dest / "model.bin").read_bytes() == path.read_bytes()
    assert sent.digest == got.digest and len(got.digest) == 32
    assert sent.size == got.size == size
    assert sent.bytes_transferred == got.bytes_transferred == size
    assert sent.resumed_from == got.resumed_from == 0
    assert got.path == str(dest / "model.bin")
    assert listing(dest) == ["model.bin"]
    if size:
        assert seen[-1] == (size, size)


@pytest.mark.parametrize("kind", KINDS)
def test_subdirectories_and_digest_matches_a_one_shot_hash(kind, dirs):
    import xxhash

    tmp, src, dest = dirs
    path = make_file(src / "w.bin", 123_457)

    async def body(c, s):
        return await both(send_file(c, path, name="layers/0/w.bin"), receive_file(s, dest))

    sent, got = arun(with_pair(kind, tmp, body))
    assert got.path == str(dest / "layers" / "0" / "w.bin")
    assert (dest / "layers/0/w.bin").read_bytes() == path.read_bytes()
    assert got.digest == xxhash.xxh3_128_hexdigest(path.read_bytes())


def test_several_files_on_one_connection(dirs):
    tmp, src, dest = dirs
    paths = [make_file(src / f"f{i}", 1000 * i + 1, seed=i) for i in range(4)]

    async def body(c, s):
        async def sender():
            return [await send_file(c, p) for p in paths]

        async def receiver():
            return [await receive_file(s, dest) for _ in paths]

        return await asyncio.gather(sender(), receiver())

    arun(with_pair("memory", tmp, body))
    for p in paths:
        assert (dest / p.name).read_bytes() == p.read_bytes()


def test_receive_with_an_already_accepted_offer_stream(dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x.bin", 5000)

    async def body(c, s):
        async def dispatcher():
            stream = await s.accept_stream()
            assert stream.header["kind"] == "file-offer"
            return await receive_file(s, dest, stream=stream)

        return await both(send_file(c, path), dispatcher())

    sent, got = arun(with_pair("memory", tmp, body))
    assert got.digest == sent.digest
    assert (dest / "x.bin").read_bytes() == path.read_bytes()


# --------------------------------------------------------------------- names

@pytest.mark.parametrize("name", [
    "/etc/passwd", "..", "../x", "a/../../b", "a/./b", ".", "", "a//b", "a/",
    "a\x00b", "a\nb", "..\\..\\x", "C:x", "c:/x", "x.part", "d/x.part.json",
    "a" * 256, "/".join(["a"] * 3000), 7, None,
])
def test_check_file_name_refuses(name):
    with pytest.raises(UnsafeFileName):
        check_file_name(name)


@pytest.mark.parametrize("name", ["a", "a/b/c.bin", "...", "..a", "a..", "é/ü.bin",
                                  "model.safetensors", "x.partial", ".hidden"])
def test_check_file_name_accepts(name):
    assert "/".join(check_file_name(name)) == name


@pytest.mark.parametrize("name", ["/abs/x", "..", "a/../../b", "a\x00b", "", ".", "x/./y"])
def test_receiver_refuses_hostile_offers(name, dirs):
    """A hostile sender (bypassing send_file's own check) gets file-refuse; nothing is written."""
    tmp, src, dest = dirs

    async def body(c, s):
        fid = file_id(name, 10, 0)
        await c.send_message({"kind": "file-offer", "name": name, "size": 10,
                              "mtime_ns": 0, "id": fid})
        with pytest.raises(UnsafeFileName) as err:
            await receive_file(s, dest)
        reply = await c.receive_message()
        assert reply.header["kind"] == "file-refuse" and reply.header["id"] == fid
        return str(err.value), reply.header["reason"]

    message, reason = arun(with_pair("memory", tmp, body))
    assert reason and "refused" in message
    assert listing(dest) == []
    assert listing(tmp) == ["dest", "src"]


def test_sender_refuses_hostile_name_locally(dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x", 10)

    async def body(c, s):
        with pytest.raises(UnsafeFileName):
            await send_file(c, path, name="../x")

    arun(with_pair("memory", tmp, body))


@pytest.mark.parametrize("kind", KINDS)
def test_symlink_escape_refused(kind, dirs):
    tmp, src, dest = dirs
    outside = tmp / "outside"
    outside.mkdir()
    (dest / "link").symlink_to(outside)
    path = make_file(src / "x", 100)

    async def body(c, s):
        return await both(send_file(c, path, name="link/x"), receive_file(s, dest))

    sent, got = arun(with_pair(kind, tmp, body))
    assert isinstance(got, UnsafeFileName), got
    assert isinstance(sent, UnsafeFileName) and "symlink" in sent.reason, sent
    assert list(outside.iterdir()) == []


def test_symlink_inside_target_not_followed_either(dirs):
    """Links below the target directory are never followed, even ones that stay
    inside it: a check of where a link leads races with its use."""
    tmp, src, dest = dirs
    (dest / "real").mkdir()
    (dest / "alias").symlink_to(dest / "real")
    path = make_file(src / "x", 100)

    async def body(c, s):
        return await both(send_file(c, path, name="alias/x"), receive_file(s, dest))

    sent, got = arun(with_pair("memory", tmp, body))
    assert isinstance(got, UnsafeFileName) and isinstance(sent, UnsafeFileName), (sent, got)
    assert list((dest / "real").iterdir()) == []


def test_planted_part_symlink_is_not_followed(dirs):
    tmp, src, dest = dirs
    victim = tmp / "victim"
    victim.write_bytes(b"precious")
    (dest / "x.part").symlink_to(victim)
    path = make_file(src / "x", 100)

    async def body(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent, got = arun(with_pair("memory", tmp, body))
    assert isinstance(got, UnsafeFileName) and "symlink" in got.reason, got
    assert isinstance(sent, UnsafeFileName), sent
    assert victim.read_bytes() == b"precious"
    assert not (dest / "x").exists() and (dest / "x.part").is_symlink()


# --------------------------------------------------------------------- overwrite

@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_refused_unless_asked(kind, dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x", 5000)
    (dest / "x").write_bytes(b"old")

    async def body(c, s):
        first = await both(send_file(c, path), receive_file(s, dest))
        assert (dest / "x").read_bytes() == b"old"
        second = await both(send_file(c, path), receive_file(s, dest, overwrite=True))
        return first, second

    (sent, got), (sent2, got2) = arun(with_pair(kind, tmp, body))
    assert isinstance(got, TargetExists) and isinstance(got, FileExistsError), got
    assert isinstance(sent, TransferRefused) and "exists" in sent.reason, sent
    assert isinstance(got2, FileResult), got2
    assert (dest / "x").read_bytes() == path.read_bytes()
    assert listing(dest) == ["x"]


# --------------------------------------------------------------------- resume

def _interrupt_after(nbytes: int, transport_ref: list):
    """A progress callback that drops the connection once ``nbytes`` went out."""
    def progress(done: int, total: int) -> None:
        if done >= nbytes and transport_ref:
            transport_ref.pop()._transport.abort()
    return progress


def _interrupted_transfer(kind, tmp, path, dest, at: int):
    async def body(c, s):
        return await both(send_file(c, path, window=MiB, chunk=256 * 1024,
                                    progress=_interrupt_after(at, [c])),
                          receive_file(s, dest))
    return arun(with_pair(kind, tmp, body))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_dropped_connection(kind, dirs):
    tmp, src, dest = dirs
    size = 8 * MiB + 12345
    path = make_file(src / "big.bin", size)
    sent, got = _interrupted_transfer(kind, tmp, path, dest, at=3 * MiB)
    assert isinstance(sent, TransferInterrupted), sent
    assert isinstance(got, TransferInterrupted), got
    assert "interrupted" in str(got) and got.name == "big.bin"
    assert not (dest / "big.bin").exists()
    assert (dest / "big.bin.part").exists()
    record = json.loads((dest / "big.bin.part.json").read_text())
    assert record["offset"] == got.offset > 0
    assert (dest / "big.bin.part").stat().st_size == got.offset
    assert (dest / "big.bin.part").read_bytes() == path.read_bytes()[:got.offset]

    async def again(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent2, got2 = arun(with_pair(kind, tmp, again))
    assert isinstance(sent2, FileResult) and isinstance(got2, FileResult), (sent2, got2)
    assert sent2.resumed_from == got2.resumed_from == got.offset > 0
    assert sent2.bytes_transferred == got2.bytes_transferred == size - got.offset < size
    assert (dest / "big.bin").read_bytes() == path.read_bytes()
    assert listing(dest) == ["big.bin"]
    import xxhash
    assert got2.digest == sent2.digest == xxhash.xxh3_128_hexdigest(path.read_bytes())


def test_changed_source_does_not_resume(dirs):
    tmp, src, dest = dirs
    path = make_file(src / "big.bin", 4 * MiB)
    sent, got = _interrupted_transfer("memory", tmp, path, dest, at=MiB)
    assert isinstance(got, TransferInterrupted) and got.offset > 0
    path.write_bytes(path.read_bytes()[::-1])  # new content, new mtime: a new id

    async def again(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent2, got2 = arun(with_pair("memory", tmp, again))
    assert got2.resumed_from == 0 and got2.bytes_transferred == path.stat().st_size
    assert (dest / "big.bin").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_part_prefix_fails_whole_file_digest(kind, dirs):
    tmp, src, dest = dirs
    path = make_file(src / "big.bin", 6 * MiB)
    _, got = _interrupted_transfer(kind, tmp, path, dest, at=2 * MiB)
    assert isinstance(got, TransferInterrupted) and got.offset > 1000
    with open(dest / "big.bin.part", "r+b") as f:   # flip one byte of the verified prefix
        f.seek(777)
        b = f.read(1)
        f.seek(777)
        f.write(bytes([b[0] ^ 0x40]))

    async def again(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent2, got2 = arun(with_pair(kind, tmp, again))
    assert isinstance(sent2, FileIntegrityError), sent2
    assert isinstance(got2, FileIntegrityError), got2
    assert got2.expected == sent2.expected and got2.actual != got2.expected
    assert listing(dest) == []           # no final file, .part and sidecar removed


def test_transport_integrity_error_removes_part(dirs, monkeypatch):
    """A stream whose digest fails (bytes altered in flight) leaves nothing behind."""
    from llmwire.errors import IntegrityError

    tmp, src, dest = dirs
    path = make_file(src / "x", 300_000)

    async def body(c, s):
        async def receiver():
            real_accept = s.accept_stream
            calls = []

            async def accept():
                stream = await real_accept()
                calls.append(stream)
                if len(calls) == 2:                      # the file stream
                    real_read = stream.read

                    async def read():
                        chunk = await real_read()
                        if not chunk:
                            raise IntegrityError(stream.stream_id, "aa", "bb")
                        return chunk
                    stream.read = read
                return stream
            s.accept_stream = accept
            return await receive_file(s, dest)

        return await both(send_file(c, path), receiver())

    sent, got = arun(with_pair("memory", tmp, body))
    assert isinstance(got, IntegrityError), got
    assert isinstance(sent, FileIntegrityError), sent
    assert listing(dest) == []


# --------------------------------------------------------------------- disk full

def _enospc_after(limit: int, monkeypatch, also_fsync: bool = False):
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if len(data) > 4096 and offset + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(files.os, "pwrite", pwrite)
    if also_fsync:
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(files.os, "fsync", fsync)


@pytest.mark.parametrize("kind", KINDS)
def test_disk_full_keeps_a_resumable_part(kind, dirs, monkeypatch):
    tmp, src, dest = dirs
    size = 5 * MiB
    path = make_file(src / "x", size)
    _enospc_after(2 * MiB, monkeypatch)

    async def body(c, s):
        return await both(send_file(c, path, chunk=256 * 1024), receive_file(s, dest))

    sent, got = arun(with_pair(kind, tmp, body))
    assert isinstance(got, FileWriteError) and got.errno == errno.ENOSPC, got
    assert isinstance(got, OSError) and "No space left" in str(got)
    # the sender learns it was the receiver's disk (errno included), not the network
    assert isinstance(sent, FileWriteError) and sent.errno == errno.ENOSPC, sent
    assert "on the receiver: No space left" in str(sent)
    assert not (dest / "x").exists()
    offset = json.loads((dest / "x.part.json").read_text())["offset"]
    assert 0 < offset <= 2 * MiB
    monkeypatch.undo()                                    # space was freed

    async def again(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent2, got2 = arun(with_pair(kind, tmp, again))
    assert got2.resumed_from == offset
    assert (dest / "x").read_bytes() == path.read_bytes()
    assert listing(dest) == ["x"]


def test_disk_full_without_room_for_a_checkpoint_removes_part(dirs, monkeypatch):
    tmp, src, dest = dirs
    path = make_file(src / "x", 3 * MiB)

    async def body(c, s):
        # Fail only once the data flows (the opening checkpoint has been written).
        def progress(done, total):
            _enospc_after(0, monkeypatch, also_fsync=True)
        return await both(send_file(c, path, chunk=256 * 1024),
                          receive_file(s, dest, progress=progress))

    sent, got = arun(with_pair("memory", tmp, body))
    monkeypatch.undo()
    assert isinstance(got, FileWriteError) and got.errno == errno.ENOSPC, got
    assert isinstance(sent, FileWriteError) and sent.errno == errno.ENOSPC, sent
    assert listing(dest) == []


# --------------------------------------------------------------------- disconnects

@pytest.mark.parametrize("kind", KINDS)
def test_receiver_disconnect(kind, dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x", 24 * MiB)     # more than the flow-control windows

    async def body(c, s):
        def progress(done, total):
            if done >= MiB and not s.is_closed:
                s._transport.abort()
        return await both(send_file(c, path, chunk=128 * 1024),
                          receive_file(s, dest, progress=progress))

    sent, got = arun(with_pair(kind, tmp, body))
    assert isinstance(sent, (TransferInterrupted, ConnectionClosed)), sent
    assert isinstance(got, TransferInterrupted), got
    assert isinstance(got.__cause__, ConnectionClosed)
    assert sorted(listing(dest)) == ["x.part", "x.part.json"]


def test_sender_disconnect_before_any_data(dirs):
    tmp, src, dest = dirs

    async def body(c, s):
        fid = file_id("x", 10, 0)
        await c.send_message({"kind": "file-offer", "name": "x", "size": 10,
                              "mtime_ns": 0, "id": fid})
        task = asyncio.ensure_future(receive_file(s, dest))
        await c.receive_message()                      # file-accept
        c._transport.abort()
        with pytest.raises(TransferInterrupted) as err:
            await task
        return err.value

    err = arun(with_pair("tcp", tmp, body))
    assert err.offset == 0
    assert sorted(listing(dest)) == ["x.part", "x.part.json"]


# --------------------------------------------------------------------- cancel

@pytest.mark.parametrize("kind", KINDS)
def test_cancel_from_sender_then_resume_on_same_connection(kind, dirs):
    tmp, src, dest = dirs
    size = 40 * MiB                            # more than the flow-control windows
    path = make_file(src / "x", size)

    async def body(c, s):
        reached = asyncio.Event()

        def progress(done, total):
            if done >= 2 * MiB:
                reached.set()
        sender = asyncio.ensure_future(send_file(c, path, chunk=256 * 1024, progress=progress))
        receiver = asyncio.ensure_future(receive_file(s, dest))
        await reached.wait()
        sender.cancel()
        first = await both(sender, receiver)
        again = await both(send_file(c, path), receive_file(s, dest))
        return first, again

    (sent, got), (sent2, got2) = arun(with_pair(kind, tmp, body))
    assert isinstance(sent, asyncio.CancelledError), sent
    assert isinstance(got, TransferInterrupted) and "cancel" in got.reason, got
    assert isinstance(sent2, FileResult) and isinstance(got2, FileResult), (sent2, got2)
    assert got2.resumed_from == got.offset > 0
    assert (dest / "x").read_bytes() == path.read_bytes()
    assert listing(dest) == ["x"]


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_from_receiver_then_resume_on_same_connection(kind, dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x", 40 * MiB)

    async def body(c, s):
        reached = asyncio.Event()

        def progress(done, total):
            if done >= 2 * MiB:
                reached.set()
        sender = asyncio.ensure_future(send_file(c, path, chunk=256 * 1024))
        receiver = asyncio.ensure_future(receive_file(s, dest, progress=progress))
        await reached.wait()
        receiver.cancel()
        first = await both(sender, receiver)
        again = await both(send_file(c, path), receive_file(s, dest))
        return first, again

    (sent, got), (sent2, got2) = arun(with_pair(kind, tmp, body))
    assert isinstance(got, asyncio.CancelledError), got
    assert isinstance(sent, TransferInterrupted) and "receiver" in str(sent), sent
    assert isinstance(sent2, FileResult) and isinstance(got2, FileResult), (sent2, got2)
    assert got2.resumed_from > 0
    assert (dest / "x").read_bytes() == path.read_bytes()
    assert listing(dest) == ["x"]


def test_failing_progress_callback_cancels_cleanly(dirs):
    tmp, src, dest = dirs
    path = make_file(src / "x", 3 * MiB)

    def progress(done, total):
        raise RuntimeError("progress bar broke")

    async def body(c, s):
        return await both(send_file(c, path, chunk=256 * 1024, progress=progress),
                          receive_file(s, dest))

    sent, got = arun(with_pair("memory", tmp, body))
    assert isinstance(sent, RuntimeError), sent
    assert isinstance(got, TransferInterrupted), got
    assert not (dest / "x").exists()


def test_not_a_directory_and_not_a_file(dirs):
    tmp, src, dest = dirs

    async def body(c, s):
        with pytest.raises(NotADirectoryError):
            await receive_file(s, tmp / "missing")
        with pytest.raises(FileTransferError):
            await send_file(c, src)

    arun(with_pair("memory", tmp, body))


def test_errors_are_llmwire_errors():
    for cls in (TransferRefused, UnsafeFileName, TargetExists, TransferInterrupted,
                FileWriteError, FileIntegrityError, FileTransferError):
        assert issubclass(cls, LlmwireError)


# --------------------------------------------------------------------- docs

def test_streaming_docs_example_runs(tmp_path, capsys, monkeypatch):
    text = (ROOT / "docs" / "streaming.md").read_text()
    section = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", section, re.S)
               if "async def main" in c]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's mkdtemp(), too
    code = code.replace("llmwire.run(main())", "llmwire.run(asyncio.wait_for(main(), 20))")
    exec(compile(code, "docs/streaming.md", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out
    assert "resumed from 0" in out and "identical: True" in out


@pytest.mark.parametrize("kind", KINDS)
def test_background_checkpoints_then_resume(kind, dirs, monkeypatch):
    """The sidecar follows the data (every CHECKPOINT_BYTES) while it flows."""
    tmp, src, dest = dirs
    monkeypatch.setattr(files, "CHECKPOINT_BYTES", 256 * 1024)
    size = 20 * MiB
    path = make_file(src / "x", size)
    records = []
    real_replace = os.replace

    def replace(a, b, *args, **kw):
        if str(b).endswith(".part.json"):  # names relative to the directory's fd
            fd = os.open(a, os.O_RDONLY, dir_fd=kw.get("src_dir_fd"))
            try:
                records.append(json.loads(os.read(fd, 65536))["offset"])
            finally:
                os.close(fd)
        return real_replace(a, b, *args, **kw)
    monkeypatch.setattr(files.os, "replace", replace)
    sent, got = _interrupted_transfer(kind, tmp, path, dest, at=8 * MiB)
    assert isinstance(got, TransferInterrupted), got
    # the opening record, periodic ones, the final (durable) one
    assert len(records) > 10 and records == sorted(records) and records[-1] == got.offset
    assert 0 < records[1] < got.offset

    async def again(c, s):
        return await both(send_file(c, path), receive_file(s, dest))

    sent2, got2 = arun(with_pair(kind, tmp, again))
    assert got2.resumed_from == got.offset
    assert (dest / "x").read_bytes() == path.read_bytes()
    assert listing(dest) == ["x"]
