"""Memory profiler: sender and receiver RSS over loopback for each transfer mode.

A thin wrapper around ``llmwire.profile`` (also ``llmwire profile``):

    python3 tools/memprofile.py --params 100M --csv mem.csv --plot mem.png
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from llmwire.profile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
