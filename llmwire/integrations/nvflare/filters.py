"""DXO filters: llmwire's formats on NVFlare's message path, on the CPU.

A filtered DXO keeps its kind (``WEIGHTS`` or ``WEIGHT_DIFF``); each value
becomes one self-describing uint8 array (llmwire.integrations._encoding:
format, dtype, shape and the encoded bytes), and the meta gains
:data:`META` (``{"layout": 1, "containers": {name: "torch"|"numpy"}}``) so
that the other side restores each value to its dtype and container. Whether
a DXO is already encoded is judged from its values, never from a flag: a
server ``TASK_DATA`` filter runs once per client on task data the clients
share, so this filter never changes a DXO in place (it returns a new one,
with a copy of the meta), and it encodes a broadcast once (the encoding of
the last data object it saw is reused while that object lives).

Updates should be deltas: quantizing the *weights* at 4 bits ruins
fine-tuning, quantizing the update matches fp32 (docs/learning.md). So the
defaults are bf16 for ``WEIGHTS`` and nf4 for ``WEIGHT_DIFF``; a client
that sends its weights can be converted to a diff against the global it
received with ``DequantizeFilter(keep_base=True)`` on its way in and
``QuantizeFilter(as_diff=True)`` on its way out.

The downlink goes as a delta too (``QuantizeFilter(down="nf4")``, the
round primitives' reference rule): the server keeps what the sites hold
(the *mirror*: the first global as the sites restored it from ``weights``,
then each round's mirror plus the delta it sent), and each round sends the
global minus the mirror in ``down`` to every site whose last result said it
holds the mirror (its digest), and the mirror itself, raw, to any other.
The site keeps the global it restored in a file (llmwire.integrations.cache:
fsynced, digest-checked), adds the delta to it, and checks the digest the
server named; the error of one round's delta does not carry into the next.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ...errors import LlmwireError, PayloadError
from ...quant.codec import MIN_ELEMENTS
from ...rounds.exchange import Diverged
from ...rounds.reference import Reference, state_digest
from ...tensors import DTYPES, view_tensor
from .. import _encoding
from .._encoding import LAYOUT
from ..cache import GlobalCache
from . import nvflare_layout

__all__ = ["QuantizeFilter", "DequantizeFilter", "add_filters", "META", "default_cache_dir"]

#: the meta key of a filtered DXO
META = "llmwire"
_KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]

# the global a client received, by site, for QuantizeFilter(as_diff=True):
# the in and out filters of one site run in one process, as separate objects
_BASES: dict[str, dict[str, Any]] = {}
_BASES_LOCK = threading.Lock()
# the reference each site said it holds (its last result), by (the downlink's
# run token, site), for the server's QuantizeFilter(down=...): its in and out
# filters are two objects (and job ids repeat: the simulator's is always the same)
_HOLDS: dict[tuple[str, str], Reference] = {}


def default_cache_dir() -> Path:
    """``$LLMWIRE_NVFLARE_CACHE``, else ``~/.cache/llmwire/nvflare``."""
    return Path(os.environ.get("LLMWIRE_NVFLARE_CACHE")
                or Path.home() / ".cache" / "llmwire" / "nvflare")


def _peer(fl_ctx: FLContext) -> str | None:
    """The site a server-side filter runs for."""
    peer = fl_ctx.get_peer_context()
    return peer.get_identity_name() if peer is not None else None


def _holds(base: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a site's result says it holds: the reference and run of the
    global it restored last (None: nothing the server's downlink sent)."""
    if not base or "reference" not in base:
        return None
    return {**base["reference"].to_wire(), "run": base["run"]}


def _encoded(data: Mapping[str, Any]) -> bool:
    return bool(data) and any(_encoding.is_blob(v) for v in data.values())


def _container(value: Any) -> str:
    return view_tensor(value).container


