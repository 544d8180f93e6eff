"""Print each run of the raw-fp32 state-dict bench next to a raw-socket run
(same process pair setup as ``llmwire bench stream``): for spotting bimodal runs.

    python3 tools/stream_runs.py [runs] [format] [params]
"""
import argparse
import multiprocessing as mp
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from llmwire.cli.bench.stream import _one_transfer  # noqa: E402
from llmwire.cli.bench.wire import _one_run, _raw_receiver, _raw_sender  # noqa: E402
from llmwire.cli.synthetic import model_size  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=6, help="runs (default: 6)")
    parser.add_argument("format", nargs="?", default="raw", help="format (default: raw)")
    parser.add_argument("params", nargs="?", type=model_size, default=250_000_000,
                        help="model size, e.g. 250M (default)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("runs must be positive")
    runs, fmt, params = args.runs, args.format, args.params
    ctx = mp.get_context("spawn")
    got, raw = [], []
    for i in range(runs):
        f = _one_transfer(ctx, params, fmt, "inplace")
        got.append(f["tensor_bytes"] / f["seconds"] / 1e9)
        raw.append(f["tensor_bytes"] / _one_run(ctx, _raw_receiver, _raw_sender,
                                                f["tensor_bytes"], 4 << 20) / 1e9)
        print(f"run {i}: {fmt} {got[-1]:.2f} GB/s  raw {raw[-1]:.2f} GB/s  "
              f"recv +{f['receiver_peak_mib']:.0f} MiB send +{f['sender_peak_mib']:.0f} MiB",
              flush=True)
    m, r = statistics.median(got), statistics.median(raw)
    print(f"median {fmt} {m:.2f} raw {r:.2f} ratio {m / r:.2f}")
