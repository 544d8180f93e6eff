"""Regenerate the stream state diagram in docs/protocol.md from the transition
table in llmwire/_streams.py. Run: python3 tools/gen_state_diagram.py [--check]"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmwire._streams import stream_state_diagram  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED: stream states (tools/gen_state_diagram.py) -->"
END = "<!-- END GENERATED: stream states -->"
DOC = ROOT / "docs" / "protocol.md"


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{stream_state_diagram()}{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print("docs/protocol.md is out of date: run tools/gen_state_diagram.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
