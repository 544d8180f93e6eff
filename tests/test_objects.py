"""Object payloads ("regular" mode): whole values through msgpack."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest
import torch
from conftest import arun

import llmwire
from llmwire import ManifestError, PayloadError
from llmwire.payloads.objects import pack_object, unpack_object


def test_round_trip_of_a_mixed_value_over_a_transport():
    value = {
        "round": 3, "lr": 0.5, "name": "client-7", "raw": b"\x00\xff", "none": None,
        "list": [1, 2.5, "x"], "tuple": (1, 2),
        "array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ints": np.arange(5, dtype=np.int64), "scalar": np.float32(1.5),
        "tensor": torch.randn(4, 5), "bf16": torch.randn(3).bfloat16(),
        "strided": torch.randn(6, 4).t(), "empty": np.zeros((0, 3), np.float16),
        "nested": {"deep": [{"t": torch.ones(2, dtype=torch.bool)}]},
    }

    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        size, got = await asyncio.gather(llmwire.send_object(a, value),
                                         llmwire.receive_object(b))
        assert size > 0
        await a.close()
        await b.close()
        return got

    got = arun(main())
    assert got["round"] == 3 and got["raw"] == b"\x00\xff" and got["tuple"] == [1, 2]
    assert got["scalar"] == 1.5
    assert isinstance(got["array"], np.ndarray) and np.array_equal(got["array"], value["array"])
    assert got["array"].flags.writeable
    assert np.array_equal(got["ints"], value["ints"]) and got["empty"].shape == (0, 3)
    assert torch.equal(got["tensor"], value["tensor"])
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], value["bf16"])
    assert torch.equal(got["strided"], value["strided"])
    assert torch.equal(got["nested"]["deep"][0]["t"], torch.ones(2, dtype=torch.bool))


def test_unsupported_values_are_refused_before_sending():
    with pytest.raises(PayloadError, match="set"):
        pack_object({"s": {1, 2}})
    with pytest.raises(PayloadError):
        pack_object(np.zeros(3, dtype=np.complex64))


@pytest.mark.parametrize("data", [
    b"\xc1", msgpack.packb(msgpack.ExtType(9, b"x")),
    msgpack.packb(msgpack.ExtType(1, b"\x05\x00\x00\x00\x92\xa3bad\x90")),
    msgpack.packb(msgpack.ExtType(1, b"\x01\x00")),
    msgpack.packb(msgpack.ExtType(1, b"\x0b\x00\x00\x00" + msgpack.packb(["float32", [-1]]))),
    msgpack.packb(msgpack.ExtType(1, b"\x0c\x00\x00\x00" + msgpack.packb(["float32", [3]])
                                  + b"\x00" * 5)),
], ids=["garbage", "unknown-ext", "bad-dtype", "short", "negative-dim", "short-data"])
def test_hostile_payloads_raise_manifest_error(data):
    with pytest.raises(ManifestError):
        unpack_object(data)


def test_max_size_is_enforced_and_the_connection_survives():
    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_object(a, np.zeros(100_000)))
        with pytest.raises(PayloadError, match="max_size"):
            await llmwire.receive_object(b, max_size=1000)
        await asyncio.gather(send, return_exceptions=True)
        _, got = await asyncio.gather(llmwire.send_object(a, [1]), llmwire.receive_object(b))
        assert got == [1]
        await a.close()
        await b.close()
    arun(main())


def test_a_state_dict_stream_is_not_an_object():
    async def main():
        a, b = await llmwire.memory_pair(secret=b"s")
        send = asyncio.ensure_future(llmwire.send_state_dict(a, {"x": torch.ones(3)}))
        with pytest.raises(ManifestError, match="state_dict"):
            await llmwire.receive_object(b)
        await asyncio.gather(send, return_exceptions=True)
        await a.close()
        await b.close()
    arun(main())
