"""``python -m llmwire``: the same as the ``llmwire`` command."""

import sys

from .cli import main

sys.exit(main())
