"""The memory profiler's sender and receiver processes (``llmwire profile``).

Each runs in a fresh spawned process so that its RSS is its own. The parent
drives both through a pipe: ``alive`` (interpreter and imports ready; the
sampler starts), ``build`` → ``built`` (the model or target exists), ``go``
(the baseline) → ``sent`` / ``received`` (the transfer), then ``verify`` →
``verified``: the receiver checks what arrived only once the parent has
marked the transfer's end, so the check's memory is never counted.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from ._models import ModelSource
from ._procs import guard

__all__ = ["SECRET", "receiver", "sender"]

SECRET = b"llmwire-profile"
TIMEOUT = 900.0


def _max_err(received: dict[str, Any], expected: dict[str, Any],
             chunk: int = 1 << 22) -> float:
    """Largest absolute difference, compared ``chunk`` elements at a time so
    that checking a large model does not need float64 copies of it."""
    if set(received) != set(expected):
        raise RuntimeError("received keys differ from the sent state dict")
    err = 0.0
    for name, want in expected.items():
        got = received[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise RuntimeError(f"{name!r} arrived as {got.dtype} {tuple(got.shape)}, "
                               f"sent as {want.dtype} {tuple(want.shape)}")
        got, want = got.reshape(-1), want.reshape(-1)
        for i in range(0, got.numel(), chunk):
            diff = got[i:i + chunk].double() - want[i:i + chunk].double()
            err = max(err, float(diff.abs_().max()))
    return err


def _pack_regular(state: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Regular mode's one message: tensors as they are (raw) or, for a
    quantized format, each float tensor's parts (small and integer tensors
    raw, the rule ``send_state_dict`` follows)."""
    import llmwire
    from llmwire.quant.codec import MIN_ELEMENTS

    if fmt == "raw":
        return state
    chosen = {k: v for k, v in state.items()
              if v.is_floating_point() and v.numel() >= MIN_ELEMENTS}
    packed = {k: {"spec": q.spec.to_header(), "parts": q.parts}
              for k, q in llmwire.quantize_state_dict(chosen, fmt, min_elements=0).items()}
    return {k: packed.get(k, v) for k, v in state.items()}


def _unpack_regular(obj: dict[str, Any]) -> dict[str, Any]:
    import llmwire
    from llmwire.quant.codec import QuantizedTensor, TensorSpec

    return {k: llmwire.dequantize(QuantizedTensor(TensorSpec.from_header(v["spec"]),
                                                  dict(v["parts"]), container="torch"))
            if isinstance(v, dict) else v for k, v in obj.items()}


def _imports() -> None:
    """Everything the transfer will need, before the baseline: an import
    during the transfer would count as transfer memory."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import llmwire  # noqa: F401
    import llmwire.payloads  # noqa: F401


def receiver(conn: Any, mode: str, fmt: str, into: str, model: ModelSource,
             workdir: str) -> None:
    guard(conn, lambda: _receiver(conn, mode, fmt, into, model, workdir))


def _receiver(conn: Any, mode: str, fmt: str, into: str, model: ModelSource,
              workdir: str) -> None:
    import asyncio

    import llmwire

    _imports()
    conn.send(("alive", None))
    conn.recv()  # build
    target = model.zeros() if mode == "container" and into == "inplace" else None
    outdir = os.path.join(workdir, "received")
    os.makedirs(outdir, exist_ok=True)

    async def receive(t: Any) -> Any:
        if mode == "regular":
            return _unpack_regular(await llmwire.receive_object(t, max_size=1 << 40))
        if mode == "container":
            arg = {"memory": None, "inplace": target,
                   "safetensors": os.path.join(outdir, "model.safetensors")}[into]
            return await llmwire.receive_state_dict(t, arg, overwrite=True)
        return await llmwire.receive_file(t, outdir, overwrite=True)

    async def main() -> Any:
        done = asyncio.get_running_loop().create_future()
        closed = asyncio.Event()

        async def handler(t: Any) -> None:
            try:
                received = await receive(t)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # main() reports it; the server need not log it
                if not done.done():
                    done.set_exception(exc)
                return
            await t.send_message({"ok": True})
            done.set_result(received)
            await t.wait_closed()  # the sender hangs up once it has the answer
            closed.set()

        server = await llmwire.serve(handler, "127.0.0.1", 0, secret=SECRET)
        conn.send(("built", server.port))
        try:
            received = await asyncio.wait_for(done, TIMEOUT)
            try:
                await asyncio.wait_for(closed.wait(), 60)
            except asyncio.TimeoutError:
                raise RuntimeError("the sender did not hang up within 60 s of the "
                                   "acknowledgement") from None
            return received
        finally:
            await server.close()

    received = llmwire.run(main())
    conn.send(("received", None))
    conn.recv()  # verify: the parent has marked the end of the transfer
    if mode == "file":
        err = 0.0  # receive_file checked the whole-file digest
    else:
        if mode == "container" and into == "safetensors":
            from safetensors.torch import load_file
            received = load_file(received)
        err = _max_err(received, model.reference())
        if fmt == "raw" and err != 0.0:
            raise RuntimeError(f"raw transfer restored with error {err}")
    conn.send(("verified", err))


def sender(conn: Any, mode: str, fmt: str, model: ModelSource, workdir: str) -> None:
    guard(conn, lambda: _sender(conn, mode, fmt, model, workdir))


def _sender(conn: Any, mode: str, fmt: str, model: ModelSource, workdir: str) -> None:
    import llmwire

    _imports()
    conn.send(("alive", None))
    conn.recv()  # build
    state: Any = None
    path = ""
    if mode == "file":
        path = model.checkpoint(workdir)
        gc.collect()
    else:
        state = model.build()
    conn.send(("built", None))
    port = conn.recv()  # go

    async def main() -> tuple[float, int]:
        t = await llmwire.connect("127.0.0.1", port, secret=SECRET)
        started = time.perf_counter()
        if mode == "regular":
            wire = await llmwire.send_object(t, _pack_regular(state, fmt))
        elif mode == "container":
            wire = (await llmwire.send_state_dict(t, state, fmt)).wire_bytes
        else:
            wire = (await llmwire.send_file(t, path)).bytes_transferred
        await t.receive_message()
        elapsed = time.perf_counter() - started
        await t.close()
        return elapsed, wire

    conn.send(("sent", llmwire.run(main())))
