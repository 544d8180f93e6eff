"""Repository invariants: CI runs exactly the README's test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m pip")]


def test_ci_runs_the_readme_test_command() -> None:
    readme = _command_lines((ROOT / "README.md").read_text())
    ci = _command_lines((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2, "the README has exactly two set-up commands"
    assert len(ci) == 1 and ci[0] in readme and "pytest" in ci[0]
    assert "LLMWIRE_PURE_PYTHON=1" in ci[0], "CI runs the suite with the reference too"


def test_install_steps_pin_torch() -> None:
    for line in _command_lines((ROOT / "README.md").read_text()):
        assert "torch==" in line, line
