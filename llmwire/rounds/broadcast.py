"""Broadcast: encode once, send to N.

:func:`broadcast_planned` sends one planned state dict or update to many
transports at once. Each slice is encoded once (on the thread pool, into a
fixed pool of buffers) and the same bytes go to every peer; a buffer is
reused once every peer still in the broadcast has sent it. So the server
holds ``PIPELINE_DEPTH + window`` encoded slices, never N copies and never a
whole encoded model, and the fastest peer runs at most ``window`` slices
ahead of the slowest.

A slow peer therefore holds the others back, never unboundedly:

- ``policy="wait"`` (the default): the others wait for it, ``window`` slices
  ahead at most;
- ``policy="drop"``: a peer stuck for ``progress_timeout`` seconds — a
  slice it has not finished sending, or, once all is sent, a verdict it has
  not given — is dropped (its stream cancelled; its result says
  ``dropped``), and the rest go on. Under ``wait`` a peer that never answers
  holds the broadcast for ever: use ``drop`` with peers you do not trust.

A peer that fails (disconnects, refuses) leaves the broadcast; the others are
not disturbed. The result says, per peer, what landed. Encoding always runs
to the end, so a sender applying the update to its own copy (``apply_to``)
is consistent whoever received it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import LlmwireError, PayloadError, StreamCancelled
from ..payloads.manifest import Manifest
from ..payloads.slices import PIPELINE_DEPTH, Encoded, SliceEncoder
from ..payloads.statedict import (
    STREAM_KIND, VERDICT_OK, _check_sources, _raise_verdict, _receive_verdict,
)
from ..payloads.verdict import QUEUED_REPLY_WAIT
from ..transport.base import SendStream, Transport

__all__ = ["broadcast_planned", "PeerResult", "BroadcastResult", "POLICIES",
           "DEFAULT_WINDOW"]

POLICIES = ("wait", "drop")
#: slices the fastest peer may run ahead of the slowest
DEFAULT_WINDOW = 8
_END = object()


@dataclass(frozen=True)
class PeerResult:
    """What one peer of a broadcast got: ``status`` is ``landed`` (its
    receiver said so; ``receipt`` is its receipt), ``failed`` (``error``
    says why) or ``dropped`` (too slow under ``policy="drop"``)."""

    index: int
    status: str
    error: BaseException | None = None
    receipt: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    sent_bytes: int = 0

    @property
    def landed(self) -> bool:
        return self.status == "landed"


@dataclass(frozen=True)
class BroadcastResult:
    """The outcome of a broadcast: one :class:`PeerResult` per transport, in
    order; ``wire_bytes`` per peer (manifest and body); ``nonfinite`` values
    the block formats mapped; ``reference``: the sender's own state after the
    update (when it applied it to itself), else None."""

    peers: list[PeerResult]
    wire_bytes: int
    seconds: float
    nonfinite: int = 0
    reference: Any = None

    @property
    def landed(self) -> list[int]:
        return [p.index for p in self.peers if p.landed]


class _Peer:
    def __init__(self, index: int, transport: Transport) -> None:
        self.index, self.transport = index, transport
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stream: SendStream | None = None
        self.key = uuid.uuid4().hex
        self.alive = True
        self.status = "landed"
        self.error: BaseException | None = None
        self.receipt: dict[str, Any] = {}
        self.sent = 0
        self.busy_since: float | None = None  # when its current send began
        self.task: asyncio.Task[None] | None = None


async def broadcast_planned(transports: Sequence[Transport], manifest: Manifest,
                            views: Mapping[str, Any], nonfinite: str = "saturate", *,
                            header: Mapping[str, Any] | None = None, policy: str = "wait",
                            progress_timeout: float | None = None,
                            window: int = DEFAULT_WINDOW) -> BroadcastResult:
    """Send ``manifest`` (and the slices encoded from ``views``) to every
    transport, each slice encoded once; wait for every peer's verdict."""
    if policy not in POLICIES:
        raise PayloadError(f"policy must be one of {POLICIES}, not {policy!r}")
    if policy == "drop" and not (progress_timeout and progress_timeout > 0):
        raise PayloadError("policy='drop' needs a positive progress_timeout")
    if window < 1:
        raise PayloadError("window must be at least 1")
    started = time.perf_counter()
    prefix = manifest.to_bytes()
    encoder = SliceEncoder(manifest, views, nonfinite, buffers=PIPELINE_DEPTH + window)
    peers = [_Peer(i, t) for i, t in enumerate(transports)]
    holders: dict[int, list[Any]] = {}  # id(item) -> [item, peers still to send it]

    def done_with(item: Encoded) -> None:
        held = holders.get(id(item))
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del holders[id(item)]
            encoder.release(item)

    def leave(peer: _Peer, status: str, error: BaseException | None) -> None:
        if not peer.alive:
            return
        peer.alive, peer.status, peer.error = False, status, error
        while not peer.queue.empty():  # what it will never send
            item = peer.queue.get_nowait()
            if item is not _END:
                done_with(item)

    async def run_peer(peer: _Peer) -> None:
        try:
            peer.busy_since = time.monotonic()
            peer.stream = await peer.transport.open_stream(
                {**(header or {}), "kind": STREAM_KIND, "id": peer.key})
            await peer.stream.send(prefix)
            peer.busy_since = None
            while True:
                item = await peer.queue.get()
                if item is _END:
                    break
                peer.busy_since = time.monotonic()
                try:
                    await peer.stream.send(item.data)
                finally:
                    peer.busy_since = None
                    done_with(item)
                peer.sent += len(item.data)
            peer.busy_since = time.monotonic()  # a peer that never answers is stuck too
            await peer.stream.end()
            verdict = await _receive_verdict(peer.transport, peer.key)
            peer.busy_since = None
            if verdict["kind"] != VERDICT_OK:
                _raise_verdict(verdict, None, peer.stream.stream_id, None)
            receipt = verdict.get("receipt")
            peer.receipt = receipt if isinstance(receipt, dict) else {}
        except asyncio.CancelledError:
            if peer.status != "dropped":
                raise
        except StreamCancelled as exc:
            reason: BaseException = exc
            if exc.remote:  # the receiver says why, first
                with contextlib.suppress(asyncio.TimeoutError, LlmwireError):
                    verdict = await asyncio.wait_for(
                        _receive_verdict(peer.transport, peer.key), QUEUED_REPLY_WAIT)
                    try:
                        _raise_verdict(verdict, None, exc.stream_id, exc)
                    except LlmwireError as refused:
                        reason = refused
            leave(peer, "failed", reason)
        except (LlmwireError, OSError) as exc:
            leave(peer, "failed", exc)
        finally:
            if not peer.alive and peer.stream is not None:
                with contextlib.suppress(LlmwireError, OSError):
                    await peer.stream.cancel(reason=f"broadcast: {peer.status}")

    async def watch() -> None:
        assert progress_timeout is not None
        while True:
            await asyncio.sleep(progress_timeout / 4)
            now = time.monotonic()
            for peer in peers:
                if peer.alive and peer.busy_since is not None \
                        and now - peer.busy_since > progress_timeout:
                    leave(peer, "dropped", None)
                    assert peer.task is not None
                    peer.task.cancel()

    for peer in peers:
        peer.task = asyncio.ensure_future(run_peer(peer))
    watcher = asyncio.ensure_future(watch()) if policy == "drop" else None
    try:
        async with contextlib.aclosing(encoder.slices()) as slices:
            async for item in slices:
                active = [p for p in peers if p.alive]
                if not active:  # nobody listens: still encode, for the sender's own copy
                    encoder.release(item)
                    continue
                holders[id(item)] = [item, len(active)]
                for peer in active:
                    peer.queue.put_nowait(item)
        _check_sources(views)
        for peer in peers:
            if peer.alive:
                peer.queue.put_nowait(_END)
        await asyncio.gather(*(p.task for p in peers if p.task is not None),
                             return_exceptions=True)
    except BaseException as exc:
        for peer in peers:
            leave(peer, "failed", exc)
            if peer.task is not None:
                peer.task.cancel()
        await asyncio.gather(*(p.task for p in peers if p.task is not None),
                             return_exceptions=True)
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    results = [PeerResult(p.index, p.status if not p.alive else "landed", p.error, p.receipt,
                          time.perf_counter() - started, p.sent) for p in peers]
    return BroadcastResult(results, len(prefix) + manifest.body_nbytes,
                           time.perf_counter() - started, encoder.found)
