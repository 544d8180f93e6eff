"""The sans-I/O core must not do I/O: no asyncio, socket, time, select or threading."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "llmwire"
FORBIDDEN = {"asyncio", "socket", "time", "select", "selectors", "threading", "ssl"}


@pytest.mark.parametrize("module", ["frames.py", "protocol.py", "_streams.py", "_window.py", "events.py"])
def test_core_imports_no_io(module):
    tree = ast.parse((ROOT / module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
            assert node.module.split(".")[0] in {"errors", "events", "frames", "_streams", "_window"}, \
                node.module
    assert not found & FORBIDDEN, f"{module} imports {found & FORBIDDEN}"
