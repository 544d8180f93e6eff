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


def test_transport_guide_example_runs(capsys):
    import re

    text = (ROOT / "docs" / "transport.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "async def main" in c]
    code = code.replace("llmwire.run(main())",
                        "llmwire.run(asyncio.wait_for(main(), 15))")
    exec(compile(code, "docs/transport.md", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out
    assert out.count("'ack': 12000") == 4
