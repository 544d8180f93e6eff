"""llmwire test suite (run twice in CI: native and LLMWIRE_PURE_PYTHON=1)."""
