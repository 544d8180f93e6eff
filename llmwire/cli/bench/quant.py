"""``llmwire bench quant``: size, speed and error of each quantization format
on a synthetic Llama-shaped state dict."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


from ... import quant
from ...quant.formats import parse_format_list
from ..synthetic import DISTRIBUTIONS, llama_state_dict, model_size
from ...tensors import torch_module
from ._timing import format_table, median_seconds

ALL_FORMATS = ("fp16", "bf16", "blockwise8", "fp4", "nf4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="100M", type=model_size,
                        help="model size in parameters (default: 100M)")
    parser.add_argument("--formats", default=",".join(ALL_FORMATS),
                        help="comma-separated formats (default: %(default)s); "
                             "append '+nested' for nested absmax, e.g. nf4+nested")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed runs per figure; the median is reported (default: 5)")
    parser.add_argument("--weights", choices=DISTRIBUTIONS, default="normal",
                        help="weight distribution of the synthetic model (default: normal; "
                             "student-t has heavy tails)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def measure(state: dict[str, Any], fmt: str, nested: bool, repeats: int) -> dict[str, Any]:
    """Figures for one format over a whole state dict (float32 tensors)."""
    fp32_bytes = sum(t.numel() * 4 for t in state.values())

    def encode() -> None:
        # the whole dict is produced, then dropped (torch's baseline does the same)
        quant.quantize_state_dict(state, fmt, nested=nested)

    q_seconds = median_seconds(encode, repeats)
    encoded = quant.quantize_state_dict(state, fmt, nested=nested)
    # dequantize into preallocated tensors, as a receiver filling a model does
    restored = {name: t.clone() for name, t in state.items()}

    def decode() -> None:
        quant.dequantize_state_dict(encoded, out=restored)

    d_seconds = median_seconds(decode, repeats)
    wire = sum(q.nbytes for q in encoded.values())
    max_err, abs_err, abs_sum = 0.0, 0.0, 0.0
    for name, tensor in state.items():
        diff = (restored[name] - tensor).abs_()
        max_err = max(max_err, float(diff.max()))
        abs_err += float(diff.double().sum())
        abs_sum += float(tensor.abs().double().sum())
    return {
        "format": fmt + ("+nested" if nested else ""),
        "ratio": wire / fp32_bytes,
        "wire_bytes": wire,
        "quant_gbps": fp32_bytes / q_seconds / 1e9,
        "dequant_gbps": fp32_bytes / d_seconds / 1e9,
        "max_abs_err": max_err,
        "rel_mae": abs_err / abs_sum,
        "implementation": quant.IMPLEMENTATION,
    }


def torch_cast_baseline(state: dict[str, Any], fmt: str, repeats: int) -> float:
    """GB/s of fp32 that torch's own ``.half()`` / ``.bfloat16()`` reach on the
    same state dict, producing the same set of outputs (a dict kept until the
    last tensor is done, then dropped), exactly as the encode figure does."""
    method = "half" if fmt == "fp16" else "bfloat16"

    def cast() -> None:
        {name: getattr(tensor, method)() for name, tensor in state.items()}

    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    return fp32_bytes / median_seconds(cast, repeats) / 1e9


def run(args: argparse.Namespace) -> int:
    formats = [(fmt, nested) for _, fmt, nested in parse_format_list(args.formats)]
    if torch_module() is None:
        print("llmwire bench quant: needs torch (pip install torch==2.13.0)", file=sys.stderr)
        return 2
    state = llama_state_dict(args.params, distribution=args.weights)
    params = sum(t.numel() for t in state.values())
    results = []
    for fmt, nested in formats:
        row = measure(state, fmt, nested, args.repeat)
        if fmt in ("fp16", "bf16"):
            row["torch_gbps"] = torch_cast_baseline(state, fmt, args.repeat)
        results.append(row)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"synthetic Llama state dict ({args.weights} weights): {params / 1e6:.1f}M params, "
          f"{params * 4 / 2**20:.0f} MiB fp32; median of {args.repeat} runs; "
          f"kernels: {quant.IMPLEMENTATION}")
    rows = [[r["format"], f"{r['ratio'] * 100:.2f}%", f"{r['quant_gbps']:.2f}",
             f"{r['dequant_gbps']:.2f}",
             f"{r['torch_gbps']:.2f}" if "torch_gbps" in r else "-",
             f"{r['max_abs_err']:.3g}", f"{r['rel_mae'] * 100:.3f}%"] for r in results]
    print(format_table(["format", "size", "quant GB/s", "dequant GB/s", "torch cast GB/s",
                        "max abs err", "rel MAE"], rows))
    return 0
