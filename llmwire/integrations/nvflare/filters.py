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
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ...errors import LlmwireError
from ...quant.codec import MIN_ELEMENTS
from ...tensors import DTYPES, view_tensor
from .. import _encoding
from .._encoding import LAYOUT
from . import nvflare_layout

__all__ = ["QuantizeFilter", "DequantizeFilter", "add_filters", "META"]

#: the meta key of a filtered DXO
META = "llmwire"
_KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]

# the global a client received, by site, for QuantizeFilter(as_diff=True):
# the in and out filters of one site run in one process, as separate objects
_BASES: dict[str, dict[str, Any]] = {}
_BASES_LOCK = threading.Lock()


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
                 layout: str = "llmwire") -> None:
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=list(_KINDS))
        if layout not in ("llmwire", "nvflare"):
            raise ValueError(f"layout is 'llmwire' or 'nvflare', not {layout!r}")
        for fmt in (weights, diffs):
            _encoding.encode_array(np.zeros(1, np.float32), fmt)  # a bad format fails here
            if layout == "nvflare" and fmt not in nvflare_layout.ALGORITHMS:
                raise ValueError(f"NVFlare's layout has no {fmt!r} "
                                 f"(it has {', '.join(nvflare_layout.ALGORITHMS)})")
        if layout == "nvflare" and as_diff:
            raise ValueError("as_diff needs layout='llmwire' (NVFlare's layout has no deltas "
                             "against a received global)")
        self.weights, self.diffs, self.layout = weights, diffs, layout
        self.min_elements, self.as_diff = min_elements, as_diff
        self._last: tuple[Any, Any, DXO] | None = None
        self._lock = threading.Lock()

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
        with self._lock:
            last = self._last
            if last is not None and last[0] is data and last[1] == kind:
                return _copy(last[2])  # the same broadcast for another client: encoded once
            fmt = self.weights if kind == DataKind.WEIGHTS else self.diffs
            if self.layout == "nvflare":  # what NVFlare's ModelDequantizer reads
                out = DXO(kind, *nvflare_layout.encode(data, fmt, dxo.meta))
            else:
                packed = _encoding.encode_state(data, fmt, min_elements=self.min_elements)
                out = DXO(kind, {k: _encoding.to_blob(v) for k, v in packed.items()},
                          _meta(dxo.meta, data))
            self._last = (data, kind, out)
            return _copy(out)

    def _diff(self, dxo: DXO, base: dict[str, Any]) -> DXO:
        data = dxo.data
        local = {name: data[name] for name in base["record"]}
        extra = sorted(set(data) - set(local))
        if extra:
            raise LlmwireError(f"the result holds tensors the global has not: {extra[:5]}")
        packed = _encoding.encode_update(local, base["record"], self.diffs,
                                         min_elements=self.min_elements)
        return DXO(DataKind.WEIGHT_DIFF, {k: _encoding.to_blob(v) for k, v in packed.items()},
                   _meta(dxo.meta, data, update=True))


def _copy(dxo: DXO) -> DXO:
    """A DXO sharing the encoded values, with a meta of its own (NVFlare adds
    its filter history to the meta of what a filter returns)."""
    return DXO(dxo.data_kind, dict(dxo.data), dict(dxo.meta))


def _meta(meta: Mapping[str, Any] | None, data: Mapping[str, Any], update: bool = False
          ) -> dict[str, Any]:
    out = dict(meta or {})
    out[META] = {"layout": LAYOUT, "containers": {k: _container(v) for k, v in data.items()},
                 "update": update}
    return out


