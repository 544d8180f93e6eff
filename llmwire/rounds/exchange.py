"""The messages of a federated round, both ends: the server broadcasts the
global (whole, or as an update of the previous one), each client sends its
update (local - global) back.

Every round message carries its round number (stream header ``round``) and,
for an update, the reference it applies to (manifest: round and digest).

Downlink. :func:`broadcast_update` sends the server's averaged update as one
encoding to every client and applies exactly what they will restore to the
server's own global, so that afterwards server and clients hold the same
bits (each client's receipt carries its digest; a client whose digest
differs is reported as failed). A client that missed a round holds another
reference: it is refused the update (:class:`~llmwire.rounds.ReferenceMismatch`)
and gets whole weights with :func:`broadcast_state` (raw: lossless, so its
copy is the server's again).

Uplink. :func:`send_update` sends ``local - global`` (quantized in any
format; unchanged tensors cost nothing), with error feedback if asked;
the server's :class:`~llmwire.rounds.Aggregator` takes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import NonFiniteError, PayloadError, PayloadRefused
from ..payloads.sinks import InPlaceSink
from ..payloads.statedict import (
    DEFAULT_SLICE_BYTES, _accept, _answer_on, _receive, plan_state_dict, send_planned,
)
from ..quant.codec import MIN_ELEMENTS
from ..transport.base import RecvStream, Transport
from .broadcast import DEFAULT_WINDOW, BroadcastResult, broadcast_planned
from .feedback import ErrorFeedback
from .reference import Reference, state_digest
from .sinks import ApplySink
from .update import plan_delta, plan_increment

__all__ = ["send_update", "receive_update", "broadcast_update", "broadcast_state",
           "announce", "read_announce", "UpdateResult", "Diverged", "HELLO_KIND"]


class Diverged(PayloadError):
    """A client applied the update and holds other bits than the server (it
    reported another digest). Send it whole weights."""


@dataclass(frozen=True)
class UpdateResult:
    """A client's upload: bytes on the wire, entries sent as deltas and as
    unchanged, non-finite values mapped, seconds, the server's receipt."""

    wire_bytes: int
    deltas: int
    unchanged: int
    nonfinite: int
    seconds: float
    receipt: dict[str, Any]


async def send_update(transport: Transport, state: Mapping[str, Any],
                      base: Mapping[str, Any], reference: Reference, fmt: str = "nf4", *,
                      client: str, weight: float = 1.0, feedback: ErrorFeedback | None = None,
                      overrides: Mapping[str, str] | None = None,
                      min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                      nested: bool = False, nonfinite: str = "saturate",
                      slice_bytes: int = DEFAULT_SLICE_BYTES,
                      progress: Any = None) -> UpdateResult:
    """Send ``state - base`` (``base``: the global of round ``reference``, as
    received) to the server's aggregator, as client ``client`` with FedAvg
    weight ``weight``. Returns once the server folded it into its sums; a
    refusal (stale round, duplicate, another reference) raises with the
    server's reason. With ``feedback``, its residual for the uplink is added
    first and updated; a failed send resets it (feedback.py). ``progress(done,
    total)`` follows the bytes sent."""
    started = time.perf_counter()
    manifest, views = plan_delta(state, base, fmt, reference=reference, feedback=feedback,
                                 overrides=overrides, min_elements=min_elements,
                                 block_size=block_size, nested=nested, slice_bytes=slice_bytes)
    header = {"round": reference.round, "client": client, "weight": weight}
    try:
        wire, found, receipt = await send_planned(transport, manifest, views, nonfinite,
                                                  header=header, progress=progress)
    except BaseException:
        if feedback is not None:
            feedback.reset("uplink")
        raise
    return UpdateResult(wire, sum(e.mode == "delta" for e in manifest.entries),
                        sum(e.mode == "zero" for e in manifest.entries), found,
                        time.perf_counter() - started, receipt)


async def receive_update(source: Transport | RecvStream, state: Mapping[str, Any],
                         have: Reference | None, *, feedback: ErrorFeedback | None = None,
                         transport: Transport | None = None) -> Reference:
    """Receive the round's global into ``state``, in place: an update of
    ``have`` (the reference ``state`` holds), or whole weights. Returns the
    reference ``state`` now holds (its round and digest).

    An update of another reference is refused before anything is touched
    (:class:`~llmwire.rounds.ReferenceMismatch`: ask for whole weights); one
    that fails midway leaves ``state`` matching no reference. ``feedback``:
    this client's error feedback, reset when whole weights replace its
    reference (its residuals belong to the old chain of updates).
    """
    stream = await _accept(source)
    answer = _answer_on(source, stream, transport)
    round_ = stream.header.get("round")
    probe = _Probe(state, have, round_)
    outcome: dict[str, Any] = {}
    try:
        async for _ in _receive(stream, probe, None, None, answer, outcome):
            pass
    finally:
        if feedback is not None and probe.whole is not None:
            feedback.reset()  # landed or not, the old chain is gone
    return outcome["result"]


