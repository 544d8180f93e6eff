"""The model and the "training" that every mode of the engine benches (Flower,
NVFlare) shares: a synthetic Llama-shaped model and a deterministic change
per client, round and tensor, so that every mode's final global can be
compared with the stock engine's; and the idle RSS each app process notes."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import xxhash

from llmwire.cli.synthetic import llama_shapes, llama_state_dict

STEP = 1e-3
_BLOCK = 1 << 20  # elements of noise drawn at once


def note_idle(out_dir: str, role: str) -> None:
    """Record this process's RSS before it holds any model (its idle RSS:
    Python, torch, the engine, llmwire imported), for the bench's over-idle figures."""
    with open("/proc/self/statm", "rb") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    path = os.path.join(out_dir, "idle")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{role}-{os.getpid()}"), "w") as f:
        f.write(str(rss))


def read_idle(out_dir: str, remove: bool = False) -> dict[int, int]:
    """What :func:`note_idle` recorded under ``out_dir``: idle RSS by pid."""
    idle = {}
    path = os.path.join(out_dir, "idle")
    for name in os.listdir(path) if os.path.isdir(path) else []:
        if "-" not in name:
            continue
        with open(os.path.join(path, name)) as f:
            idle[int(name.rsplit("-", 1)[1])] = int(f.read())
        if remove:
            os.unlink(os.path.join(path, name))
    return idle


def model_bytes(params: int) -> int:
    """Bytes of the synthetic model in fp32."""
    return sum(4 * math.prod(shape) for shape in llama_shapes(params).values())


def max_abs_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """The largest difference between two state dicts, tensor by tensor."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def initial_model(params: int) -> dict[str, Any]:
    """The global every run starts from (the same bits in every mode)."""
    return llama_state_dict(params, seed=0)


def empty_model(params: int) -> dict[str, Any]:
    """A client's model before it receives the global."""
    import torch  # here, not at import: the benches that import this module run without it

    return {name: torch.empty(shape) for name, shape in llama_shapes(params).items()}


def train(state: dict[str, Any], partition: int, server_round: int) -> int:
    """Change every matrix of ``state`` in place, as client ``partition``'s
    training of round ``server_round`` would (noise drawn a block of rows at
    a time, so that it costs no second copy of a large tensor); returns its
    number of examples (its FedAvg weight)."""
    import torch

    for name, tensor in state.items():
        if tensor.dim() < 2:
            continue  # the norms stay frozen: unchanged tensors cost nothing in llmwire's modes
        seed = xxhash.xxh32_intdigest(f"{partition}/{server_round}/{name}".encode())
        generator = torch.Generator().manual_seed(seed)
        rows = max(1, _BLOCK // max(1, tensor[0].numel()))
        for start in range(0, tensor.shape[0], rows):
            block = tensor[start:start + rows]
            block.add_(torch.randn(block.shape, generator=generator).mul_(STEP))
    return 100 * (partition + 1)
