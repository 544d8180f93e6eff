"""What a delta applies to: a round number and a digest of the state both
sides compute (:func:`state_digest`).

A delta names its reference in its manifest; a receiver whose own state has
another digest refuses it before touching anything, so rounds are never
silently mixed. Both sides reach the same digest because both apply the same
restored values with the same arithmetic (llmwire.rounds.update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import msgpack
import xxhash

from ..errors import PayloadError
from ..tensors import view_tensor

__all__ = ["Reference", "state_digest"]

_BLOCK_ELEMENTS = 1 << 22


def state_digest(state: Mapping[str, Any]) -> str:
    """xxh3-128 (hex) of a state dict: for each name in sorted order, its
    name, dtype and shape, then its elements in row-major order (as stored:
    bfloat16 as its bit patterns). Equal digests mean equal bits everywhere."""
    hasher = xxhash.xxh3_128()
    for name in sorted(state):
        if not isinstance(name, str):
            raise PayloadError(f"state dict keys must be strings, got {name!r}")
        view = view_tensor(state[name])
        hasher.update(msgpack.packb([name, view.dtype, list(view.shape)]))
        for start in range(0, view.numel, _BLOCK_ELEMENTS):
            hasher.update(view.slice(start, min(view.numel, start + _BLOCK_ELEMENTS)))
    return hasher.hexdigest()


@dataclass(frozen=True)
class Reference:
    """A state both sides hold: round ``round``, whose :func:`state_digest` is ``digest``."""

    round: int
    digest: str

    @classmethod
    def of(cls, state: Mapping[str, Any], round: int) -> "Reference":
        """The reference of ``state`` as round ``round`` (hashes every tensor)."""
        return cls(round, state_digest(state))

    def to_wire(self) -> dict[str, Any]:
        return {"round": self.round, "digest": self.digest}

    @classmethod
    def from_wire(cls, value: Any) -> "Reference | None":
        if (isinstance(value, dict) and type(value.get("round")) is int
                and isinstance(value.get("digest"), str)):
            return cls(value["round"], value["digest"])
        return None

    def __str__(self) -> str:
        return f"round {self.round} ({self.digest[:12]})"
