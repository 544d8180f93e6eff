"""Hugging Face sharded model directories: read lazily, written as shards
with an index, and the round trip through a real loopback connection."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmwire
from llmwire.errors import CheckpointError
from llmwire.sharding import parse_size, plan_shards, read_index
from shard_helpers import write_sharded


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"model.layers.{i}.w": torch.randn(256, 64, generator=g).to(torch.bfloat16)
             for i in range(6)}
    state["model.norm.weight"] = torch.randn(64, generator=g)
    state["model.step"] = torch.arange(5)
    return state


def _same(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_a_sharded_directory_reads_lazily_shard_by_shard(tmp_path: Path) -> None:
    state = _state()
    write_sharded(tmp_path / "m", state, per_shard=3)
    with llmwire.open_checkpoint(tmp_path / "m") as checkpoint:
        assert checkpoint.format == "safetensors" and len(checkpoint.shards) == 3
        assert all(isinstance(t, llmwire.FileTensor) for t in checkpoint.values())
        assert checkpoint.metadata == {"format": "pt"}
        _same(checkpoint.load(), state)
    # the index itself names the same checkpoint; one model.safetensors is a directory too
    with llmwire.open_checkpoint(tmp_path / "m" / "model.safetensors.index.json") as again:
        assert list(again) == list(checkpoint)
    (tmp_path / "one").mkdir()
    save_file(state, str(tmp_path / "one" / "model.safetensors"))
    with llmwire.open_checkpoint(tmp_path / "one") as single:
        _same(single.load(), state)


@pytest.mark.parametrize("damage, words", [
    ("missing shard", "is missing"),
    ("extra tensor", "does not map"),
    ("lacking tensor", "lacks"),
    ("escaping name", "not a file name"),
    ("not json", "not valid JSON"),
    ("no weight map", "no weight_map"),
])
def test_a_bad_index_is_a_clear_error(tmp_path: Path, damage: str, words: str) -> None:
    state = _state()
    write_sharded(tmp_path / "m", state, per_shard=4)
    index = tmp_path / "m" / "model.safetensors.index.json"
    body = json.loads(index.read_text())
    first = "model-00001-of-00002.safetensors"
    if damage == "missing shard":
        (tmp_path / "m" / first).unlink()
    elif damage == "extra tensor":
        del body["weight_map"]["model.layers.0.w"]
    elif damage == "lacking tensor":
        body["weight_map"]["ghost"] = first
    elif damage == "escaping name":
        body["weight_map"]["model.layers.0.w"] = "../elsewhere.safetensors"
    elif damage == "no weight map":
        body = {"metadata": {}}
    index.write_text("{nope" if damage == "not json" else json.dumps(body))
    with pytest.raises(CheckpointError, match=words):
        llmwire.open_checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError, match="without model weights"):
        llmwire.open_checkpoint(tmp_path)  # a directory with no weights at all


def test_shard_plan_and_sizes() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 << 20
    assert parse_size(1234) == 1234
    for bad in ("", "5XB", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    # transformers' rule: a new shard when the next tensor would go over; a big one alone
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"],
                                                                        ["d"]]


async def _loopback(state: Any, into: Any) -> Any:
    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def handler(transport: Any) -> None:
        try:
            received.set_result(await llmwire.receive_state_dict(transport, into))
        except Exception as exc:  # reported through the future
            received.set_exception(exc)

    server = await llmwire.serve(handler, "127.0.0.1", 0, secret=b"s")
    try:
        transport = await llmwire.connect("127.0.0.1", server.port, secret=b"s")
        try:
            await llmwire.send_state_dict(transport, state)
        except BaseException:
            await asyncio.wait_for(asyncio.gather(received, return_exceptions=True), 30)
            raise
        finally:
            await transport.close()
        return await asyncio.wait_for(received, 30)
    finally:
        await server.close()


def test_a_state_dict_lands_as_shards_with_an_index(tmp_path: Path) -> None:
    state = _state()
    state["tied"] = state["model.layers.0.w"]  # tied: written with its source
    out = tmp_path / "out"
    path = asyncio.run(_loopback(state, llmwire.ShardedSink(out, max_shard_size=70_000)))
    assert path == out and not (tmp_path / "out.part").exists()
    names, shards = read_index(str(out / "model.safetensors.index.json"))
    assert len(shards) == 4 and shards[0] == "model-00001-of-00004.safetensors"
    assert names["tied"] == names["model.layers.0.w"]
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(str(out / shard)))  # each shard loads with safetensors itself
    _same(merged, state)
    with llmwire.open_checkpoint(out) as back:  # and as a sharded checkpoint again
        _same(back.load(), state)
    # everything in one shard: model.safetensors and no index, as transformers does
    one = asyncio.run(_loopback(state, llmwire.ShardedSink(tmp_path / "one")))
    assert sorted(p.name for p in one.iterdir()) == ["model.safetensors"]
    # an existing directory is refused, and nothing of the attempt stays
    with pytest.raises(llmwire.PayloadRefused, match="exists"):
        asyncio.run(_loopback(state, llmwire.ShardedSink(tmp_path / "one")))
    assert not (tmp_path / "one.part").exists()


def test_a_real_transformers_model_loads_from_the_shards(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="the [learn] extra is not "
                                                               "installed")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out = tmp_path / "llama"
    asyncio.run(_loopback(model.state_dict(), llmwire.ShardedSink(out, max_shard_size=100_000)))
    assert len(read_index(str(out / "model.safetensors.index.json"))[1]) > 1
    config.save_pretrained(out)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _same(loaded.state_dict(), model.state_dict())
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert loaded(ids).logits.shape == (1, 12, 512)