class QuantizeFilter(DXOFilter):
    """Encode a DXO's values: ``WEIGHTS`` in ``weights`` (bf16 by default),
    ``WEIGHT_DIFF`` in ``diffs`` (nf4). Tensors under ``min_elements`` go as
    they are (raw). ``as_diff=True`` (a client's outgoing result): a
    ``WEIGHTS`` result becomes a ``WEIGHT_DIFF`` against the global this
    site's ``DequantizeFilter(keep_base=True)`` restored, then encoded in
    ``diffs``. ``layout="nvflare"``: NVFlare's own quantized layout instead
    (``fp16``, ``blockwise8``, ``fp4``, ``nf4``), which a site running
    NVFlare's ``ModelDequantizer`` reads. Already-encoded DXOs (either
    layout) pass unchanged."""

    def __init__(self, weights: str = "bf16", diffs: str = "nf4",
                 min_elements: int = MIN_ELEMENTS, as_diff: bool = False,
                 layout: str = "llmwire", down: str | None = None) -> None:
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=list(_KINDS))
        if layout not in ("llmwire", "nvflare"):
            raise ValueError(f"layout is 'llmwire' or 'nvflare', not {layout!r}")
        if down is not None and (layout != "llmwire" or as_diff):
            raise ValueError("down (the downlink as a delta) is for the server's task data "
                             "in layout='llmwire'")
        for fmt in (weights, diffs) + ((down,) if down is not None else ()):
            _encoding.encode_array(np.zeros(1, np.float32), fmt)  # a bad format fails here
            if layout == "nvflare" and fmt not in nvflare_layout.ALGORITHMS:
                raise ValueError(f"NVFlare's layout has no {fmt!r} "
                                 f"(it has {', '.join(nvflare_layout.ALGORITHMS)})")
        if layout == "nvflare" and as_diff:
            raise ValueError("as_diff needs layout='llmwire' (NVFlare's layout has no deltas "
                             "against a received global)")
        self.weights, self.diffs, self.layout = weights, diffs, layout
        self.min_elements, self.as_diff, self.down = min_elements, as_diff, down
        self._last: tuple[Any, Any, DXO] | None = None
        self._lock = threading.Lock()
        self._downlink: _Downlink | None = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        data = dxo.data or {}
        if not data or _encoded(data) or nvflare_layout.is_nvflare_quantized(dxo.meta):
            return None
        kind = dxo.data_kind
        if self.as_diff and kind == DataKind.WEIGHTS:
            base = _BASES.get(fl_ctx.get_identity_name())
            if base is None:
                raise LlmwireError("QuantizeFilter(as_diff=True): this site restored no global "
                                   "to diff against (add DequantizeFilter(keep_base=True) on "
                                   "its TASK_DATA)")
            return self._diff(dxo, base)
        if self.down is not None and kind == DataKind.WEIGHTS:
            with self._lock:  # one site at a time: the round's encoding is shared
                if self._downlink is None:
                    self._downlink = _Downlink(self)
                key = (shareable.get_header("current_round"), id(data))
                site = _peer(fl_ctx)
                out = self._downlink.dxo(dxo, key, site)
            self.log_info(fl_ctx, f"llmwire downlink to {site}: {out.meta[META]['downlink']}, "
                                  f"{sum(v.nbytes for v in out.data.values())} bytes")
            return _copy(out)
        holds = _holds(_BASES.get(fl_ctx.get_identity_name()))
        with self._lock:
            last = self._last
            if last is not None and last[0] is data and last[1] == kind:
                return _copy(last[2])  # the same broadcast for another client: encoded once
            fmt = self.weights if kind == DataKind.WEIGHTS else self.diffs
            if self.layout == "nvflare":  # what NVFlare's ModelDequantizer reads
                out = DXO(kind, *nvflare_layout.encode(data, fmt, dxo.meta))
            else:
                packed = _encoding.encode_state(data, fmt, min_elements=self.min_elements)
                out = DXO(kind, _blobs(packed), _meta(dxo.meta, data, holds=holds))
            self._last = (data, kind, out)
            return _copy(out)

    def _diff(self, dxo: DXO, base: dict[str, Any]) -> DXO:
        data = dxo.data
        names = base["names"]
        local = {name: data[name] for name in names if name in data}
        extra = sorted(set(data) - set(names))
        if extra or len(local) != len(names):
            raise LlmwireError(f"the result holds tensors the global has not ({extra[:5]}) "
                               f"or lacks some")
        if "cache" in base:  # the global this site restored, as it keeps it on disk
            with base["cache"].open() as held:
                if base["cache"].reference_of(held) != base["reference"]:
                    raise Diverged("the site's cached global changed since it was restored")
                packed = _encoding.encode_delta(local, held, self.diffs,
                                                min_elements=self.min_elements)
                _integer_diffs(packed, local, lambda name: held[name].load("numpy"))
        else:
            record = base["record"]
            packed = _encoding.encode_update(local, record, self.diffs,
                                             min_elements=self.min_elements)
            _integer_diffs(packed, local,
                           lambda name: _restore(name, record[name], "numpy"))
        return DXO(DataKind.WEIGHT_DIFF, _blobs(packed),
                   _meta(dxo.meta, data, update=True, holds=_holds(base)))


