"""``llmwire send`` / ``recv`` never land wrong data while reporting success,
and every failure has its documented exit status (docs/cli.md): two senders
of one name, sources changing under the sender, corrupted bytes, full disks,
planted links, hostile and odd checkpoints, signals. The real executable in
subprocesses, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from cli_helpers import ROOT, TIMEOUT, Receiver, cli, digest, env, one_error_line
from llmwire.cli import (
    EXIT_CONNECTION, EXIT_ERROR, EXIT_INTEGRITY, EXIT_REFUSED, EXIT_TERMINATED, EXIT_USAGE,
)

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

MiB = 1 << 20
CORPUS = ROOT / "tests" / "vectors" / "safetensors"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "out")
    yield r
    r.kill()


def send_in_background(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "llmwire", "send", *args], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def wait_until(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def part_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def make_blob(path: Path, size: int, seed: int) -> Path:
    block = bytes((i * 29 + seed) % 253 for i in range(1 << 16))
    with open(path, "wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[:min(len(block), size - start)])
    return path


# ------------------------------------------------------------ one owner per target


@pytest.mark.parametrize("same", [True, False], ids=["same-content", "different-content"])
def test_a_second_sender_of_a_name_in_flight_is_refused(tmp_path: Path, receiver: Receiver,
                                                        same: bool) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_blob(tmp_path / "a" / "data.bin", 24 * MiB, seed=1)
    second = make_blob(tmp_path / "b" / "data.bin", 24 * MiB, seed=1 if same else 2)
    # 6 s in flight at 4 MB/s: the second `llmwire send` must start (import
    # torch and all) while the first is still receiving, also on a loaded CI
    # machine (at 16 MB/s it sometimes came after the first had landed)
    slow = send_in_background(str(first), "--to", receiver.address, "--limit-rate", "4M",
                              "--json")
    wait_until(lambda: part_size(receiver.out / "data.bin.part") > 0, "the first .part")
    proc = cli("send", str(second), "--to", receiver.address)
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    one_error_line(proc, "another transfer is receiving", "data.bin")
    code, out, err = finish(slow)
    assert code == 0, err
    assert json.loads(out)["digest"] == digest(first) == digest(receiver.out / "data.bin")
    assert sorted(p.name for p in receiver.out.iterdir()) == ["data.bin"]


# ------------------------------------------------------------ sources that change


def test_a_checkpoint_resaved_during_the_send_lands_nothing(tmp_path: Path,
                                                           receiver: Receiver) -> None:
    ckpt = tmp_path / "ckpt.pt"
    state = {f"layers.{i}.weight": torch.randn(1024, 1024) for i in range(6)}  # 24 MiB
    torch.save(state, ckpt)
    slow = send_in_background(str(ckpt), "--to", receiver.address, "--limit-rate", "8M")
    wait_until(lambda: part_size(receiver.out / "ckpt.safetensors.part") > 0,
               "the receiver's .part")
    torch.save({k: v + 1 for k, v in state.items()}, ckpt)  # the trainer saves again
    code, out, err = finish(slow)
    assert code == EXIT_ERROR, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "changed while being sent" in err and "ckpt.pt" in err, err
    wait_until(lambda: not (receiver.out / "ckpt.safetensors.part").exists(), "cleanup")
    assert list(receiver.out.iterdir()) == []


def test_a_file_truncated_during_the_send_is_source_changed_not_sigbus(
        tmp_path: Path, receiver: Receiver) -> None:
    src = make_blob(tmp_path / "big.bin", 32 * MiB, seed=3)
    slow = send_in_background(str(src), "--to", receiver.address, "--limit-rate", "16M")
    wait_until(lambda: part_size(receiver.out / "big.bin.part") > 0, "the .part")
    os.truncate(src, 4 * MiB)
    code, out, err = finish(slow)
    assert code == EXIT_ERROR, (code, err)  # not -SIGBUS
    one_error_line(subprocess.CompletedProcess([], code, out, err), "changed while being sent")
    assert not (receiver.out / "big.bin").exists()


# ------------------------------------------------------------ corruption and interruptions


class _Flipper:
    """A TCP relay that flips one byte past ``at`` of what the sender sends
    (``upstream``) or of what the receiver answers."""

    def __init__(self, target_port: int, at: int, upstream: bool = True) -> None:
        self.target_port, self.at, self.upstream = target_port, at, upstream
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src, dst, flip: bool) -> None:
            seen = 0
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if flip and seen <= self.at < seen + len(data):
                        data = bytearray(data)
                        data[self.at - seen] ^= 0x10
                    seen += len(data)
                    dst.write(bytes(data))
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w, self.upstream),
                             pump(up_r, writer, not self.upstream), return_exceptions=True)

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)


@pytest.mark.parametrize("what", ["file", "state_dict"])
def test_a_payload_byte_flipped_in_transit_is_integrity_not_connection(tmp_path: Path,
                                                                      receiver: Receiver,
                                                                      what: str) -> None:
    """A flipped payload byte is caught by its frame's checksum (a flipped
    frame *header* byte is a protocol error, exit 3: docs/cli.md)."""
    if what == "file":
        src = make_blob(tmp_path / "blob.bin", 8 * MiB, seed=4)
    else:
        src = tmp_path / "m.safetensors"
        safetensors_torch.save_file({"w": torch.randn(1024, 2048)}, str(src))
    relay = _Flipper(receiver.port, at=2 * MiB)
    try:
        proc = cli("send", str(src), "--to", f"127.0.0.1:{relay.port}")
    finally:
        relay.close()
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    one_error_line(proc, "checksum")
    assert not any(p.suffix in (".bin", ".safetensors") for p in receiver.out.iterdir())


def test_the_sender_says_how_far_it_got_when_the_receiver_dies(tmp_path: Path,
                                                              receiver: Receiver) -> None:
    src = make_blob(tmp_path / "big.bin", 32 * MiB, seed=5)
    slow = send_in_background(str(src), "--to", receiver.address, "--limit-rate", "16M")
    wait_until(lambda: part_size(receiver.out / "big.bin.part") > MiB, "a MiB landed")
    receiver.proc.kill()
    receiver.proc.communicate(timeout=TIMEOUT)
    code, out, err = finish(slow)
    assert code == EXIT_CONNECTION, err
    one_error_line(subprocess.CompletedProcess([], code, out, err), "interrupted at byte")
    offset = int(err.split("interrupted at byte ")[1].split(":")[0])
    assert MiB <= offset <= 32 * MiB


# ------------------------------------------------------------ full disks


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_is_exit_1_in_every_case(tmp_path: Path, small_disk: Path) -> None:
    r = Receiver(small_disk)
    try:
        # an offer larger than the free space: refused before a file of its size exists
        too_big = make_blob(tmp_path / "huge.bin", 12 * MiB, seed=6)
        proc = cli("send", str(too_big), "--to", r.address)
        assert proc.returncode == EXIT_ERROR, proc.stderr
        one_error_line(proc, "No space left", "needed")
        assert list(small_disk.iterdir()) == []
        # the disk fills while the file is written
        src = make_blob(tmp_path / "mid.bin", 6 * MiB, seed=7)
        filler = small_disk / "filler"
        slow = send_in_background(str(src), "--to", r.address, "--limit-rate", "8M")
        wait_until(lambda: part_size(small_disk / "mid.bin.part") >= 0, "the .part")
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            f.write(b"\0" * (8 * MiB))  # as much as fits
        code, out, err = finish(slow)
        assert code == EXIT_ERROR, err
        one_error_line(subprocess.CompletedProcess([], code, out, err), "No space left")
        assert not (small_disk / "mid.bin").exists()
        # a state dict that does not fit
        filler.unlink()
        model = tmp_path / "m.safetensors"
        safetensors_torch.save_file({"w": torch.randn(3 * MiB)}, str(model))  # 12 MiB
        proc = cli("send", str(model), "--to", r.address)
        assert proc.returncode == EXIT_ERROR, proc.stderr
        one_error_line(proc, "No space left")
        assert not (small_disk / "m.safetensors").exists()
    finally:
        r.stop()


# ------------------------------------------------------------ links


@pytest.mark.parametrize("kind", ["file", "state_dict"])
def test_a_planted_part_link_is_refused_for_every_payload_kind(tmp_path: Path,
                                                              receiver: Receiver,
                                                              kind: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    if kind == "file":
        src = make_blob(tmp_path / "x.bin", MiB, seed=8)
        planted = receiver.out / "x.bin.part"
    else:
        src = tmp_path / "m.safetensors"
        safetensors_torch.save_file({"w": torch.ones(1000)}, str(src))
        planted = receiver.out / "m.safetensors.part"
    planted.symlink_to(victim)
    proc = cli("send", str(src), "--to", receiver.address)
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    one_error_line(proc, "symlink")
    assert victim.read_bytes() == b"precious" and planted.is_symlink()
    assert sorted(p.name for p in receiver.out.iterdir()) == [planted.name]


# ------------------------------------------------------------ checkpoints as they come


def test_a_file_of_empty_tensors_sends(tmp_path: Path, receiver: Receiver) -> None:
    src = CORPUS / "valid" / "all_empty.safetensors"
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4", "--json")
    assert proc.returncode == 0, proc.stderr
    got = safetensors_torch.load_file(receiver.out / "all_empty.safetensors")
    want = safetensors_torch.load_file(src)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == \
        {k: (v.dtype, v.shape) for k, v in want.items()}


def test_nonfinite_values_are_reported_or_refused(tmp_path: Path, receiver: Receiver) -> None:
    w = torch.randn(256, 256)
    w[0, :5] = float("nan")
    w[1, :2] = float("inf")
    src = tmp_path / "diverged.safetensors"
    safetensors_torch.save_file({"w": w}, str(src))
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4")
    assert proc.returncode == 0 and "7 NaN/inf value(s) replaced" in proc.stdout, proc
    (receiver.out / "diverged.safetensors").unlink()
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4", "--json")
    assert json.loads(proc.stdout)["nonfinite"] == 7
    (receiver.out / "diverged.safetensors").unlink()
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4",
               "--nonfinite", "raise")
    assert proc.returncode == EXIT_ERROR, proc.stderr
    one_error_line(proc, "NaN/inf", "'w'", "--nonfinite saturate")
    assert list(receiver.out.iterdir()) == []


def test_mixed_dtypes_and_per_name_overrides(tmp_path: Path, receiver: Receiver) -> None:
    state = {"w64": torch.randn(128, 128, dtype=torch.float64), "w32": torch.randn(128, 128),
             "head.weight": torch.randn(128, 128)}
    src = tmp_path / "mixed.safetensors"
    safetensors_torch.save_file(state, str(src))
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4",
               "--override", "head.*=bf16", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["kept_raw"] == ["w64"] and row["formats"] == {"raw": 1, "nf4": 1, "bf16": 1}
    got = safetensors_torch.load_file(receiver.out / "mixed.safetensors")
    assert torch.equal(got["w64"], state["w64"])                      # sent as it is
    assert torch.equal(got["head.weight"], state["head.weight"].bfloat16().float())
    (receiver.out / "mixed.safetensors").unlink()
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4")
    assert proc.returncode == 0, proc.stderr
    assert "1 float64 tensor(s) sent as they are" in proc.stdout
    # asking by name for a format the tensor cannot take is an error, before connecting
    proc = cli("send", str(src), "--to", "127.0.0.1:9", "--override", "w64=fp16")
    assert proc.returncode == EXIT_ERROR, proc.stderr
    one_error_line(proc, "w64", "float64")


# ------------------------------------------------------------ small ones


def test_timeouts_must_be_positive(tmp_path: Path) -> None:
    src = make_blob(tmp_path / "x", 10, seed=9)
    for bad in ("0", "-1", "nan", "inf", "soon"):
        proc = cli("send", str(src), "--to", "127.0.0.1:9", "--timeout", bad)
        assert proc.returncode == EXIT_USAGE, (bad, proc.stderr)
        assert "timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_an_ipv6_listener_prints_an_address_that_pastes_back(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    r = Receiver(tmp_path / "out", listen="[::1]:0")
    try:
        assert r.address.startswith("[::1]:"), r.first_line
        src = make_blob(tmp_path / "x.bin", 1000, seed=10)
        proc = cli("send", str(src), "--to", r.address)
        assert proc.returncode == 0, proc.stderr
    finally:
        r.stop()


def test_sigterm_stops_recv_like_ctrl_c_and_the_send_resumes(tmp_path: Path) -> None:
    r = Receiver(tmp_path / "out")
    src = make_blob(tmp_path / "big.bin", 32 * MiB, seed=11)
    slow = send_in_background(str(src), "--to", r.address, "--limit-rate", "16M")
    try:
        wait_until(lambda: part_size(r.out / "big.bin.part") > 2 * MiB, "2 MiB landed")
        code, out, err = r.stop(signal.SIGTERM)
        assert code == EXIT_TERMINATED, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("llmwire: terminated (SIGTERM)") and "Traceback" not in err
        record = json.loads((r.out / "big.bin.part.json").read_text())
        assert record["offset"] == part_size(r.out / "big.bin.part") > 2 * MiB  # durable
    finally:
        finish(slow)
        r.kill()
    again = Receiver(tmp_path / "out")
    try:
        proc = cli("send", str(src), "--to", again.address, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["resumed_from"] == record["offset"]
        assert digest(again.out / "big.bin") == digest(src)
    finally:
        again.stop()


def test_corruption_the_sender_itself_catches_is_integrity_too(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    """A byte of the receiver's answers flipped: the sender's own checksum catches it."""
    src = make_blob(tmp_path / "blob.bin", 2 * MiB, seed=12)
    relay = _Flipper(receiver.port, at=300, upstream=False)  # past the handshake
    try:
        proc = cli("send", str(src), "--to", f"127.0.0.1:{relay.port}")
    finally:
        relay.close()
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    one_error_line(proc, "checksum")


# ------------------------------------------------------------ found by review


@pytest.mark.parametrize("kind", ["file", "state_dict"])
def test_a_hard_linked_part_is_never_written_through(tmp_path: Path, receiver: Receiver,
                                                     kind: str) -> None:
    """A .part that another name leads to (planted, or left by a receiver killed
    between link and unlink) is replaced, not written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"VICTIM")
    if kind == "file":
        src = make_blob(tmp_path / "x.bin", MiB, seed=13)
        part, final = receiver.out / "x.bin.part", receiver.out / "x.bin"
    else:
        src = tmp_path / "m.safetensors"
        safetensors_torch.save_file({"w": torch.ones(1000)}, str(src))
        part, final = receiver.out / "m.safetensors.part", receiver.out / "m.safetensors"
    os.link(victim, part)
    proc = cli("send", str(src), "--to", receiver.address)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"VICTIM" and victim.stat().st_nlink == 1
    assert final.stat().st_ino != victim.stat().st_ino and not part.exists()


