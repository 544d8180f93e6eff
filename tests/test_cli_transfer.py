"""``llmwire send`` / ``llmwire recv`` end to end: the real executable
(``python -m llmwire``) in subprocesses over loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import llmwire
from cli_helpers import ROOT, SECRET, TIMEOUT, Receiver, cli, env as _env, digest as _digest
from cli_helpers import one_error_line as _one_error_line
from llmwire.cli import EXIT_AUTH, EXIT_CONNECTION, EXIT_REFUSED, EXIT_USAGE

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

#: largest error relative to each tensor's largest magnitude
BOUNDS = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3, "blockwise8": 2e-2, "fp4": 0.25, "nf4": 0.2}


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "out")
    yield r
    r.kill()


def _model(path: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    state = {"layers.0.attn.weight": torch.randn(256, 512, generator=gen),
             "layers.0.mlp.weight": torch.randn(512, 256, generator=gen) * 3,
             "norm.weight": torch.ones(256), "steps": torch.arange(5)}
    safetensors_torch.save_file(state, str(path))
    return state


def _check_tensors(got_path: str, want: dict[str, Any], fmt: str) -> None:
    got = safetensors_torch.load_file(got_path)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if not tensor.is_floating_point():
            assert torch.equal(got[name], tensor)
            continue
        err = float((got[name].float() - tensor.float()).abs().max())
        assert err <= BOUNDS[fmt] * float(tensor.abs().max()), (name, fmt, err)


def test_file_state_dicts_and_formats(tmp_path: Path, receiver: Receiver) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = _model(src / "model.safetensors")
    blob = src / "notes.txt"
    blob.write_bytes(os.urandom(3 << 20) + b"tail")
    ckpt = src / "ckpt.pt"
    torch.save({"state_dict": {"w": model["layers.0.attn.weight"].clone()}}, ckpt)

    # several paths, one connection: a file, a safetensors state dict, a torch checkpoint
    proc = cli("send", str(blob), str(src / "model.safetensors"), str(ckpt), "--to",
               receiver.address, "--json")
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(proc.stdout)
    rows = sent["transfers"]
    assert [r["path"] for r in rows] == [str(blob), str(src / "model.safetensors"), str(ckpt)]
    assert rows[0]["bytes"] == blob.stat().st_size and rows[0]["digest"] == _digest(blob)
    assert rows[1]["format"] == "fp32" and rows[1]["bytes"] > rows[1]["wire_bytes"] * 0.9
    for row in rows:
        assert {"bytes", "wire_bytes", "seconds", "format", "path"} <= set(row)

    # each quantized format, under its own name so nothing is overwritten
    for fmt in ("fp16", "bf16", "blockwise8", "fp4", "nf4"):
        link = src / f"model-{fmt}.safetensors"
        link.symlink_to(src / "model.safetensors")
        proc = cli("send", str(link), "--to", receiver.address, "--quantize", fmt, "--json")
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)
        assert row["format"] == fmt and row["path"] == str(link)
        assert row["wire_bytes"] < row["bytes"] * (0.6 if fmt in ("fp16", "bf16") else 0.35)

    code, out, err = receiver.stop()
    assert code == 130 and "Traceback" not in err
    landed = {r["name"]: r for r in map(json.loads, out.splitlines())}
    out_dir = receiver.out
    assert _digest(out_dir / "notes.txt") == landed["notes.txt"]["digest"] == _digest(blob)
    _check_tensors(landed["model.safetensors"]["path"], model, "fp32")
    assert landed["model.safetensors"]["digest"] == _digest(out_dir / "model.safetensors")
    _check_tensors(str(out_dir / "ckpt.safetensors"), {"w": model["layers.0.attn.weight"]},
                   "fp32")
    for fmt in ("fp16", "bf16", "blockwise8", "fp4", "nf4"):
        _check_tensors(str(out_dir / f"model-{fmt}.safetensors"), model, fmt)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(landed)


def test_recv_once_json_and_refusals(tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"not a torch checkpoint" * 1000)  # a .bin that is no checkpoint: a file
    r = Receiver(tmp_path / "out", "--once")
    try:
        proc = cli("send", str(src), "--to", r.address, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["kind"] == "file"
        out, err = r.proc.communicate(timeout=TIMEOUT)  # --once: it exits by itself
        code = r.proc.returncode
    finally:
        if r.proc.poll() is None:
            r.proc.kill()
    assert code == 0, err
    landed = json.loads(out)
    assert landed["path"] == str((tmp_path / "out" / "a.bin").resolve())
    assert landed["digest"] == _digest(src)


def test_existing_target_is_refused(tmp_path: Path, receiver: Receiver) -> None:
    src = tmp_path / "data.txt"
    src.write_text("hello\n")
    assert cli("send", str(src), "--to", receiver.address).returncode == 0
    proc = cli("send", str(src), "--to", receiver.address)
    assert proc.returncode == EXIT_REFUSED
    _one_error_line(proc, "exists")


def test_traversal_names_are_refused(tmp_path: Path, receiver: Receiver) -> None:
    """A hostile sender, through the API: names that leave --out land nowhere."""
    async def hostile() -> list[str]:
        outcomes = []
        t = await llmwire.connect("127.0.0.1", receiver.port, secret=SECRET)
        for name in ("../escape.safetensors", "/abs.safetensors"):
            try:
                await llmwire.send_state_dict(t, {"w": torch.ones(4)}, header={"name": name})
                outcomes.append("sent")
            except llmwire.UnsafeFileName as exc:  # the receiver's refusal, with its reason
                outcomes.append(exc.reason)
        await t.send_message({"kind": "file-offer", "name": "../escape.txt", "size": 1,
                              "mtime_ns": 1, "id": "x"})
        reply = await t.receive_message()
        outcomes.append(reply.header["kind"])
        await t.close()
        return outcomes

    outcomes = llmwire.run(hostile())
    assert "'..' part" in outcomes[0] and "absolute" in outcomes[1], outcomes
    assert outcomes[2] == "file-refuse"
    code, out, err = receiver.stop()
    assert out == "" and code == 130
    assert list(tmp_path.rglob("*escape*")) == [] and not Path("/abs.safetensors").exists()


def test_resume_after_killing_the_sender(tmp_path: Path, receiver: Receiver) -> None:
    src = tmp_path / "big.dat"
    src.write_bytes(os.urandom(40 << 20))
    sender = subprocess.Popen([sys.executable, "-m", "llmwire", "send", str(src), "--to",
                               receiver.address, "--limit-rate", "20M", "--json"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    sidecar = receiver.out / "big.dat.part.json"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sidecar.exists() and (receiver.out / "big.dat.part").stat().st_size > (4 << 20):
            break
        time.sleep(0.05)
    sender.kill()
    sender.communicate(timeout=TIMEOUT)
    deadline = time.monotonic() + 20  # the receiver checkpoints when it sees the loss
    offset = 0
    while time.monotonic() < deadline and offset == 0:
        try:
            offset = json.loads(sidecar.read_text())["offset"]
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert 0 < offset < src.stat().st_size
    assert not (receiver.out / "big.dat").exists()

    proc = cli("send", str(src), "--to", receiver.address, "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["resumed_from"] >= offset - (64 << 20) and row["resumed_from"] > 0
    assert row["wire_bytes"] == src.stat().st_size - row["resumed_from"]
    assert _digest(receiver.out / "big.dat") == _digest(src) == row["digest"]
    code, _, err = receiver.stop()
    assert "interrupted" in err and "resume" in err


def test_wrong_secret(tmp_path: Path, receiver: Receiver) -> None:
    src = tmp_path / "x.txt"
    src.write_text("x")
    proc = cli("send", str(src), "--to", receiver.address, secret="not-the-secret")
    assert proc.returncode == EXIT_AUTH
    _one_error_line(proc, "wrong secret")
    code, out, err = receiver.stop()
    assert "rejected a connection" in err and out == ""


def test_connection_errors(tmp_path: Path, receiver: Receiver) -> None:
    src = tmp_path / "x.txt"
    src.write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    proc = cli("send", str(src), "--to", f"127.0.0.1:{free_port}")
    assert proc.returncode == EXIT_CONNECTION
    _one_error_line(proc, "connection refused")
    proc = cli("recv", "--listen", receiver.address, "--out", str(tmp_path / "o2"))
    assert proc.returncode == EXIT_CONNECTION
    _one_error_line(proc, "address already in use")


def test_input_and_secret_errors(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("")
    proc = cli("send", str(tmp_path / "missing.safetensors"), "--to", "127.0.0.1:9")
    assert proc.returncode == 1
    _one_error_line(proc, "missing.safetensors", "no such file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    proc = cli("send", str(bad), "--to", "127.0.0.1:9")  # refused before connecting
    assert proc.returncode == 1
    _one_error_line(proc, "bad.safetensors", "not a safetensors file")
    with socket.socket() as s:  # a listener that never answers the handshake
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = cli("send", str(tmp_path / "secret"), "--to", f"127.0.0.1:{s.getsockname()[1]}",
                   "--timeout", "1")
    assert proc.returncode == EXIT_CONNECTION
    _one_error_line(proc, "timed out")
    proc = cli("send", str(bad), "--to", "127.0.0.1:9", secret=None)
    assert proc.returncode == EXIT_USAGE
    _one_error_line(proc, "LLMWIRE_SECRET")
    proc = cli("send", str(bad), "--to", "127.0.0.1:9", "--secret", "hunter2")
    assert proc.returncode == EXIT_USAGE
    _one_error_line(proc, "never taken on the command line")
    secret_file = tmp_path / "secret"
    secret_file.write_text("")
    os.chmod(secret_file, 0o600)
    proc = cli("send", str(bad), "--to", "127.0.0.1:9", "--secret-file", str(secret_file))
    assert proc.returncode == EXIT_USAGE
    _one_error_line(proc, "empty")


def test_help_shows_examples() -> None:
    for args in ((), ("send",), ("recv",), ("demo",)):
        proc = cli(*args, "--help")
        assert proc.returncode == 0
        assert "examples:" in proc.stdout, args


def test_killed_state_dict_sender_resumes(tmp_path: Path, receiver: Receiver) -> None:
    """kill -9 of a state dict's sender: the receiver keeps the verified part
    as .part (nothing at the final name), and the same send again continues
    from there, ending byte-identical to an uninterrupted transfer."""
    src = tmp_path / "w.safetensors"
    state = {"w": torch.randn(4 << 20)}  # 16 MiB
    safetensors_torch.save_file(state, str(src))
    for fmt, rate in (("fp32", "8M"), ("nf4", "1M")):  # about 2 s each
        sender = subprocess.Popen([sys.executable, "-m", "llmwire", "send", str(src), "--to",
                                   receiver.address, "--limit-rate", rate, "--quantize", fmt],
                                  cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        part = receiver.out / "w.safetensors.part"
        sidecar = receiver.out / "w.safetensors.part.json"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not sidecar.exists():
            time.sleep(0.05)
        time.sleep(1.0)
        sender.kill()
        sender.communicate(timeout=TIMEOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and json.loads(sidecar.read_text())["slices"] == 0:
            time.sleep(0.05)
        assert part.exists() and not (receiver.out / "w.safetensors").exists()
        proc = cli("send", str(src), "--to", receiver.address, "--json", "--quantize", fmt)
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)
        assert row["resumed_from"] > 0
        landed = Path(row["remote_path"])
        assert row["wire_bytes"] < (16 << 20 if fmt == "fp32" else 2 << 20) + 4096
        _check_tensors(str(landed), state, fmt)
        reference = _uninterrupted(tmp_path, src, fmt)
        assert _digest(landed) == _digest(reference)
        landed.unlink()
        assert not part.exists() and not sidecar.exists()


def _uninterrupted(tmp_path: Path, src: Path, fmt: str) -> Path:
    """``src`` sent once, whole, to a receiver of its own."""
    out = tmp_path / f"reference-{fmt}"
    other = Receiver(out)
    try:
        proc = cli("send", str(src), "--to", other.address, "--json", "--quantize", fmt)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["resumed_from"] == 0
    finally:
        other.stop()
    return out / "w.safetensors"
