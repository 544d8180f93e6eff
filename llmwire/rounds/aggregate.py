"""Aggregating a round's uploads as they arrive, without one model per client,
and without a failed client poisoning the round.

:class:`Aggregator` keeps one running sum per float tensor of the reference
(float32, or float64) and adds into it ``weight x restored delta`` of each
upload as its slices arrive:

1. An upload is refused at once, before anything is added, if it is for
   another round, another reference (digest), from a client that already
   sent (or is sending) this round, after the round closed, or if its
   manifest does not fit the reference (names, shapes, dtypes; a changed
   integer tensor).
2. Each slice is decoded on the thread pool and added under its tensor's
   lock (concurrent uploads lose no addition), and the bytes as received,
   still encoded (nf4: 14 % of fp32), are written to an unlinked temporary
   file: an undo log, read only if the upload fails.
3. Once the stream's digest verified, the upload counts: the client is told
   it landed and the log is dropped. If it fails instead (the client
   disconnects, is cancelled, a digest fails), the log is read back and
   exactly the slices that were added are subtracted again (weight negated),
   so the sums are those of the other uploads, to the rounding of one
   addition and one subtraction (exact with float64 sums, within float32
   rounding with float32 ones).

Memory: the sums, plus per connection its flow-control window and a few
slices. Disk: the encoded size of the uploads being received at the same
time (page cache, released as each verifies).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import (
    ConnectionClosed, IntegrityError, LlmwireError, ManifestError, PayloadError,
    PayloadRefused,
)
from ..payloads.reader import SpooledStream, TeeStream
from ..payloads.statedict import STREAM_KIND, VERDICT_FAILED, VERDICT_OK, _receive
from ..payloads.verdict import failure_fields, refuse_stream, reply_quietly
from ..transport.base import RecvStream, Transport
from .reference import Reference
from .sinks import AccumulateSink, float_sums

__all__ = ["Aggregator", "Upload", "Aggregate", "AggregationError", "UploadStalled", "MAX_WEIGHT",
           "MAX_CLIENT_NAME"]

#: the largest FedAvg weight an upload may carry (e.g. a sample count)
MAX_WEIGHT = 1e15
#: the longest client name an upload may carry
MAX_CLIENT_NAME = 256


class UploadStalled(PayloadError):
    """An upload brought no byte for the aggregator's ``progress_timeout``: it
    is given up (its slices taken back out) and its slot goes to the next."""


class AggregationError(PayloadError):
    """Taking a failed upload's slices back out of the sums failed (its log
    was unreadable): the sums are no longer trustworthy and the aggregator
    refuses everything from then on."""


@dataclass(frozen=True)
class Upload:
    """One verified upload: who, with what weight, how many bytes, how long."""

    client: str
    weight: float
    wire_bytes: int
    seconds: float


@dataclass(frozen=True)
class Aggregate:
    """A closed round: the weighted mean update by name (flat arrays, views
    of the sums), and the clients (with weights) it is the mean of."""

    update: dict[str, np.ndarray]
    clients: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0


class Aggregator:
    """Streaming FedAvg of one round's updates against ``state`` (the global
    model, named ``reference``).

    Run :meth:`receive` once per client upload (concurrently: one call per
    connection handler); then :meth:`close` gives the mean of exactly the
    uploads that verified. ``dtype`` of the sums: ``float32`` (default) or
    ``float64``. ``spool_dir``: where the undo logs of uploads in progress go
    (default: the system's temp directory). ``max_upload_bytes`` refuses
    larger uploads (their restored size) before anything is added.
    ``concurrency``: uploads read and added at once (default 2; the others
    wait, checked but unread, held by flow control), so the server's memory
    is the same for 2 clients or 200 — besides the sums, ``concurrency``
    uploads' slices and each connection's receive window.
    """

    def __init__(self, state: Mapping[str, Any], reference: Reference, *,
                 dtype: str = "float32", spool_dir: str | os.PathLike[str] | None = None,
                 max_upload_bytes: int | None = None, concurrency: int = 2,
                 progress_timeout: float | None = None) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise PayloadError(f"concurrency must be a positive int, not {concurrency!r}")
        if progress_timeout is not None and not progress_timeout > 0:
            raise PayloadError(f"progress_timeout must be positive, not {progress_timeout!r}")
        self.progress_timeout = progress_timeout
        self.state, self.reference = state, reference
        self.sums = float_sums(state, dtype)  # zero pages, touched now: RSS up front
        self.dtype = dtype
        self.spool_dir = None if spool_dir is None else os.fspath(spool_dir)
        self.max_upload_bytes = max_upload_bytes
        self.weight = 0.0
        self.clients: dict[str, float] = {}
        self.uploads: list[Upload] = []
        self._busy: set[str] = set()
        self._locks = {id(a): threading.Lock() for a in self.sums.values()}
        self._slots = asyncio.Semaphore(concurrency)
        self._closed = False
        self._broken: str | None = None

    @property
    def round(self) -> int:
        return self.reference.round

    async def receive(self, source: Transport | RecvStream, *, client: str | None = None,
                      weight: float | None = None) -> Upload:
        """Receive one client's update (``source``: a transport, whose next
        stream it is, or a stream already accepted) and fold it into the sums
        as it arrives; it counts once its digest verified. ``client`` and
        ``weight`` default to the stream header's (``send_update`` sends them).
        The client is told the outcome; a refusal or failure raises here too,
        and the sums are then as if this upload never came."""
        stream = source if isinstance(source, RecvStream) else await source.accept_stream()
        started = time.perf_counter()
        header = stream.header if isinstance(stream.header, dict) else {}
        answer = stream.transport if isinstance(source, RecvStream) else source
        key = header.get("id")
        try:
            who, weight = self._admit(header, client, weight)
        except (PayloadRefused, AggregationError) as exc:
            await refuse_stream(stream, exc, transport=answer)
            raise
        self._busy.add(who)
        sink = AccumulateSink(self.sums, weight, state=self.state, reference=self.reference,
                              locks=self._locks)
        log = None
        try:
            try:
                try:
                    log = tempfile.TemporaryFile(dir=self.spool_dir)
                except OSError as exc:
                    raise PayloadError(f"the aggregator cannot spool an upload in "
                                       f"{self.spool_dir or tempfile.gettempdir()}: "
                                       f"{exc.strerror or exc}") from exc
                tee = TeeStream(stream, log.fileno())
                async with self._slots:  # the others wait, unread: flow control holds them
                    await self._read(tee, sink, who)
            except BaseException as exc:
                # The undo starts first and runs to its end whatever cancels us
                # meanwhile; the client hears why while it runs.
                undo = asyncio.ensure_future(self._undo(log.fileno(), tee, sink, weight, exc)) \
                    if sink.added and log is not None else None
                try:
                    if not isinstance(exc, ConnectionClosed) and isinstance(key, str):
                        if log is None:  # not even a spool: the stream was never read
                            await refuse_stream(stream, exc, transport=answer)
                        else:
                            await reply_quietly(answer, VERDICT_FAILED, id=key,
                                                **failure_fields(exc))
                finally:
                    if undo is not None:
                        await _to_the_end(undo)
                raise
        finally:
            if log is not None:
                log.close()
            self._busy.discard(who)
        self.clients[who] = weight
        self.weight += weight
        upload = Upload(who, weight, tee.written, time.perf_counter() - started)
        self.uploads.append(upload)
        if isinstance(key, str):
            await reply_quietly(answer, VERDICT_OK, id=key,
                                receipt={"round": self.round, "client": who, "weight": weight})
        return upload

    async def _read(self, tee: TeeStream, sink: AccumulateSink, who: str) -> None:
        """Read and add the whole upload; with a progress timeout, give up on
        one that brings no byte for that long (its slot goes to the next)."""
        async def consume() -> None:
            async for _ in _receive(tee, sink, self.max_upload_bytes, None, None):
                pass

        if self.progress_timeout is None:
            await consume()
            return
        work = asyncio.ensure_future(consume())
        loop = asyncio.get_running_loop()
        last, since = tee.written, loop.time()
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=self.progress_timeout / 4)
                if tee.written != last:
                    last, since = tee.written, loop.time()
                elif not work.done() and loop.time() - since >= self.progress_timeout:
                    raise UploadStalled(f"client {who!r}: no byte of its upload for "
                                        f"{self.progress_timeout:g} s")
            work.result()
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, LlmwireError):
                    await work

    async def _undo(self, fd: int, tee: TeeStream, sink: AccumulateSink, weight: float,
                    cause: BaseException) -> None:
        """Subtract again exactly the slices a failed upload added, from the log."""
        undo = AccumulateSink(self.sums, -weight, locks=self._locks, only=set(sink.added))
        try:
            async for _ in _receive(SpooledStream(fd, tee.written, tee.header), undo, None,
                                    None, None):
                pass
        except (ManifestError, IntegrityError):
            pass  # the log ends where the upload broke off: past every slice added
        if undo.added != sink.added:
            self._broken = (f"taking back a failed upload ({type(cause).__name__}) missed "
                            f"{len(sink.added - undo.added)} slice(s)")
            raise AggregationError(self._broken) from cause

    def _admit(self, header: dict[Any, Any], client: str | None,
               weight: float | None) -> tuple[str, float]:
        if header.get("kind") != STREAM_KIND:
            raise PayloadRefused(f"expected a state-dict update, got a {header.get('kind')!r} "
                                 "stream", "ManifestError")
        self._check_usable()
        who = client if client is not None else header.get("client")
        if not isinstance(who, str) or not who or len(who) > MAX_CLIENT_NAME:
            raise PayloadRefused(f"an update must name its client (1 to {MAX_CLIENT_NAME} "
                                 "characters)", "PayloadRefused")
        weight = header.get("weight", 1.0) if weight is None else weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT:
            raise PayloadRefused(f"client {who!r}: weight {weight!r} is not a positive number "
                                 f"up to {MAX_WEIGHT:g}")
        round_ = header.get("round")
        if round_ != self.round:
            raise PayloadRefused(f"client {who!r}: a stale update, for round {round_!r}; this "
                                 f"is round {self.round}", "StaleRound")
        if who in self.clients or who in self._busy:
            raise PayloadRefused(f"client {who!r} already sent its update for round "
                                 f"{self.round}: a duplicate is refused", "DuplicateUpload")
        return who, float(weight)

    def _check_usable(self, closed_ok: bool = False) -> None:
        if self._broken is not None:
            raise AggregationError(f"round {self.round} cannot aggregate any more: "
                                   f"{self._broken}")
        if self._closed and not closed_ok:
            raise PayloadRefused(f"round {self.round} is closed: its aggregate is taken",
                                 "RoundClosed")

    def next_round(self, reference: Reference) -> None:
        """Start the round of ``reference`` (the new global) with the same
        sums, zeroed: no new memory. The previous :class:`Aggregate`'s update
        (a view of the sums) is gone after this."""
        if self._busy:
            raise PayloadError(f"round {self.round}: uploads still arriving from "
                               f"{sorted(self._busy)}")
        self._check_usable(closed_ok=True)
        for array in {id(a): a for a in self.sums.values()}.values():
            array.fill(0)
        self.reference = reference
        self.weight = 0.0
        self.clients, self.uploads = {}, []
        self._closed = False

    def close(self) -> Aggregate:
        """Close the round (later uploads are refused) and return the weighted
        mean update of the verified uploads: the sums divided, in place, by
        the total weight (the sums are the update's memory)."""
        self._check_usable()
        if self._busy:
            raise PayloadError(f"round {self.round}: uploads still arriving from "
                               f"{sorted(self._busy)}")
        self._closed = True
        if self.weight > 0:
            scale = np.dtype(self.dtype).type(1.0 / self.weight)
            for array in {id(a): a for a in self.sums.values()}.values():
                array *= scale
        update = {name: array.reshape(_shape(self.state[name]))
                  for name, array in self.sums.items()}
        return Aggregate(update, dict(self.clients), self.weight)


async def _to_the_end(work: Any) -> None:
    """Run ``work`` to completion whatever cancels the caller meanwhile (the
    sums must not be left half undone); then honour the cancellation."""
    task = asyncio.ensure_future(work)
    cancelled = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.done():
                break
            cancelled = exc
    task.result()
    if cancelled is not None:
        raise cancelled


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape)
