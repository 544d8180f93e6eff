"""Where an update lands: applied to the receiver's own copy of the reference
(:class:`ApplySink`), or weighted into a running sum (:class:`AccumulateSink`).

Both check the manifest before anything is touched: it must be an update of
the reference they hold (round and digest), cover exactly its tensors with
their shapes and dtypes, and tie only what the reference ties.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from ..errors import PayloadRefused, TargetMismatch
from ..payloads.manifest import Entry, Manifest
from ..payloads.sinks import StateDictSink
from ..tensors import DTYPES, TensorView, view_tensor
from .reference import Reference, state_digest
from .update import add_into

__all__ = ["ApplySink", "AccumulateSink", "ReferenceMismatch", "NonFiniteUpdate", "check_update",
           "float_sums"]


#: the largest |weight x value| a sum takes, by the sums' itemsize: float32
#: sums then hold ~10^8 such terms, float64 ones ~10^8 too, before overflowing
MAX_TERM = {4: 1e30, 8: 1e300}


class NonFiniteUpdate(PayloadRefused):
    """An upload holds a value that is not finite, or that times its weight
    lies beyond :data:`MAX_TERM` (and could overflow the sums): refused before
    it is added, and the slices of it already added are taken back out."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "NonFiniteUpdate")


class ReferenceMismatch(PayloadRefused):
    """The update applies to another state than the one this receiver holds
    (another round, or the same round with other bits). Nothing was touched."""

    def __init__(self, theirs: Reference | None, ours: Reference | None) -> None:
        self.theirs, self.ours = theirs, ours
        super().__init__(
            f"the update applies to {theirs or 'no reference (whole weights)'}, this receiver "
            f"holds {ours or 'no reference'}: rounds are never mixed", "ReferenceMismatch")


def check_update(manifest: Manifest, state: Mapping[str, Any], ours: Reference) -> None:
    """Refuse, before anything is touched, an update that is not of ``ours``."""
    theirs = Reference.from_wire(manifest.reference)
    if theirs != ours:
        raise ReferenceMismatch(theirs, ours)
    names = {e.name for e in manifest.entries}
    if names != set(state):
        extra, missing = sorted(names - set(state)), sorted(set(state) - names)
        raise TargetMismatch(f"the update does not cover the reference's tensors exactly "
                             f"(unknown {extra[:5]}, missing {missing[:5]})")
    specs = {e.name: e for e in manifest.entries}
    for entry in manifest.entries:
        source = specs[entry.tied_to] if entry.tied_to else entry
        assert source.spec is not None
        view = view_tensor(state[entry.name])
        if view.shape != source.spec.shape or view.dtype != source.target_dtype:
            raise TargetMismatch(f"{entry.name!r}: the update is for {source.target_dtype} "
                                 f"{source.spec.shape}, the reference holds {view.dtype} "
                                 f"{view.shape}")
        if entry.tied_to is not None and view.numel and \
                not _same_storage(view, view_tensor(state[entry.tied_to])):
            raise TargetMismatch(f"the update ties {entry.name!r} to {entry.tied_to!r}; in the "
                                 "reference they are distinct tensors")


def _same_storage(a: TensorView, b: TensorView) -> bool:
    return a.flat is not None and b.flat is not None and a.numel == b.numel \
        and a.flat.__array_interface__["data"][0] == b.flat.__array_interface__["data"][0]


def _shared(views: dict[str, TensorView], manifest: Manifest) -> None:
    """Two names of one storage must be tied in the update, or it would be
    applied (or counted) twice."""
    seen: dict[int, str] = {}
    for entry in manifest.entries:
        if entry.tied_to is not None:
            continue
        view = views[entry.name]
        if not view.numel or view.flat is None:
            continue
        address = view.flat.__array_interface__["data"][0]
        if address in seen:
            raise TargetMismatch(f"{entry.name!r} shares storage with {seen[address]!r} here, "
                                 "and the update sends both: it would be applied twice")
        seen[address] = entry.name


class ApplySink(StateDictSink):
    """Applies an update to ``state`` in place (the receiver's copy of the
    reference ``reference``): deltas added in float32 and rounded once to each
    tensor's dtype, whole values written, unchanged entries left alone.

    :meth:`commit` returns the new :class:`Reference` (round + 1, the digest
    of ``state`` as it now is); :meth:`receipt` tells the sender the same, so
    it can check both sides hold the same bits. A transfer that fails midway
    leaves ``state`` partly updated: it then matches no reference, and the
    next update against it is refused (get whole weights).
    """

    accepts_updates = True

    def __init__(self, state: Mapping[str, Any], reference: Reference) -> None:
        self.state, self.reference = state, reference
        self._views: dict[str, TensorView] = {}
        self.result: Reference | None = None

    def prepare(self, manifest: Manifest) -> None:
        check_update(manifest, self.state, self.reference)
        for entry in manifest.entries:
            view = view_tensor(self.state[entry.name])
            if view.flat is None or not view.array.flags.writeable:
                raise TargetMismatch(f"{entry.name!r}: the reference tensor is not a writable "
                                     "contiguous tensor")
            self._views[entry.name] = view
        _shared(self._views, manifest)

    def target(self, entry: Entry) -> np.ndarray | None:
        if entry.mode == "delta":
            return None  # restored deltas come through write()
        flat = self._views[entry.name].flat
        assert flat is not None
        return flat

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        flat = self._views[entry.name].flat
        assert flat is not None
        add_into(flat[start:start + values.size], entry.target_dtype, values)

    def tie(self, entry: Entry, source: Entry) -> None:
        dst, src = self._views[entry.name].flat, self._views[source.name].flat
        assert dst is not None and src is not None
        if not np.shares_memory(dst, src):
            dst[...] = src

    def entry_done(self, entry: Entry) -> Any:
        return self.state[entry.name]

    def commit(self) -> Reference:
        self.result = Reference(self.reference.round + 1, state_digest(self.state))
        return self.result

    def receipt(self) -> dict[str, Any]:
        return self.result.to_wire() if self.result is not None else {}