def _integer_diffs(packed: dict[str, Any], local: Mapping[str, Any], base: Any) -> None:
    """An integer tensor that changed travels as its value in an update
    record; in a ``WEIGHT_DIFF``, which NVFlare's FedAvg *adds* to the
    global, it must be the difference: ``local - base`` (same dtype)."""
    for name, entry in packed.items():
        if entry.stype == _encoding.ZERO_STYPE or DTYPES[entry.dtype].is_float:
            continue
        mine = np.asarray(view_tensor(local[name]).array)
        change = np.asarray(mine - np.asarray(base(name)), dtype=mine.dtype)  # 0-d stays an array
        packed[name] = _encoding.encode_array(change, "raw", name=name)


def _signature(data: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for name, value in data.items():
        view = view_tensor(value)
        out[name] = (view.dtype, tuple(view.shape))
    return out


class _Downlink:
    """The server's downlink as deltas against what the sites hold (the
    mirror): one encoding per round for every site that holds the mirror,
    the mirror itself (raw) for the others."""

    def __init__(self, owner: QuantizeFilter) -> None:
        self.owner = owner
        # names the sites' cache files: job ids repeat (the simulator's is
        # always "simulate_job"), and two runs must never share a site's file
        self.run = secrets.token_hex(8)
        self.key: Any = None  # the round being sent: its number and its data's id
        self.held: Any = None
        self.mirror: dict[str, Any] | None = None
        self.reference: Reference | None = None
        self.base: Reference | None = None  # the mirror before this round's delta
        self.update: DXO | None = None
        self.whole: DXO | None = None
        self.round = 0

    def dxo(self, dxo: DXO, key: Any, site: str | None) -> DXO:
        if key[0] is None:  # no round number: the data object itself names the round,
            self.held = dxo.data  # kept alive so that its id names no other
            key = ("object", id(dxo.data))
        if key != self.key:
            self._next(dxo)
            self.key = key
        holds = _HOLDS.get((self.run, site)) if site is not None else None
        if self.update is not None and holds is not None and holds == self.base:
            return self.update
        if self.whole is None:  # a site that holds something else: the mirror, raw
            packed = _encoding.encode_state(self.mirror, "raw")
            self.whole = DXO(DataKind.WEIGHTS, _blobs(packed),
                             self._meta(dxo, "whole", None))
        return self.whole

    def _next(self, dxo: DXO) -> None:
        owner, data = self.owner, dxo.data
        self.round += 1
        # anything but the same tensors (names, dtypes, shapes: NVFlare's FedAvg
        # turns integer buffers into float32 after round 1) starts over, whole
        if self.mirror is None or _signature(self.mirror) != _signature(data):
            packed = _encoding.encode_state(data, owner.weights, min_elements=owner.min_elements)
            containers = {k: _container(v) for k, v in data.items()}
            self.mirror = {k: _restore(k, e, containers[k]) for k, e in packed.items()}
            self.base, self.update = None, None
            self.reference = Reference(self.round, state_digest(self.mirror))
            self.whole = DXO(DataKind.WEIGHTS, _blobs(packed), self._meta(dxo, "whole", None))
        else:
            packed = _encoding.encode_delta(data, self.mirror, owner.down,
                                            min_elements=owner.min_elements)
            self.base = self.reference
            _encoding.apply_update(packed, self.mirror)  # as every site will
            self.reference = Reference(self.round, state_digest(self.mirror))
            self.update = DXO(DataKind.WEIGHTS, _blobs(packed),
                              self._meta(dxo, "update", self.base))
            self.whole = None

    def _meta(self, dxo: DXO, downlink: str, base: Reference | None) -> dict[str, Any]:
        assert self.reference is not None
        meta = _meta(dxo.meta, dxo.data)
        meta[META].update(downlink=downlink, reference=self.reference.to_wire(),
                          base=base.to_wire() if base is not None else None, run=self.run)
        return meta


def _blobs(packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: _encoding.to_blob(v) for k, v in packed.items()}


def _copy(dxo: DXO) -> DXO:
    """A DXO sharing the encoded values, with a meta of its own (NVFlare adds
    its filter history to the meta of what a filter returns)."""
    return DXO(dxo.data_kind, dict(dxo.data), dict(dxo.meta))


def _meta(meta: Mapping[str, Any] | None, data: Mapping[str, Any], update: bool = False,
          holds: dict[str, Any] | None = None) -> dict[str, Any]:
    out = dict(meta or {})
    out[META] = {"layout": LAYOUT, "containers": {k: _container(v) for k, v in data.items()},
                 "update": update}
    if holds is not None:  # what this site holds: the server's next downlink is a delta
        out[META]["holds"] = holds
    return out


class DequantizeFilter(DXOFilter):
    """Restore a DXO that :class:`QuantizeFilter` encoded, or that NVFlare's
    ``ModelQuantizer`` quantized (on the CPU, where NVFlare's own
    ``ModelDequantizer`` needs CUDA): every value back to its dtype and
    container (torch tensors or NumPy arrays); DXOs that are not encoded
    pass unchanged. An update made with ``as_diff`` is a
    ``WEIGHT_DIFF`` of float32 deltas (integers as values).

    On a site, a global sent as a delta (the server's ``QuantizeFilter(down=
    ...)``) is added to the global this site restored last, kept in
    ``cache_dir`` (default :func:`default_cache_dir`; one file per job and
    site), and checked against the digest the server named; the site's
    results then say what it holds. ``keep_base`` (a site's incoming task
    data, for ``QuantizeFilter(as_diff=True)``): remember the global
    received to diff against (the cached file; without deltas down, the
    encoding: bf16 is half the model). On the server, a result says which
    global its site holds (the next downlink's base)."""

    def __init__(self, keep_base: bool = False, cache_dir: str | None = None) -> None:
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=list(_KINDS))
        self.keep_base, self.cache_dir = keep_base, cache_dir

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        data = dxo.data or {}
        if nvflare_layout.is_nvflare_quantized(dxo.meta):  # what NVFlare's ModelQuantizer sent
            return DXO(dxo.data_kind, *nvflare_layout.decode(data, dxo.meta))
        if not _encoded(data):
            return None
        meta = dict(dxo.meta or {})
        info = meta.pop(META, None)
        info = info if isinstance(info, dict) else {}
        containers = info.get("containers", {})
        if not isinstance(containers, dict):
            containers = {}
        record = {name: _encoding.from_blob(value, name) for name, value in data.items()}
        holds = Reference.from_wire(info.get("holds"))
        run = info["holds"].get("run") if holds is not None else None
        if holds is not None and isinstance(run, str) and _peer(fl_ctx) is not None:
            _HOLDS[(run, str(_peer(fl_ctx)))] = holds  # the server, a site's result
        reference = Reference.from_wire(info.get("reference"))
        if reference is not None and dxo.data_kind == DataKind.WEIGHTS:
            out = self._global(record, info, reference, containers, fl_ctx)
            return DXO(dxo.data_kind, out, meta)
        out = {name: _restore(name, entry, containers.get(name, "numpy"))
               for name, entry in record.items()}
        if self.keep_base and dxo.data_kind == DataKind.WEIGHTS:
            with _BASES_LOCK:
                _BASES[fl_ctx.get_identity_name()] = {"names": list(record), "record": record}
        return DXO(dxo.data_kind, out, meta)

    def _global(self, record: dict[str, Any], info: dict[str, Any], reference: Reference,
                containers: Mapping[str, str], fl_ctx: FLContext) -> dict[str, Any]:
        """The round's global on a site: whole, or the held one plus the delta."""
        site = str(fl_ctx.get_identity_name())
        run = info.get("run")
        if not isinstance(run, str) or not run.isalnum():
            raise PayloadError(f"{site}: the global names no run for its cache ({run!r})")
        cache = GlobalCache(self.cache_dir or default_cache_dir(), run, site)
        try:
            if info.get("downlink") == "update":
                base = Reference.from_wire(info.get("base"))
                out = {name: _empty(name, entry, containers.get(name, "numpy"))
                       for name, entry in record.items()}
                held = cache.load_into(out)
                if held is None or held != base:
                    raise Diverged(f"{site} holds {held or 'no global'}, the server's delta is "
                                   f"against {base}: this round needs whole weights (a site "
                                   f"restarted, or its cache is gone)")
                _encoding.apply_update(record, out)
            else:
                out = {name: _restore(name, entry, containers.get(name, "numpy"))
                       for name, entry in record.items()}
            if state_digest(out) != reference.digest:
                raise Diverged(f"{site}: the restored global is not the server's {reference}")
        except Diverged:
            with _BASES_LOCK:  # its next result says it holds nothing: then whole
                _BASES.pop(site, None)
            raise
        cache.store(out, reference)
        with _BASES_LOCK:
            _BASES[site] = {"names": list(record), "cache": cache, "reference": reference,
                            "run": run}
        return out


