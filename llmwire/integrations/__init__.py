"""Adapters that carry llmwire's formats, deltas and bounded memory into FL
engines (docs/flower.md). Each lives in its own subpackage and imports its
engine only when imported itself; the engines are extras
(``pip install 'llmwire[flower]'``), never dependencies of the core.
"""
