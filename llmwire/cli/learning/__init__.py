"""Federated learning on real text, for ``llmwire bench learn`` and the FedAvg
example: Shakespeare split by genre into naturally non-IID clients
(:mod:`.data`), a tiny character-level transformer and SmolLM2-135M
(:mod:`.models`). Applications of the library, not part of it."""
