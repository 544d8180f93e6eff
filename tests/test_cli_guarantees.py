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
    slow = send_in_background(str(first), "--to", receiver.address, "--limit-rate", "16M",
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
    """A TCP relay that flips one byte of what the sender sends, past ``at``."""

    def __init__(self, target_port: int, at: int) -> None:
        self.target_port, self.at = target_port, at
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

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False),
                             return_exceptions=True)

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)


@pytest.mark.parametrize("what", ["file", "state_dict"])
def test_a_byte_flipped_in_transit_is_integrity_not_connection(tmp_path: Path,
                                                              receiver: Receiver,
                                                              what: str) -> None:
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
    one_error_line(proc, "non-finite", "'w'")
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
    proc = cli("send", str(src), "--to", receiver.address, "--quantize", "nf4")
    assert "1 float64 tensor(s) sent as they are" in proc.stdout or proc.returncode == 5
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
