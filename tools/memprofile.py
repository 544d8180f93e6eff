"""Memory profiler: sender and receiver RSS over loopback for each transfer mode.

A thin wrapper around ``llmwire.profile`` (also ``llmwire profile``):

    python3 tools/memprofile.py --params 100M --csv mem.csv --plot mem.png
    python3 tools/memprofile.py --sizes 0.25,0.5,1,2 --repeat 3 --sweep-plot sweep.png
    python3 tools/memprofile.py --model my.safetensors --formats raw,nf4 --receiver inplace
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmwire.profile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
