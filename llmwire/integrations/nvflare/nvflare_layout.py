"""NVFlare's own quantized layout, written and read on the CPU.

NVFlare 2.9's ``ModelQuantizer`` replaces each value by bitsandbytes'
output and describes it in the DXO's meta: ``PROCESSED_ALGORITHM``
(``float16``, ``blockwise8``, ``float4``, ``normfloat4``),
``quant_state`` (per tensor: ``absmax`` and ``code`` for blockwise8;
``quant_type``, ``absmax``, ``blocksize``, ``quant_map``, ``dtype``,
``shape`` for the 4-bit types; nothing for float16), ``source_datatype``
and ``quantized_flag``; its ``ModelDequantizer`` reads that back, on a GPU.
llmwire's kernels are bitsandbytes-compatible bit for bit
(docs/quantization.md), so a CPU site can write what a GPU site's
``ModelDequantizer`` reads (:func:`encode`), and read what a GPU site's
``ModelQuantizer`` sent (:func:`decode`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ...errors import LlmwireError
from ...quant import dequantize, quantize
from ...quant.codec import QuantizedTensor, TensorSpec
from ...quant.formats import DYNAMIC8_CODE, FP4_CODE, NF4_CODE
from ...tensors import DTYPES, view_tensor

__all__ = ["ALGORITHMS", "encode", "decode", "is_nvflare_quantized"]

#: llmwire format -> NVFlare's quantization_type
ALGORITHMS = {"fp16": "float16", "blockwise8": "blockwise8", "fp4": "float4",
              "nf4": "normfloat4"}
_FORMATS = {v: k for k, v in ALGORITHMS.items()}
_BITS = {"fp16": 16, "blockwise8": 8, "fp4": 4, "nf4": 4}
_CODES = {"blockwise8": DYNAMIC8_CODE, "fp4": FP4_CODE, "nf4": NF4_CODE}
_BLOCK = {"blockwise8": 4096, "fp4": 64, "nf4": 64}


def is_nvflare_quantized(meta: Mapping[str, Any] | None) -> bool:
    return bool(meta) and bool(meta.get("quantized_flag")) and \
        meta.get("PROCESSED_ALGORITHM") in _FORMATS


def _like(array: np.ndarray, container: str) -> Any:
    if container != "torch":
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _numpy(value: Any) -> np.ndarray:
    view = view_tensor(value)
    return np.ascontiguousarray(view.array)


def encode(data: Mapping[str, Any], fmt: str, meta: Mapping[str, Any] | None = None
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` in NVFlare's layout for ``fmt``: the new values and meta (a
    copy of ``meta`` with NVFlare's four keys). Tensors whose dtype has no
    more bits than the format are left as they are, as NVFlare does."""
    if fmt not in ALGORITHMS:
        raise LlmwireError(f"NVFlare's layout has no {fmt!r} (it has {', '.join(ALGORITHMS)})")
    values: dict[str, Any] = {}
    quant_state: dict[str, dict[str, Any]] = {}
    source: dict[str, str] = {}
    for name, value in data.items():
        view = view_tensor(value)
        quant_state[name], source[name] = {}, view.dtype
        bits = int(re.findall(r"\d+", view.dtype)[0]) if view.dtype != "bool" else 1
        if not DTYPES[view.dtype].is_float or _BITS[fmt] >= bits:
            values[name] = value
            continue
        q = quantize(value, fmt, block_size=_BLOCK.get(fmt))
        if fmt == "fp16":
            values[name] = _like(q.parts["data"].view(np.float16).reshape(view.shape),
                                 view.container)
            continue
        codes, absmax = q.parts["codes"], q.parts["absmax"]
        if fmt == "blockwise8":
            values[name] = _like(codes.reshape(view.shape), view.container)
            quant_state[name] = {"absmax": _like(absmax, view.container),
                                 "code": _like(np.array(DYNAMIC8_CODE), view.container)}
        else:
            values[name] = _like(codes.reshape(-1, 1), view.container)
            quant_state[name] = {"quant_type": fmt, "absmax": _like(absmax, view.container),
                                 "blocksize": _BLOCK[fmt],
                                 "quant_map": _like(np.array(_CODES[fmt]), view.container),
                                 "dtype": view.dtype, "shape": tuple(view.shape)}
    out = dict(meta or {})
    out.update({"PROCESSED_ALGORITHM": ALGORITHMS[fmt], "quant_state": quant_state,
                "source_datatype": source, "quantized_flag": True})
    return values, out


def decode(data: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                       dict[str, Any]]:
    """Values in NVFlare's layout back in their source dtype (and container),
    on the CPU; the meta without NVFlare's four keys."""
    fmt = _FORMATS.get(meta.get("PROCESSED_ALGORITHM"))
    if fmt is None or not meta.get("quantized_flag"):
        raise LlmwireError("not a DXO NVFlare's ModelQuantizer quantized")
    states, source = meta.get("quant_state") or {}, meta.get("source_datatype") or {}
    values: dict[str, Any] = {}
    for name, value in data.items():
        state, dtype = states.get(name) or {}, source.get(name)
        view = view_tensor(value)
        container = view.container
        if dtype not in DTYPES:
            raise LlmwireError(f"{name!r}: unknown source dtype {dtype!r}")
        held = _numpy(value)
        if fmt == "fp16" or not state:
            if view.dtype == dtype or not DTYPES[dtype].is_float:
                values[name] = value  # left as it was (not more bits than the format)
                continue
            if fmt != "fp16" or view.dtype != "float16":
                raise LlmwireError(f"{name!r}: no quant_state for a {view.dtype} value")
            values[name] = _cast(held.astype(np.float32), dtype, container)
            continue
        shape = tuple(state.get("shape") or held.shape)
        absmax = np.ascontiguousarray(_numpy(state["absmax"]), np.float32).reshape(-1)
        spec = TensorSpec(fmt, dtype, shape, _BLOCK[fmt] if fmt == "blockwise8"
                          else int(state.get("blocksize", 64)))
        q = QuantizedTensor(spec, {"codes": held.reshape(-1).view(np.uint8), "absmax": absmax},
                            container=container)
        values[name] = dequantize(q)
    rest = {k: v for k, v in meta.items()
            if k not in ("PROCESSED_ALGORITHM", "quant_state", "source_datatype",
                         "quantized_flag")}
    return values, rest


def _cast(values: np.ndarray, dtype: str, container: str) -> Any:
    if container == "torch":
        import torch

        return torch.from_numpy(values).to(getattr(torch, dtype))
    if dtype == "bfloat16":
        raise LlmwireError("bfloat16 values need torch (NumPy has no bfloat16)")
    return values.astype(DTYPES[dtype].numpy)
