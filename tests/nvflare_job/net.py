"""The model of tests/test_nvflare_job.py."""

import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(128, 128)
        self.out = torch.nn.Linear(128, 64)
