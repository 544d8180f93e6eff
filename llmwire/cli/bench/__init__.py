"""Benchmarks behind ``llmwire bench``: each module offers
``add_arguments(parser)`` and ``run(args) -> int``."""
