"""The model of tests/test_nvflare_job.py, and each site's deterministic update."""

import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(128, 128)
        self.out = torch.nn.Linear(128, 64)


def update(site: int, round_: int, name: str, value: torch.Tensor) -> torch.Tensor:
    """What site ``site`` adds to tensor ``name`` in round ``round_`` (weights only)."""
    if value.dim() < 2:
        return torch.zeros_like(value)
    g = torch.Generator().manual_seed(1000 * site + 10 * round_ + len(name))
    return 0.01 * torch.randn(value.shape, generator=g)
