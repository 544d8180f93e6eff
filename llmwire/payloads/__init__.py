"""Payloads: what travels on streams (objects, state dicts, files)."""
