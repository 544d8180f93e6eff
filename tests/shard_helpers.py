"""A Hugging Face model directory written as transformers writes one, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(directory: Path, state: dict[str, torch.Tensor], per_shard: int) -> None:
    """``state`` as ``model-0000N-of-0000M.safetensors`` shards of ``per_shard``
    tensors each, ``model.safetensors.index.json`` and a ``config.json``."""
    directory.mkdir(parents=True)
    names = list(state)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in group}, str(directory / file), {"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text('{"model_type": "test"}')