def _empty(name: str, entry: Any, container: str) -> Any:
    """A fresh tensor for an entry's dtype and shape."""
    if container == "torch":
        import torch

        return torch.empty(tuple(entry.shape), dtype=getattr(torch, entry.dtype))
    if entry.dtype == "bfloat16":
        raise PayloadError(f"{name!r}: bfloat16 values need torch (NumPy has no bfloat16)")
    return np.empty(tuple(entry.shape), DTYPES[entry.dtype].numpy)


def _restore(name: str, entry: Any, container: str) -> Any:
    """One entry as a fresh tensor of its dtype (a delta: float32 values)."""
    if entry.stype == _encoding.ZERO_STYPE:
        dtype = "float32" if DTYPES[entry.dtype].is_float else entry.dtype
        values = np.zeros(tuple(entry.shape), DTYPES[dtype].numpy)
        return _as(values, dtype, container)
    spec, mode, _ = _encoding._unpack(entry, name)
    out = _empty(name, entry._replace(dtype="float32") if mode == "delta" else entry, container)
    _encoding.decode_into(entry, out, name)
    return out


def _as(values: np.ndarray, dtype: str, container: str) -> Any:
    if container != "torch":
        return values
    import torch

    return torch.from_numpy(values)


def add_filters(job: Any, sites: Iterable[str], *, tasks: Iterable[str] = ("train",),
                weights: str = "bf16", diffs: str = "nf4", down: str | None = "nf4",
                as_diff: bool = False, min_elements: int = MIN_ELEMENTS,
                cache_dir: str | None = None) -> None:
    """Wire all four filter positions of a ``FedJob`` for ``tasks`` (named
    explicitly: NVFlare looks filters up by ``"<task>/<direction>"``, so its
    default ``["*"]`` never runs): the server quantizes its task data (the
    first global in ``weights``, then deltas in ``down`` to the sites that
    hold the last one; ``down=None``: the global in ``weights`` every round)
    and restores results; each site restores its task data (keeping the
    global in ``cache_dir`` for the next delta) and quantizes its result
    (``as_diff``: converting weights to a diff against the global it
    received)."""
    from nvflare.job_config.defs import FilterType

    if isinstance(tasks, str) or isinstance(sites, str):
        raise ValueError("tasks and sites are lists of names (a plain string would be taken "
                         "letter by letter: filters that never run)")
    tasks = list(tasks)
    if not tasks or any(not isinstance(t, str) or not t or "*" in t for t in tasks):
        raise ValueError(f"name the tasks explicitly (NVFlare never runs filters registered "
                         f"for '*'), got {tasks!r}")
    sites = list(sites)
    if not sites:
        raise ValueError("no sites to wire")
    out = dict(weights=weights, diffs=diffs, min_elements=min_elements)
    job.to_server(QuantizeFilter(down=down, **out), filter_type=FilterType.TASK_DATA,
                  tasks=tasks)
    job.to_server(DequantizeFilter(), filter_type=FilterType.TASK_RESULT, tasks=tasks)
    for site in sites:
        job.to(DequantizeFilter(keep_base=as_diff, cache_dir=cache_dir), site,
               filter_type=FilterType.TASK_DATA, tasks=tasks)
        job.to(QuantizeFilter(as_diff=as_diff, **out), site,
               filter_type=FilterType.TASK_RESULT, tasks=tasks)
