"""The Flower app that ``llmwire bench flower`` runs (one app, four modes)."""
