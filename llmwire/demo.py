"""``llmwire demo``: the built-in demonstration.

Builds a synthetic Llama-shaped state dict and carries it through every
format: quantize, restore, and report the bytes a transfer would put on the
wire, the time taken and the error. Later releases send it over loopback.
"""

from __future__ import annotations

import argparse
import json
import time

from . import quant
from .bench._timing import format_table
from .synthetic import llama_state_dict, parse_size

DESCRIPTION = ("Quantize a built-in synthetic Llama-shaped state dict in every format, "
               "restore it, and print wire size, speed and error per format.")
EPILOG = """\
examples:
  llmwire demo                            25M parameters, all formats
  llmwire demo --params 200M --formats nf4,nf4+nested,fp16
  llmwire demo --json                     one JSON list for scripts
"""

DEFAULT_FORMATS = "fp32,fp16,bf16,blockwise8,fp4,nf4,nf4+nested"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=parse_size, default="25M",
                        help="model size in parameters, e.g. 25M, 1.5G (default: 25M)")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help="comma-separated formats; fp32 sends tensors as they are; "
                             "'+nested' adds nested absmax (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def _formats(text: str) -> list[tuple[str, str, bool]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, extra = item.partition("+")
        fmt = "raw" if name == "fp32" else name
        quant.get_format(fmt)
        if extra not in ("", "nested"):
            raise quant.QuantizationError(f"unknown format option {extra!r} in {item!r}")
        out.append((item, fmt, extra == "nested"))
    return out


def run(args: argparse.Namespace) -> int:
    formats = _formats(args.formats)
    state = llama_state_dict(args.params)
    fp32_bytes = sum(t.numel() * 4 for t in state.values())
    rows = []
    for label, fmt, nested in formats:
        start = time.perf_counter()
        encoded = quant.quantize_state_dict(state, fmt, nested=nested)
        restored = quant.dequantize_state_dict(encoded)
        seconds = time.perf_counter() - start
        wire = sum(q.nbytes for q in encoded.values())
        max_err = max(float((restored[k] - t).abs().max()) for k, t in state.items())
        rows.append({"format": label, "wire_bytes": wire, "ratio": wire / fp32_bytes,
                     "seconds": seconds, "gbps": fp32_bytes / seconds / 1e9,
                     "max_abs_err": max_err})
    if args.json:
        print(json.dumps(rows))
        return 0
    params = sum(t.numel() for t in state.values())
    print(f"llmwire demo: synthetic Llama state dict, {params / 1e6:.1f}M parameters "
          f"({fp32_bytes / 2**20:.0f} MiB fp32), {len(state)} tensors; "
          f"kernels: {quant.IMPLEMENTATION}")
    print(format_table(
        ["format", "wire MiB", "% of fp32", "seconds", "GB/s", "max abs err"],
        [[r["format"], f"{r['wire_bytes'] / 2**20:.1f}", f"{r['ratio'] * 100:.2f}%",
          f"{r['seconds']:.3f}", f"{r['gbps']:.2f}", f"{r['max_abs_err']:.3g}"] for r in rows]))
    print("seconds = quantize + restore in memory; GB/s of fp32 processed")
    return 0
