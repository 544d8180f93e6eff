"""Synthetic Llama-shaped state dicts for demos, benchmarks and tests.

The shapes follow Llama's layout (token embedding, per-layer attention and
MLP projections, RMSNorm weights, LM head) scaled to a parameter budget;
weights are N(0, 0.02²) like a freshly initialised model, norms are near 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import LlmwireError
from ..tensors import torch_module

__all__ = ["DISTRIBUTIONS", "llama_shapes", "llama_state_dict", "make_state_dict", "parse_size",
           "single_tensor_state_dict"]

_WIDTHS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192)


def _mlp_width(hidden: int) -> int:
    return max(64, (8 * hidden // 3 + 63) // 64 * 64)


#: the smallest synthetic model (one layer of the narrowest width)
MIN_PARAMS = 10_000


def llama_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama-like model with about ``params`` parameters."""
    if params < MIN_PARAMS:
        raise LlmwireError(f"--params must be at least {MIN_PARAMS}, got {params}")
    hidden = _WIDTHS[0]
    for width in _WIDTHS:
        vocab = min(32000, max(256, params // (8 * width)))
        per_layer = 4 * width * width + 3 * width * _mlp_width(width) + 2 * width
        if 2 * vocab * width + 4 * per_layer <= params:
            hidden = width
    vocab = min(32000, max(256, params // (8 * hidden)))
    mlp = _mlp_width(hidden)
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.up_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, mlp)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


DISTRIBUTIONS = ("normal", "student-t")


def llama_state_dict(params: int, *, dtype: str = "float32", seed: int = 0,
                     container: str = "torch", distribution: str = "normal") -> dict[str, Any]:
    """A state dict of about ``params`` parameters (torch tensors by default,
    NumPy arrays with ``container="numpy"``; NumPy supports float32/float16).

    ``distribution="student-t"`` draws the matrices from a Student-t with 3
    degrees of freedom (same scale): heavy tails, as in trained LLM weights
    with outliers, which is where block formats lose most."""
    if distribution not in DISTRIBUTIONS:
        raise LlmwireError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    torch = torch_module() if container == "torch" else None
    if container == "torch" and torch is None:
        container = "numpy"
    shapes = llama_shapes(params)
    out: dict[str, Any] = {}
    if torch is not None:
        generator = torch.Generator().manual_seed(seed)
        tdtype = getattr(torch, dtype)
        for name, shape in shapes.items():
            if len(shape) == 1:
                t = 1.0 + 0.02 * torch.randn(shape, generator=generator)
            elif distribution == "normal":
                t = torch.randn(shape, generator=generator).mul_(0.02)
            else:
                t = _student_t(torch, shape, generator).mul_(0.02)
            out[name] = t.to(tdtype)
        return out
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        base = 1.0 if len(shape) == 1 else 0.0
        if distribution == "student-t" and len(shape) > 1:
            a = rng.standard_t(3, size=shape).astype(np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(0.02)
        a += np.float32(base)
        out[name] = a.astype(dtype)
    return out


def _student_t(torch: Any, shape: tuple[int, ...], generator: Any) -> Any:
    """Student-t (3 degrees of freedom) as normal / sqrt(chi2_3 / 3)."""
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((3, *shape), generator=generator).square_().sum(0)
    return normal.div_(chi2.div_(3).sqrt_())


def single_tensor_state_dict(params: int, *, seed: int = 0) -> dict[str, Any]:
    """One float32 matrix of about ``params`` elements (rows of 4096): the
    case of a single huge tensor, such as a large embedding."""
    torch = torch_module()
    rows = max(1, params // 4096)
    if torch is None:
        rng = np.random.default_rng(seed)
        return {"weight": rng.standard_normal((rows, 4096), dtype=np.float32) * np.float32(0.02)}
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn((rows, 4096), generator=generator).mul_(0.02)}


def make_state_dict(model: str, params: int, *, seed: int = 0) -> dict[str, Any]:
    """``model`` is ``llama`` (a Llama-shaped dict) or ``single`` (one tensor)."""
    if model == "single":
        return single_tensor_state_dict(params, seed=seed)
    if model == "llama":
        return llama_state_dict(params, seed=seed)
    raise LlmwireError(f"model must be 'llama' or 'single', got {model!r}")


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str | int) -> int:
    """Parse ``100M``, ``1.5G``, ``512MiB``, ``1e8`` or a plain integer."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace("_", "")
    digits = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    suffix = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if not math.isfinite(value * _SUFFIXES.get(suffix, 1)):
        raise ValueError(f"not a size: {text!r} (must be finite)")
    if suffix not in _SUFFIXES or value < 0:
        raise ValueError(f"not a size: {text!r} (use e.g. 100M, 1.5G, 512MiB)")
    return int(value * _SUFFIXES[suffix])


def model_size(text: str | int) -> int:
    """An argparse type: :func:`parse_size`, at least :data:`MIN_PARAMS`
    (a usage error, exit 2, before any process starts)."""
    import argparse

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < MIN_PARAMS:
        raise argparse.ArgumentTypeError(f"at least {MIN_PARAMS} parameters, not {text!r}")
    return value