class _Probe(ApplySink):
    """An :class:`ApplySink` for an update, an in-place sink for whole weights:
    which one is known once the manifest is read."""

    def __init__(self, state: Mapping[str, Any], have: Reference | None, round_: Any) -> None:
        super().__init__(state, have or Reference(-1, ""))
        self.have, self.round = have, round_
        self.whole: InPlaceSink | None = None

    def prepare(self, manifest: Any) -> None:
        if manifest.is_update:
            if self.have is None:
                raise PayloadRefused("an update came, and this receiver holds no reference: "
                                     "send whole weights", "ReferenceMismatch")
            super().prepare(manifest)
            return
        if type(self.round) is not int or self.round < 0:
            raise PayloadRefused("whole weights must say their round (stream header 'round')")
        self.whole = InPlaceSink(self.state, strict=True)
        self.whole.prepare(manifest)

    def target(self, entry: Any) -> Any:
        return self.whole.target(entry) if self.whole is not None else super().target(entry)

    def tie(self, entry: Any, source: Any) -> None:
        (self.whole.tie if self.whole is not None else super().tie)(entry, source)

    def commit(self) -> Reference:
        if self.whole is None:
            return super().commit()
        self.result = Reference(self.round, state_digest(self.state))
        return self.result


async def broadcast_update(transports: Sequence[Transport], update: Mapping[str, Any],
                           state: Mapping[str, Any], reference: Reference,
                           fmt: str = "nf4", *, feedback: ErrorFeedback | None = None,
                           policy: str = "wait", progress_timeout: float | None = None,
                           window: int = DEFAULT_WINDOW,
                           overrides: Mapping[str, str] | None = None,
                           min_elements: int = MIN_ELEMENTS, block_size: int | None = None,
                           nested: bool = False, nonfinite: str = "saturate",
                           slice_bytes: int = DEFAULT_SLICE_BYTES) -> BroadcastResult:
    """Send ``update`` (e.g. the aggregate's mean) as an update of ``state``
    (the global of round ``reference``) to every transport, encoded once,
    and apply what they restore to ``state`` itself. Returns per-peer
    results and, in ``reference``, the new global's reference (round + 1);
    a peer that landed it but reports another digest is marked failed
    (:class:`Diverged`). With ``feedback``, the broadcast's residual carries
    what quantization dropped into the next round's update.

    With ``nonfinite="raise"`` a non-finite value in ``update`` raises
    :class:`~llmwire.NonFiniteError` before anything is sent or applied. Any
    other error while encoding (the thread pool failing, memory) leaves
    ``state`` partly updated, matching no reference: re-send whole weights
    (:func:`broadcast_state`) after fixing it."""
    if nonfinite == "raise":
        _check_finite(update)
    manifest, views = plan_increment(update, state, fmt, reference=reference,
                                     feedback=feedback, apply_to=state, overrides=overrides,
                                     min_elements=min_elements, block_size=block_size,
                                     nested=nested, slice_bytes=slice_bytes)
    result = await broadcast_planned(transports, manifest, views, nonfinite,
                                     header={"round": reference.round + 1}, policy=policy,
                                     progress_timeout=progress_timeout, window=window)
    new = Reference(reference.round + 1, state_digest(state))
    peers = []
    for peer in result.peers:
        if peer.landed and peer.receipt.get("digest") != new.digest:
            peer = replace(peer, status="failed", error=Diverged(
                f"peer {peer.index} holds {peer.receipt.get('digest')!r} after the update, "
                f"the server {new.digest!r}"))
        peers.append(peer)
    return replace(result, peers=peers, reference=new)


def _check_finite(update: Mapping[str, Any]) -> None:
    """Raise before anything is applied."""
    from ..tensors import view_tensor

    for name, tensor in update.items():
        view = view_tensor(tensor)
        if not view.numel or view.flat is None:
            continue
        if view.dtype == "bfloat16":  # bit patterns: an all-ones exponent is NaN or inf
            bad = int(np.count_nonzero((view.flat & 0x7F80) == 0x7F80))
        elif view.dtype in ("float16", "float32", "float64"):
            bad = view.flat.size - int(np.count_nonzero(np.isfinite(view.flat)))
        else:
            continue
        if bad:
            raise NonFiniteError(bad, name)


async def broadcast_state(transports: Sequence[Transport], state: Mapping[str, Any],
                          round: int, *, policy: str = "wait",
                          progress_timeout: float | None = None,
                          window: int = DEFAULT_WINDOW) -> BroadcastResult:
    """Send the whole ``state`` (raw, lossless) as the global of ``round`` to
    every transport, encoded once; the receivers' copies then equal it bit
    for bit (``reference`` in the result)."""
    manifest, views = plan_state_dict(state, "raw")
    result = await broadcast_planned(transports, manifest, views, header={"round": round},
                                     policy=policy, progress_timeout=progress_timeout,
                                     window=window)
    return replace(result, reference=Reference(round, state_digest(state)))


#: the stream kind of a client's hello
HELLO_KIND = "round-hello"


async def announce(transport: Transport, client: str, have: Reference | None) -> None:
    """Tell the server who this client is and what it holds (so it can send an
    update of that reference, or whole weights)."""
    await transport.send_message({"kind": HELLO_KIND, "client": client,
                                  "have": have.to_wire() if have is not None else None})


async def read_announce(transport: Transport) -> tuple[str, Reference | None]:
    """The next message, a client's :func:`announce`: ``(client, its reference)``."""
    msg = await transport.receive_message(64 * 1024)
    header = msg.header if isinstance(msg.header, dict) else {}
    client = header.get("client")
    if header.get("kind") != HELLO_KIND or not isinstance(client, str) or not client:
        raise PayloadError(f"expected a {HELLO_KIND!r} message naming its client, got "
                           f"{header.get('kind')!r}")
    return client, Reference.from_wire(header.get("have"))
