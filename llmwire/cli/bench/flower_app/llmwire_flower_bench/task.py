"""The model and the "training" every mode shares (llmwire.cli.bench._fl_task)."""

# A Flower app that trains torch models imports torch: ArrayRecord's
# to_torch_state_dict refuses to run unless torch is already imported, and
# _fl_task imports it only where it trains.
import torch  # noqa: F401

from llmwire.cli.bench._fl_task import empty_model, initial_model, note_idle, train

__all__ = ["empty_model", "initial_model", "note_idle", "train"]
