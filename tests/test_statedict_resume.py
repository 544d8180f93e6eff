"""Resumable state dicts: an interrupted transfer continues from the last
verified slice, byte-identical to an uninterrupted one, into a file, a
sharded directory or tensors in place; a source that changed is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import llmwire
from llmwire.payloads.filesinks import SafetensorsSink, ShardedSink


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {f"l{i}.w": torch.randn(512, 1024, generator=g) for i in range(8)}
    state["l0.tied"] = state["l0.w"]
    state["steps"] = torch.arange(7)
    return state


async def _send(state: Any, sink: Any, fmt: str = "raw", stop_after: int | None = None,
                **options: Any) -> tuple[Any, Any]:
    """One transfer over a memory pair; returns (sender's result or error,
    receiver's result or error). ``stop_after``: the sender's task is
    cancelled once it sent that many bytes (as Ctrl-C stops ``llmwire send``)."""
    a, b = await llmwire.memory_pair()

    def progress(done: int, total: int) -> None:
        if stop_after is not None and done > stop_after:
            sending.cancel()

    async def receive() -> Any:
        try:
            return await llmwire.receive_state_dict(b, sink)
        except llmwire.LlmwireError as exc:
            return exc

    receiving = asyncio.create_task(receive())
    sending = asyncio.create_task(llmwire.send_state_dict(a, state, fmt, resumable=True,
                                                          progress=progress, **options))
    try:
        sent: Any = await sending
    except asyncio.CancelledError:
        sent = "stopped"
    except llmwire.LlmwireError as exc:
        sent = exc
    got = await asyncio.wait_for(receiving, 30)
    await a.close()
    await b.close()
    return sent, got


def _bytes_of(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {"": path.read_bytes()}


SINKS: dict[str, Callable[[Path], Any]] = {
    "file": lambda p: SafetensorsSink(p.with_suffix(".safetensors")),
    "sharded": lambda p: ShardedSink(p, max_shard_size=5_000_000),
}


@pytest.mark.parametrize("fmt", ["raw", "nf4"])
@pytest.mark.parametrize("kind", list(SINKS))
def test_an_interrupted_state_dict_resumes_byte_identical(tmp_path: Path, fmt: str,
                                                          kind: str) -> None:
    state = _state()
    reference, _ = asyncio.run(_send(state, SINKS[kind](tmp_path / "reference"), fmt))
    full = reference.wire_bytes
    sent, got = asyncio.run(_send(state, SINKS[kind](tmp_path / "out"), fmt,
                                  stop_after=full // 2))
    assert sent == "stopped" and isinstance(got, llmwire.StreamCancelled)
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))
    assert kept == (["out.part"] if kind == "sharded" else
                    ["out.safetensors.part", "out.safetensors.part.json",
                     "out.safetensors.part.ledger"])  # nothing looks complete
    resumed, landed = asyncio.run(_send(state, SINKS[kind](tmp_path / "out"), fmt))
    assert 0 < resumed.resumed_from < full and resumed.wire_bytes < full * 0.75
    assert resumed.wire_bytes + resumed.resumed_from == full
    assert _bytes_of(Path(landed)) == _bytes_of(Path(reference.receipt["path"]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == \
        ["out.safetensors" if kind == "file" else "out"]


def test_in_place_receivers_resume_in_the_same_process() -> None:
    state = _state()
    target = {k: torch.zeros_like(v) for k, v in state.items() if k != "l0.tied"}
    target["l0.tied"] = target["l0.w"]
    sink = llmwire.InPlaceSink(target)
    sent, _ = asyncio.run(_send(state, sink, "bf16", stop_after=3_000_000))
    assert sent == "stopped"
    resumed, got = asyncio.run(_send(state, sink, "bf16"))
    assert resumed.resumed_from > 0 and got is target
    for name, tensor in state.items():
        want = tensor if name == "steps" else tensor.to(torch.bfloat16).float()
        assert torch.equal(target[name], want), name


def test_a_changed_source_is_refused_and_the_part_kept(tmp_path: Path) -> None:
    state = _state()
    out = tmp_path / "out.safetensors"
    asyncio.run(_send(state, SafetensorsSink(out), stop_after=9_000_000))
    state["l0.w"][0, 0] += 1  # before the boundary: the slices landed encode otherwise now
    sent, got = asyncio.run(_send(state, SafetensorsSink(out)))
    assert isinstance(sent, llmwire.ResumeMismatch) and isinstance(sent, llmwire.SourceChanged)
    assert "restart" in str(sent) and isinstance(got, llmwire.StreamCancelled)
    record = json.loads((tmp_path / "out.safetensors.part.json").read_text())
    assert record["slices"] > 0  # still there for the original source
    sent, landed = asyncio.run(_send(state, SafetensorsSink(out), restart=True))
    assert sent.resumed_from == 0 and Path(landed) == out
    with llmwire.open_checkpoint(out) as back:
        assert torch.equal(back["l0.w"].load(), state["l0.w"])


def test_a_rewritten_checkpoint_file_is_refused_by_its_fingerprint(tmp_path: Path) -> None:
    state = _state()
    del state["l0.tied"]
    src = tmp_path / "src.safetensors"
    save_file(state, str(src))
    out = tmp_path / "out.safetensors"
    with llmwire.open_checkpoint(src) as checkpoint:
        sent, _ = asyncio.run(_send(checkpoint, SafetensorsSink(out), stop_after=9_000_000))
    assert sent == "stopped"
    save_file(state, str(src))  # the same values, saved again: another version of the file
    with llmwire.open_checkpoint(src) as checkpoint:
        sent, _ = asyncio.run(_send(checkpoint, SafetensorsSink(out)))
    assert isinstance(sent, llmwire.ResumeMismatch) and "not the version" in str(sent)


def test_an_unreadable_record_starts_over(tmp_path: Path) -> None:
    state = _state()
    out = tmp_path / "out.safetensors"
    asyncio.run(_send(state, SafetensorsSink(out), stop_after=9_000_000))
    (tmp_path / "out.safetensors.part.json").write_text("{not json")
    sent, landed = asyncio.run(_send(state, SafetensorsSink(out)))
    assert sent.resumed_from == 0 and Path(landed) == out
    with llmwire.open_checkpoint(out) as back:
        assert torch.equal(back["l3.w"].load(), state["l3.w"])
