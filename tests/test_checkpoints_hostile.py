"""llmwire's safetensors reader against a corpus of hostile and valid files.

The corpus is ``tests/vectors/safetensors/`` (written by its
``make_corpus.py``, each file described in its ``README.md`` and
``expected.json``). Every hostile file must be refused when it is opened,
with a ``CheckpointError`` whose message is one line naming the file and,
where one entry is at fault, that entry; ``llmwire send`` must refuse it the
same way before it connects. Every valid file must open and give what
``safetensors.torch.load_file`` gives: names in header order, dtypes,
shapes, bytes, metadata.

The corpus is also checked against the ``safetensors`` library itself (which
files it reads, which it refuses), so that the README's table stays true;
those tests need no llmwire reader. ``llmwire.checkpoints`` is imported by a
fixture, not at the top, so that this module collects without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402  (after the importorskip)
from safetensors.torch import load_file  # noqa: E402

import llmwire  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "vectors" / "safetensors"
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
FILES: dict[str, dict[str, Any]] = EXPECTED["files"]
HOSTILE = [name for name, row in FILES.items() if row["kind"] == "hostile"]
VALID = [name for name, row in FILES.items() if row["kind"] == "valid"]
TIMEOUT = 60

#: hostile files ``llmwire send`` is run on, one or two from each kind of fault
CLI_SAMPLE = [
    "hostile/header_length_over_limit.safetensors",  # framing: a limit before allocation
    "hostile/name_lone_surrogate_escape.safetensors",  # a name no terminal can print
    "hostile/header_deep_nesting_entry.safetensors",  # RecursionError in json
    "hostile/duplicate_name.safetensors",  # two readers, two tensors
    "hostile/dtype_unknown.safetensors",  # one entry at fault
    "hostile/shape_nbytes_wraps_u64.safetensors",  # unchecked arithmetic
    "hostile/offsets_overlap.safetensors",  # ranges that do not tile the data
]

#: a refusal may allocate this much at most: the largest hostile file is under
#: 1 MB, and the smallest claims a 100 MB header (a reader that believes a
#: length field before checking it shows up far above this)
MEMORY_LIMIT = 32 << 20


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def generator() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="session")
def unstored(generator: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the cases too large to store (deep nesting)."""
    out = tmp_path_factory.mktemp("safetensors_corpus")
    for case in generator.CASES:
        if not case.stored:
            generator.write_case(case, out)
    return out


@pytest.fixture
def corpus_file(unstored: Path):
    """The path of a corpus file by its name in expected.json."""
    def path_of(name: str) -> Path:
        return (CORPUS if FILES[name]["stored"] else unstored) / name
    return path_of


@pytest.fixture(scope="module")
def checkpoints() -> ModuleType:
    """``llmwire.checkpoints``; an ImportError here fails the reader's tests."""
    return importlib.import_module("llmwire.checkpoints")


def _expected_entries(row: dict[str, Any]) -> list[str] | None:
    entry = row["entry"]
    return None if entry is None else [entry] if isinstance(entry, str) else list(entry)


def _open_files() -> int | None:
    fd_dir = "/proc/self/fd"
    return len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None


def _raw(tensor: Any) -> bytes:
    """A tensor's bytes, little-endian, C order (any dtype, any rank)."""
    if tensor.numel() == 0:  # an empty tensor may carry any strides, even 0
        return b""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _safetensors_refuses(path: Path) -> bool:
    """Whether safetensors refuses the file: at open, at any get_tensor, or in load_file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        load_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # SafetensorError, and a pyo3 panic (a BaseException) too
        return True
    return False


# ------------------------------------------------------------------ the corpus itself


def test_corpus_folder_matches_expected_json() -> None:
    on_disk = {str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/*.safetensors")}
    stored = {name for name, row in FILES.items() if row["stored"]}
    assert on_disk == stored
    assert HOSTILE and VALID
    for name in HOSTILE:
        entries = _expected_entries(FILES[name])
        assert entries is None or entries, name


def test_generator_reproduces_the_stored_bytes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(CORPUS / "make_corpus.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    made = {str(p.relative_to(tmp_path)): p.read_bytes()
            for p in tmp_path.rglob("*") if p.is_file()}
    kept = {str(p.relative_to(CORPUS)): p.read_bytes()
            for p in CORPUS.rglob("*") if p.is_file()
            and p.name != "make_corpus.py" and "__pycache__" not in p.parts}
    assert sorted(made) == sorted(kept)
    changed = [name for name in made if made[name] != kept[name]]
    assert not changed, f"run make_corpus.py: these differ from what it writes: {changed}"


def test_generator_is_deterministic(generator: ModuleType) -> None:
    for case in generator.CASES:
        assert case.build() == case.build(), case.name


@pytest.mark.parametrize("name", HOSTILE + VALID)
def test_safetensors_library_verdict_is_recorded(name: str, corpus_file) -> None:
    """The README's safetensors column: checked where that version is installed."""
    row = FILES[name]
    refuses = _safetensors_refuses(corpus_file(name))
    if row["kind"] == "valid":
        assert not refuses, "a valid file must load in safetensors"
        return
    if refuses != row["safetensors_refuses"]:
        observed, verdict = EXPECTED["observed_with_safetensors"], ("accepts", "refuses")[refuses]
        if safetensors.__version__ != observed:
            pytest.skip(f"safetensors {safetensors.__version__} {verdict} it, {observed} did "
                        "not: update OBSERVED_WITH and the case in make_corpus.py")
        pytest.fail(f"safetensors {observed} {verdict} it: the README says otherwise")


