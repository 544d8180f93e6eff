"""Raw loopback sockets: reused 4 MiB buffers against model-sized buffers.

    python3 tools/raw_socket_buffers.py [bytes] [runs]

Moves ``bytes`` (1 GiB) between two processes with blocking sendall /
recv_into, three runs each, with both sides' buffers either a reused 4 MiB
chunk (``llmwire bench wire``'s baseline) or arrays as large as the data,
already touched (``llmwire bench stream``'s second baseline). Shows what
moving real memory, rather than a cache-hot buffer, costs the plain socket.
The process pairs are the benches' own.
"""

import argparse
import multiprocessing as mp
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmwire.cli.bench.stream import _raw_model_receiver, _raw_model_sender  # noqa: E402
from llmwire.cli.bench.wire import _one_run, _raw_receiver, _raw_sender  # noqa: E402

CHUNK = 4 << 20

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bytes", nargs="?", type=int, default=1 << 30,
                        help="bytes to move per run (default: 1 GiB)")
    parser.add_argument("runs", nargs="?", type=int, default=3, help="runs (default: 3)")
    args = parser.parse_args()
    if args.bytes < 1 or args.runs < 1:
        parser.error("bytes and runs must be positive")
    nbytes, runs = args.bytes, args.runs
    ctx = mp.get_context("spawn")
    for label, receiver, sender in (("reused 4 MiB buffers", _raw_receiver, _raw_sender),
                                    ("model-sized buffers on both sides", _raw_model_receiver,
                                     _raw_model_sender)):
        got = [round(nbytes / _one_run(ctx, receiver, sender, nbytes, CHUNK) / 1e9, 2)
               for _ in range(runs)]
        print(f"{label}: {got} GB/s")
