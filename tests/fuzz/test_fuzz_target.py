"""Keep the atheris target importable and working (without atheris)."""

from __future__ import annotations

import importlib.util
import pathlib

from hypothesis import given, settings, strategies as st

_spec = importlib.util.spec_from_file_location(
    "fuzz_protocol", pathlib.Path(__file__).with_name("fuzz_protocol.py"))
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_target_accepts_or_raises_documented(data):
    fuzz.one_input(data)
