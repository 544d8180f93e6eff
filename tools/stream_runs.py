"""Print each run of the raw-fp32 state-dict bench next to a raw-socket run
(same process pair setup as ``llmwire bench stream``): for spotting bimodal runs.

    python3 tools/stream_runs.py [runs] [format] [params]
"""
import multiprocessing as mp
import statistics
import sys

sys.path.insert(0, ".")
from llmwire.cli.bench.stream import _one_transfer  # noqa: E402
from llmwire.cli.bench.wire import _one_run, _raw_receiver, _raw_sender  # noqa: E402
from llmwire.cli.synthetic import parse_size  # noqa: E402

if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    fmt = sys.argv[2] if len(sys.argv) > 2 else "raw"
    params = parse_size(sys.argv[3]) if len(sys.argv) > 3 else 250_000_000
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
