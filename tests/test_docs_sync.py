"""docs/protocol.md's state diagram is generated from the transition table."""

from __future__ import annotations

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_state_diagram_in_sync():
    gen = runpy.run_path(str(ROOT / "tools" / "gen_state_diagram.py"))
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert gen["render"](text) == text, "run: python3 tools/gen_state_diagram.py"


def test_error_table_names_every_wire_error():
    import llmwire.errors as errors

    table = (ROOT / "docs" / "errors.md").read_text()
    for name in errors.__all__:
        if name not in ("QuantizationError", "NonFiniteError"):
            assert f"`{name}`" in table, name
