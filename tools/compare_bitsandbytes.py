"""Quantize speed of llmwire against bitsandbytes' CPU path, same run.

    python3 tools/compare_bitsandbytes.py [--params 100M] [--repeat 5]

Needs bitsandbytes (``pip install --no-deps bitsandbytes``). Both libraries
quantize the same synthetic Llama-shaped state dict (every tensor; llmwire's
default of keeping tiny tensors raw is switched off so the work is the
same) and restore it; figures are GB/s of fp32, medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmwire  # noqa: E402
from llmwire.cli.bench._timing import format_table, median_seconds  # noqa: E402
from llmwire.cli.synthetic import llama_state_dict, parse_size  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_size, default="100M")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        print("compare_bitsandbytes: bitsandbytes is not installed", file=sys.stderr)
        return 2
    state = llama_state_dict(args.params)
    fp32 = sum(t.numel() * 4 for t in state.values())
    bnb_quant = {
        "blockwise8": lambda t: bnb.quantize_blockwise(t),
        "fp4": lambda t: bnb.quantize_4bit(t, quant_type="fp4", blocksize=64),
        "nf4": lambda t: bnb.quantize_4bit(t, quant_type="nf4", blocksize=64),
    }
    bnb_dequant = {
        "blockwise8": lambda qs: bnb.dequantize_blockwise(*qs),
        "fp4": lambda qs: bnb.dequantize_4bit(*qs),
        "nf4": lambda qs: bnb.dequantize_4bit(*qs),
    }
    rows = []
    for fmt in ("blockwise8", "fp4", "nf4"):
        ours_q = median_seconds(lambda: llmwire.quantize_state_dict(state, fmt, min_elements=0),
                                args.repeat)
        encoded = llmwire.quantize_state_dict(state, fmt, min_elements=0)
        ours_d = median_seconds(lambda: llmwire.dequantize_state_dict(encoded), args.repeat)
        theirs_q = median_seconds(lambda: [bnb_quant[fmt](t) for t in state.values()],
                                  args.repeat)
        packed = [bnb_quant[fmt](t) for t in state.values()]
        theirs_d = median_seconds(lambda: [bnb_dequant[fmt](qs) for qs in packed], args.repeat)
        rows.append({"format": fmt,
                     "llmwire_quant_gbps": fp32 / ours_q / 1e9,
                     "bnb_quant_gbps": fp32 / theirs_q / 1e9,
                     "llmwire_dequant_gbps": fp32 / ours_d / 1e9,
                     "bnb_dequant_gbps": fp32 / theirs_d / 1e9})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{args.params / 1e6:.0f}M params, medians of {args.repeat}; GB/s of fp32")
    print(format_table(
        ["format", "llmwire quant", "bnb quant", "x", "llmwire dequant", "bnb dequant", "x"],
        [[r["format"], f"{r['llmwire_quant_gbps']:.2f}", f"{r['bnb_quant_gbps']:.2f}",
          f"{r['llmwire_quant_gbps'] / r['bnb_quant_gbps']:.1f}",
          f"{r['llmwire_dequant_gbps']:.2f}", f"{r['bnb_dequant_gbps']:.2f}",
          f"{r['llmwire_dequant_gbps'] / r['bnb_dequant_gbps']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