def test_bytes_appended_to_a_part_fail_the_transfer(tmp_path: Path, receiver: Receiver) -> None:
    src = make_blob(tmp_path / "app.bin", 20 * MiB, seed=14)
    slow = send_in_background(str(src), "--to", receiver.address, "--limit-rate", "16M")
    part = receiver.out / "app.bin.part"
    wait_until(lambda: part_size(part) > 0, "the .part")
    fd = os.open(part, os.O_WRONLY)
    try:
        os.pwrite(fd, b"EVIL" * 1000, 20 * MiB)  # past the announced size
    finally:
        os.close(fd)
    code, out, err = finish(slow)
    assert code == EXIT_INTEGRITY, err
    assert not (receiver.out / "app.bin").exists()


def test_a_fifo_sidecar_does_not_hang_the_receiver(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "y.bin.part.json")
    r = Receiver(out)
    try:
        src = make_blob(tmp_path / "y.bin", 1000, seed=15)
        proc = cli("send", str(src), "--to", r.address, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert digest(out / "y.bin") == digest(src)
    finally:
        r.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_recv_during_a_state_dict_keeps_it_for_resume(tmp_path: Path,
                                                                  sig: int) -> None:
    """Nothing final, and what landed kept (as files are) for the next send."""
    r = Receiver(tmp_path / "out")
    src = tmp_path / "big.safetensors"
    safetensors_torch.save_file({f"w{i}": torch.randn(1024, 1024) for i in range(8)}, str(src))
    slow = send_in_background(str(src), "--to", r.address, "--limit-rate", "8M")
    try:
        wait_until(lambda: part_size(r.out / "big.safetensors.part") > 0, "the .part")
        time.sleep(0.3)
        code, _, err = r.stop(sig)
        assert code == (EXIT_TERMINATED if sig == signal.SIGTERM else 130), err
    finally:
        finish(slow)
        r.kill()
    assert sorted(p.name for p in r.out.iterdir()) == [
        "big.safetensors.part", "big.safetensors.part.json", "big.safetensors.part.ledger"]
    again = Receiver(tmp_path / "out")
    try:
        proc = cli("send", str(src), "--to", again.address, "--json")
        assert proc.returncode == 0, proc.stderr
    finally:
        again.stop()
    assert sorted(p.name for p in r.out.iterdir()) == ["big.safetensors"]


def test_checkpoints_the_receiver_could_not_take_are_refused_before_connecting(
        tmp_path: Path) -> None:
    meta = tmp_path / "meta.pt"
    torch.save({"__metadata__": torch.zeros(3), "w": torch.ones(4)}, meta)
    sparse = tmp_path / "sparse.pt"
    torch.save({"s": torch.eye(4).to_sparse()}, sparse)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    truncated.write_bytes((tmp_path / "full.pt").read_bytes()[:1500])
    cases = [(meta, "'__metadata__'"), (sparse, "sparse"), (truncated, "truncated.pt"),
             (CORPUS / "valid" / "empty_name.safetensors", "1 to")]
    for path, word in cases:
        proc = cli("send", str(path), "--to", "127.0.0.1:9")
        assert proc.returncode == EXIT_ERROR, (path, proc.stderr)
        one_error_line(proc, word)
    long_name = tmp_path / ("n" * 242)
    long_name.write_bytes(b"x")
    proc = cli("send", str(long_name), "--to", "127.0.0.1:9")
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    one_error_line(proc, "longer than 241")


def test_a_secret_that_is_not_utf8_is_used_as_bytes(tmp_path: Path) -> None:
    raw = b"\xff\xfe-secret"
    environ = env(None)
    environ_b = {os.fsencode(k): os.fsencode(v) for k, v in environ.items()}
    environ_b[b"LLMWIRE_SECRET"] = raw
    out = tmp_path / "out"
    recv = subprocess.Popen([sys.executable, "-m", "llmwire", "recv", "--listen",
                             "127.0.0.1:0", "--out", str(out)], cwd=ROOT, env=environ_b,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = recv.stderr.readline()
        address = first.split("listening on ")[1].split(",")[0]
        src = make_blob(tmp_path / "s.bin", 100, seed=16)
        done = subprocess.run([sys.executable, "-m", "llmwire", "send", str(src), "--to",
                               address], cwd=ROOT, env=environ_b, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
    finally:
        recv.kill()
        recv.communicate(timeout=TIMEOUT)


def test_metadata_travels_and_overrides_keep_the_first_match(tmp_path: Path,
                                                             receiver: Receiver) -> None:
    src = tmp_path / "meta.safetensors"
    safetensors_torch.save_file({"w": torch.randn(128, 128), "i": torch.arange(5000)},
                                str(src), metadata={"format": "pt", "round": "3"})
    proc = cli("send", str(src), "--to", receiver.address, "--json", "--override", "w=bf16",
               "--override", "w=nf4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["formats"] == {"bf16": 1, "raw": 1}
    from safetensors import safe_open
    with safe_open(str(receiver.out / "meta.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "round": "3"}
    proc = cli("send", str(src), "--to", "127.0.0.1:9", "--override", "i=nf4")
    assert proc.returncode == EXIT_ERROR, proc.stderr
    one_error_line(proc, "'i'", "only float tensors")


def test_a_source_replaced_by_a_rename_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    src = make_blob(tmp_path / "ren.bin", 32 * MiB, seed=17)
    other = make_blob(tmp_path / "ren2.bin", 32 * MiB, seed=18)
    slow = send_in_background(str(src), "--to", receiver.address, "--limit-rate", "16M")
    wait_until(lambda: part_size(receiver.out / "ren.bin.part") > 0, "the .part")
    os.rename(other, src)                                  # an atomic save over it
    code, out, err = finish(slow)
    assert code == EXIT_ERROR and "changed while being sent" in err, err
    assert not (receiver.out / "ren.bin").exists()
