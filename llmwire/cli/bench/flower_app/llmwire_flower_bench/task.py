"""The model and the "training" every mode shares (llmwire.cli.bench._fl_task)."""

from llmwire.cli.bench._fl_task import empty_model, initial_model, note_idle, train

__all__ = ["empty_model", "initial_model", "note_idle", "train"]
