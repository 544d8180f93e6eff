"""A server-side DXO filter that counts the bytes of the values in the
messages as they go out (after the other TASK_DATA filters) and come in
(before the other TASK_RESULT filters): what NVFlare moves, per message."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

_LOCK = threading.Lock()


def value_bytes(value: Any) -> int:
    """Bytes of one value of a DXO (an array, a tensor, or bytes)."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return 0


class WireCounter(DXOFilter):
    """Appends ``{"direction", "bytes"}`` lines to ``path`` for every
    ``WEIGHTS``/``WEIGHT_DIFF`` DXO it sees; changes nothing."""

    def __init__(self, path: str, direction: str) -> None:
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.path, self.direction = path, direction

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        total = sum(value_bytes(v) for v in (dxo.data or {}).values())
        with _LOCK, open(self.path, "a") as f:
            f.write(json.dumps({"direction": self.direction, "bytes": total,
                                "pid": os.getpid()}) + "\n")
        return None