class AccumulateSink(StateDictSink):
    """Adds ``weight x`` each restored delta into ``sums`` (flat float32 or
    float64 arrays by name; tied names share one), as slices arrive.

    ``state`` and ``reference``: the update must be of that state (checked in
    :meth:`prepare`, before anything is added). Adds to one array are
    serialized by a lock of its own (``locks``), so concurrent uploads lose
    nothing. ``added`` records every slice added, as ``(name, start)``, so
    that a contribution can be taken back exactly (``weight`` negated,
    ``only`` those slices: llmwire.rounds.aggregate).
    """

    accepts_updates = True

    def __init__(self, sums: Mapping[str, np.ndarray], weight: float, *,
                 state: Mapping[str, Any] | None = None, reference: Reference | None = None,
                 locks: Mapping[int, Any] | None = None,
                 only: set[tuple[str, int]] | None = None) -> None:
        self.sums, self.weight = sums, float(weight)
        self.state, self.reference = state, reference
        self.locks = locks if locks is not None else {id(a): threading.Lock()
                                                       for a in sums.values()}
        self.only = only
        self.added: set[tuple[str, int]] = set()

    def prepare(self, manifest: Manifest) -> None:
        if self.state is not None and self.reference is not None:
            check_update(manifest, self.state, self.reference)
        seen: dict[int, str] = {}
        for entry in manifest.entries:
            if entry.tied_to is not None:  # one sum for both names, or none (not float)
                if self.sums.get(entry.name) is not self.sums.get(entry.tied_to):
                    raise PayloadRefused(f"the update ties {entry.name!r} to "
                                         f"{entry.tied_to!r}; here they are distinct tensors",
                                         "TargetMismatch")
                continue
            if entry.mode == "value":
                raise PayloadRefused(f"{entry.name!r} changed, and it is not a float tensor: "
                                     "integer and bool tensors must be equal in every update",
                                     "TargetMismatch")
            if entry.mode == "delta":
                other = seen.setdefault(id(self.sums[entry.name]), entry.name)
                if other != entry.name:
                    raise PayloadRefused(f"{entry.name!r} and {other!r} are one tensor here and "
                                         "the update sends both: it would count twice",
                                         "TargetMismatch")

    def write(self, entry: Entry, start: int, values: np.ndarray) -> None:
        key = (entry.name, start)
        if self.only is not None and key not in self.only:
            return
        array = self.sums[entry.name]
        # w x in the sums' dtype (float64 sums: exact). Bounded, so that no sum
        # can overflow: an inf (or NaN) in a sum could not be taken back out.
        scaled = np.multiply(values, self.weight, dtype=array.dtype)
        limit = MAX_TERM[array.dtype.itemsize]
        if scaled.size and not (scaled.max() <= limit and scaled.min() >= -limit):
            raise NonFiniteUpdate(f"{entry.name!r}: the update holds values that are not finite "
                                  f"or, times its weight {self.weight:g}, beyond +-{limit:g}")
        out = array[start:start + values.size]
        with self.locks[id(array)]:
            np.add(out, scaled, out=out)
            self.added.add(key)

    def tie(self, entry: Entry, source: Entry) -> None:
        """The sums of tied names are one array: nothing to add twice."""

    def commit(self) -> None:
        return None


def float_sums(template: Mapping[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
    """Zeroed flat sums for the float tensors of ``template`` (tied names share one)."""
    if dtype not in ("float32", "float64"):
        raise PayloadRefused(f"sums are float32 or float64, not {dtype!r}")
    sums: dict[str, np.ndarray] = {}
    by_address: dict[int, np.ndarray] = {}
    for name, tensor in template.items():
        view = view_tensor(tensor)
        if not DTYPES[view.dtype].is_float:
            continue
        address = view.flat.__array_interface__["data"][0] if view.flat is not None \
            and view.numel else None
        if address is not None and address in by_address:
            sums[name] = by_address[address]
            continue
        sums[name] = np.empty(view.numel, np.dtype(dtype))
        sums[name].fill(0)  # np.zeros would leave the pages untouched until the first fold
        if address is not None:
            by_address[address] = sums[name]
    return sums
