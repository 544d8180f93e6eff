"""``llmwire demo``: the built-in demonstration, over a real connection.

Builds a synthetic Llama-shaped state dict and sends it once per format from
a sender process to a receiver process over loopback TCP (a free port,
authenticated with a throwaway secret). Each row reports the bytes on the
wire, the time from the sender's first byte to the receiver's
acknowledgement of a verified, restored state dict, each process's peak
memory over its own baseline (RSS sampled from outside every 5 ms) and the
largest round-trip error. The two processes reuse ``llmwire bench stream``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp

from .. import quant
from .bench._timing import format_table
from ..quant.formats import parse_format_list
from .synthetic import model_size

DESCRIPTION = ("Send a built-in synthetic Llama-shaped state dict from a sender process to a "
               "receiver process over loopback, once per format, and print wire size, speed, "
               "each side's peak memory and the round-trip error.")
EPILOG = """\
examples:
  llmwire demo                            25M parameters, all formats (about 30 s)
  llmwire demo --params 200M --formats nf4,nf4+nested,fp16
  llmwire demo --json                     one JSON list for scripts
"""

DEFAULT_FORMATS = "fp32,fp16,bf16,blockwise8,fp4,nf4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=model_size, default="25M",
                        help="model size in parameters, e.g. 25M, 1.5G (default: 25M)")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help="comma-separated formats; fp32 sends tensors as they are; "
                             "'+nested' adds nested absmax, e.g. nf4+nested "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    from .bench.stream import _one_transfer

    formats = parse_format_list(args.formats)
    ctx = mp.get_context("spawn")
    rows = []
    fp32_bytes = 0
    for label, fmt, nested in formats:
        figures = _one_transfer(ctx, args.params, fmt, "memory", "llama", True, nested)
        fp32_bytes = figures["tensor_bytes"]
        rows.append({"format": label, "wire_bytes": figures["wire_bytes"],
                     "ratio": figures["wire_bytes"] / fp32_bytes,
                     "seconds": figures["seconds"],
                     "gbps": fp32_bytes / figures["seconds"] / 1e9,
                     "sender_peak_mib": figures["sender_peak_mib"],
                     "receiver_peak_mib": figures["receiver_peak_mib"],
                     "max_abs_err": figures["max_abs_err"], "tensor_bytes": fp32_bytes})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"llmwire demo: synthetic Llama state dict, {args.params / 1e6:.1f}M parameters "
          f"({fp32_bytes / 2**20:.0f} MiB fp32), sender -> receiver process over loopback TCP; "
          f"kernels: {quant.IMPLEMENTATION}")
    print(format_table(
        ["format", "wire MiB", "% of fp32", "seconds", "GB/s", "sender +MiB", "receiver +MiB",
         "max abs err"],
        [[r["format"], f"{r['wire_bytes'] / 2**20:.1f}", f"{r['ratio'] * 100:.2f}%",
          f"{r['seconds']:.3f}", f"{r['gbps']:.2f}", f"{r['sender_peak_mib']:.0f}",
          f"{r['receiver_peak_mib']:.0f}", f"{r['max_abs_err']:.3g}"] for r in rows]))
    print("seconds: sender's first byte to the receiver's acknowledgement of a verified, "
          "restored state dict; GB/s of fp32 delivered; +MiB: peak RSS over each process's "
          "baseline (the receiver builds a new dict of tensors)")
    return 0
