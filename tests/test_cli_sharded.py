"""``llmwire send MODEL_DIR/``: model directories whole, state dicts resumed
after kill -9 of either side, a changed source refused, and the sender's
memory bounded whatever the checkpoint's size (RSS sampled from outside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import ROOT, TIMEOUT, Receiver, cli, digest, env, one_error_line
from shard_helpers import write_sharded

MiB = 1 << 20


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "out", "--max-shard-size", "3MB")
    yield r
    r.stop()


def _model_dir(path: Path, layers: int = 6, numel: int = 1 << 18, seed: int = 0
               ) -> dict[str, torch.Tensor]:
    """A model directory as transformers writes one (shards, index, config,
    tokenizer files) with ``layers`` float32 tensors of ``numel`` elements."""
    g = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.weight": torch.randn(numel, generator=g) for i in range(layers)}
    write_sharded(path, state, per_shard=-(-layers // 2))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref")  # hidden: left out
    return state


def _landed_state(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(directory / shard)))
    return out


def _start_send(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "llmwire", "send", *args], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _slices_recorded(sidecar: Path) -> int:
    try:
        return int(json.loads(sidecar.read_text())["slices"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_model_directory_lands_whole_and_loads(tmp_path: Path, receiver: Receiver) -> None:
    state = _model_dir(tmp_path / "tiny-model")
    proc = cli("send", str(tmp_path / "tiny-model") + "/", "--to", receiver.address, "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["kind"] == "directory" and row["files"] == 2 and row["resumed_from"] == 0
    landed = receiver.out / "tiny-model"
    assert Path(row["remote_path"]) == landed and not (receiver.out / "tiny-model.part").exists()
    assert sorted(p.name for p in landed.iterdir()) == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer"]
    assert (landed / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    got = _landed_state(landed)
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    # again: the directory exists now, and is refused as a whole before any byte
    again = cli("send", str(tmp_path / "tiny-model"), "--to", receiver.address)
    assert again.returncode == 5
    one_error_line(again, "exists")
    # a directory without weights is refused before connecting
    (tmp_path / "empty").mkdir()
    empty = cli("send", str(tmp_path / "empty"), "--to", receiver.address)
    assert empty.returncode == 1
    one_error_line(empty, "without model weights")


def test_a_transformers_model_directory_round_trips(tmp_path: Path, receiver: Receiver) -> None:
    transformers = pytest.importorskip("transformers", reason="the [learn] extra is not "
                                                               "installed")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama", max_shard_size="200KB")
    proc = cli("send", str(tmp_path / "llama"), "--to", receiver.address, "--json",
               "--quantize", "bf16")
    assert proc.returncode == 0, proc.stderr
    loaded = transformers.AutoModelForCausalLM.from_pretrained(receiver.out / "llama").eval()
    ids = torch.arange(16).reshape(1, 16)
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert (got - want).abs().max() < 0.05  # bf16 on the wire, fp32 restored


def test_a_directory_resumes_after_kill_9_of_the_sender(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    state = _model_dir(tmp_path / "m", layers=4, numel=1 << 20)  # 16 MiB of weights
    sender = _start_send(str(tmp_path / "m"), "--to", receiver.address, "--limit-rate", "6M")
    sidecar = receiver.out / "m.part" / "model.safetensors.index.json.part.json"
    _wait_for(lambda: _slices_recorded(sidecar) >= 1, "a checkpoint of the weights")
    sender.send_signal(signal.SIGKILL)
    sender.communicate(timeout=TIMEOUT)
    _wait_for(lambda: _slices_recorded(sidecar) >= 1, "the receiver's record")
    assert not (receiver.out / "m").exists()  # nothing looks complete
    proc = cli("send", str(tmp_path / "m"), "--to", receiver.address, "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["resumed_from"] > 0 and row["weights"]["wire_bytes"] < 16 * MiB
    got = _landed_state(receiver.out / "m")
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert not (receiver.out / "m.part").exists()


def test_a_state_dict_resumes_after_kill_9_of_the_receiver(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    state = {"a": torch.randn(3 << 20), "b": torch.randn(1 << 20)}  # 16 MiB
    save_file(state, str(src))
    out = tmp_path / "out"
    first = Receiver(out)
    sender = _start_send(str(src), "--to", first.address, "--limit-rate", "3M", "--quantize",
                         "fp16")
    sidecar = out / "w.safetensors.part.json"
    try:
        _wait_for(lambda: _slices_recorded(sidecar) >= 1, "a periodic checkpoint")
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.communicate(timeout=TIMEOUT)
        sender.communicate(timeout=TIMEOUT)
    assert sender.returncode != 0 and not (out / "w.safetensors").exists()
    second = Receiver(out)  # started again on the same --out
    try:
        proc = cli("send", str(src), "--to", second.address, "--json", "--quantize", "fp16")
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)
        assert row["resumed_from"] > 0 and row["wire_bytes"] < 8 * MiB
    finally:
        second.stop()
    reference = Receiver(tmp_path / "reference")
    try:
        assert cli("send", str(src), "--to", reference.address, "--quantize",
                   "fp16").returncode == 0
    finally:
        reference.stop()
    assert digest(out / "w.safetensors") == digest(tmp_path / "reference" / "w.safetensors")


def test_a_resumed_send_whose_source_changed_is_refused(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    src = tmp_path / "w.safetensors"
    state = {"w": torch.randn(4 << 20)}
    save_file(state, str(src))
    sender = _start_send(str(src), "--to", receiver.address, "--limit-rate", "6M")
    sidecar = receiver.out / "w.safetensors.part.json"
    _wait_for(lambda: _slices_recorded(sidecar) >= 1, "a checkpoint")
    sender.send_signal(signal.SIGKILL)
    sender.communicate(timeout=TIMEOUT)
    state["w"][0] += 1
    save_file(state, str(src))  # saved again: another version
    proc = cli("send", str(src), "--to", receiver.address)
    assert proc.returncode == 1
    one_error_line(proc, "cannot resume", "--restart")
    assert _slices_recorded(sidecar) >= 1  # the receiver kept its part
    proc = cli("send", str(src), "--to", receiver.address, "--json", "--restart")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resumed_from"] == 0
    assert torch.equal(load_file(str(receiver.out / "w.safetensors"))["w"], state["w"])


def _sender_peak_rss(source: Path, out: Path) -> int:
    """Peak RSS of ``llmwire send SOURCE --quantize nf4``, sampled from outside."""
    receiver = Receiver(out)
    try:
        sender = _start_send(str(source), "--to", receiver.address, "--quantize", "nf4")
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            page = os.sysconf("SC_PAGE_SIZE")
            while not stop.is_set():
                try:
                    with open(f"/proc/{sender.pid}/statm") as f:
                        peak = max(peak, int(f.read().split()[1]) * page)
                except (OSError, ValueError, IndexError):
                    pass
                stop.wait(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            sender.communicate(timeout=TIMEOUT)
        finally:
            stop.set()
            sampler.join()
        assert sender.returncode == 0
        return peak
    finally:
        receiver.stop()


def test_the_sender_releases_what_it_read(tmp_path: Path) -> None:
    """A 384 MiB sharded checkpoint on tmpfs (where mapped pages would all be
    resident) costs the sender no more than a 4 MiB one, within 64 MiB."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as where:
        big, small = Path(where) / "big", Path(where) / "small"
        _model_dir(big, layers=12, numel=8 << 20)  # 384 MiB of float32
        _model_dir(small, layers=2, numel=1 << 19)  # 4 MiB
        small_peak = _sender_peak_rss(small, tmp_path / "small")
        big_peak = _sender_peak_rss(big, tmp_path / "big")
    print(f"sender peak: {big_peak / MiB:.1f} MiB (384 MiB checkpoint), {small_peak / MiB:.1f} MiB (4 MiB)")
    assert big_peak - small_peak <= 64 * MiB, (big_peak / MiB, small_peak / MiB)