class DequantizeFilter(DXOFilter):
    """Restore a DXO that :class:`QuantizeFilter` encoded, or that NVFlare's
    ``ModelQuantizer`` quantized (on the CPU, where NVFlare's own
    ``ModelDequantizer`` needs CUDA): every value back to its dtype and
    container (torch tensors or NumPy arrays); DXOs that are not encoded
    pass unchanged. An update made with ``as_diff`` is a
    ``WEIGHT_DIFF`` of float32 deltas (integers as values). ``keep_base``
    (a client's incoming task data): remember the encoded global, so that
    this site's ``QuantizeFilter(as_diff=True)`` can send a diff against it
    (the encoding is kept, not a restored copy: bf16 is half the model)."""

    def __init__(self, keep_base: bool = False) -> None:
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=list(_KINDS))
        self.keep_base = keep_base

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        data = dxo.data or {}
        if nvflare_layout.is_nvflare_quantized(dxo.meta):  # what NVFlare's ModelQuantizer sent
            return DXO(dxo.data_kind, *nvflare_layout.decode(data, dxo.meta))
        if not _encoded(data):
            return None
        meta = dict(dxo.meta or {})
        info = meta.pop(META, None)
        containers = info.get("containers", {}) if isinstance(info, dict) else {}
        record = {name: _encoding.from_blob(value, name) for name, value in data.items()}
        out = {name: _restore(name, entry, containers.get(name, "numpy"))
               for name, entry in record.items()}
        if self.keep_base and dxo.data_kind == DataKind.WEIGHTS:
            with _BASES_LOCK:
                _BASES[fl_ctx.get_identity_name()] = {"record": record}
        return DXO(dxo.data_kind, out, meta)


def _restore(name: str, entry: Any, container: str) -> Any:
    """One entry as a fresh tensor of its dtype (a delta: float32 values)."""
    if entry.stype == _encoding.ZERO_STYPE:
        dtype = "float32" if DTYPES[entry.dtype].is_float else entry.dtype
        values = np.zeros(tuple(entry.shape), DTYPES[dtype].numpy)
        return _as(values, dtype, container)
    spec, mode, _ = _encoding._unpack(entry, name)
    dtype = "float32" if mode == "delta" else entry.dtype
    if container == "torch":
        import torch

        out = torch.empty(tuple(entry.shape), dtype=getattr(torch, dtype))
    else:
        if dtype == "bfloat16":
            raise LlmwireError(f"{name!r}: bfloat16 values need torch (NumPy has no bfloat16)")
        out = np.empty(tuple(entry.shape), DTYPES[dtype].numpy)
    _encoding.decode_into(entry, out, name)
    return out


def _as(values: np.ndarray, dtype: str, container: str) -> Any:
    if container != "torch":
        return values
    import torch

    return torch.from_numpy(values)


def add_filters(job: Any, sites: Iterable[str], *, tasks: Iterable[str] = ("train",),
                weights: str = "bf16", diffs: str = "nf4", as_diff: bool = False,
                min_elements: int = MIN_ELEMENTS) -> None:
    """Wire all four filter positions of a ``FedJob`` for ``tasks`` (named
    explicitly: NVFlare looks filters up by ``"<task>/<direction>"``, so its
    default ``["*"]`` never runs): the server quantizes its task data and
    restores results; each site restores its task data and quantizes its
    result (``as_diff``: converting weights to a diff against the global it
    received)."""
    from nvflare.job_config.defs import FilterType

    tasks = list(tasks)
    if not tasks or any(not isinstance(t, str) or not t or "*" in t for t in tasks):
        raise ValueError(f"name the tasks explicitly (NVFlare never runs filters registered "
                         f"for '*'), got {tasks!r}")
    sites = list(sites)
    if not sites:
        raise ValueError("no sites to wire")
    out = dict(weights=weights, diffs=diffs, min_elements=min_elements)
    job.to_server(QuantizeFilter(**out), filter_type=FilterType.TASK_DATA, tasks=tasks)
    job.to_server(DequantizeFilter(), filter_type=FilterType.TASK_RESULT, tasks=tasks)
    for site in sites:
        job.to(DequantizeFilter(keep_base=as_diff), site, filter_type=FilterType.TASK_DATA,
               tasks=tasks)
        job.to(QuantizeFilter(as_diff=as_diff, **out), site,
               filter_type=FilterType.TASK_RESULT, tasks=tasks)