@pytest.mark.parametrize("name", VALID)
def test_valid_file_reads_in_safetensors_as_recorded(name: str) -> None:
    row, path = FILES[name], CORPUS / name
    tensors = load_file(str(path))
    assert sorted(tensors) == sorted(t["name"] for t in row["tensors"])
    for t in row["tensors"]:
        got = tensors[t["name"]]
        assert got.dtype == getattr(torch, t["dtype"]), t["name"]
        assert tuple(got.shape) == tuple(t["shape"]), t["name"]
        assert _raw(got) == bytes.fromhex(t["bytes"]), t["name"]
    with safe_open(str(path), framework="pt") as f:
        assert (f.metadata() or {}) == row["metadata"]


# ------------------------------------------------------------------ llmwire's reader


def test_checkpoint_error_is_a_payload_error_and_a_value_error(checkpoints: ModuleType) -> None:
    assert issubclass(checkpoints.CheckpointError, llmwire.PayloadError)
    assert issubclass(checkpoints.CheckpointError, ValueError)


def _refusal(checkpoints: ModuleType, path: Path) -> Any:
    with pytest.raises(checkpoints.CheckpointError) as info:
        ck = checkpoints.open_checkpoint(str(path))
        ck.close()  # reached only when the file was not refused
    return info.value


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_is_refused_at_open(name: str, corpus_file, checkpoints: ModuleType) -> None:
    path = corpus_file(name)
    exc = _refusal(checkpoints, path)
    message = str(exc)
    assert exc.path == str(path)
    assert isinstance(exc.reason, str) and exc.reason.strip()
    if exc.entry is None:
        assert message == f"{path}: {exc.reason}"
    else:
        assert message == f"{path}: entry '{exc.entry}': {exc.reason}"
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message
    entries = _expected_entries(FILES[name])
    if entries is not None:
        assert exc.entry in entries, f"blames {exc.entry!r}, not one of {entries}"


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_refusal_holds_no_file_and_little_memory(
        name: str, corpus_file, checkpoints: ModuleType) -> None:
    path = corpus_file(name)
    files_before = _open_files()
    tracemalloc.start()
    try:
        _refusal(checkpoints, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"refusing a {path.stat().st_size}-byte file took {peak} bytes"
    assert _open_files() == files_before, "the refused file is still open"


@pytest.mark.parametrize("name", VALID)
def test_valid_file_matches_safetensors(name: str, checkpoints: ModuleType) -> None:
    row, path = FILES[name], CORPUS / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    reference = load_file(str(path))
    order = [t["name"] for t in row["tensors"]]
    files_before = _open_files()
    with checkpoints.open_checkpoint(str(path)) as ck:
        assert list(ck) == order, "a checkpoint lists its tensors in header order"
        assert len(ck) == len(order)
        assert dict(ck.metadata) == row["metadata"]
        assert "__metadata__" not in ck
        for t in row["tensors"]:
            ft = ck[t["name"]]
            assert ft.dtype == t["dtype"], t["name"]
            assert ft.shape == tuple(t["shape"]), t["name"]
            got, want = ft.load(), reference[t["name"]]
            assert got.dtype == want.dtype, t["name"]
            assert tuple(got.shape) == tuple(want.shape), t["name"]
            assert _raw(got) == _raw(want) == bytes.fromhex(t["bytes"]), t["name"]
            if got.numel():  # load() is a copy: writing to it changes neither file nor reload
                got.reshape(-1).view(torch.uint8)[0] ^= 0xFF
                assert _raw(ft.load()) == bytes.fromhex(t["bytes"]), t["name"]
    assert _open_files() == files_before, "close() left the file open"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "reading changed the file"


def test_close_without_with(checkpoints: ModuleType) -> None:
    files_before = _open_files()
    ck = checkpoints.open_checkpoint(str(CORPUS / "valid" / "dtypes.safetensors"))
    assert ck["f32_3d"].load().reshape(-1).tolist() == [float(i) for i in range(24)]
    ck.close()
    assert _open_files() == files_before


# ------------------------------------------------------------------ the command line


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["LLMWIRE_SECRET"] = "x"
    return env


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_send_refuses_hostile_file_before_connecting(name: str, corpus_file) -> None:
    """One line on stderr naming the file (and entry), exit 1. Port 9 has no
    receiver: had the command tried to connect it would exit 3, another message."""
    assert name in FILES
    path = corpus_file(name)
    proc = subprocess.run([sys.executable, "-m", "llmwire", "send", str(path),
                           "--to", "127.0.0.1:9"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("llmwire: error:"), proc.stderr
    assert str(path) in lines[0], proc.stderr
    entries = _expected_entries(FILES[name])
    if entries is not None:
        assert any(f"entry '{e}'" in lines[0] for e in entries), proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
