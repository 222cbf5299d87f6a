"""CTNet's adapters: they carry a frozen source tower's hidden states into the target tower."""

from __future__ import annotations

import torch
from torch import nn


class GLUAdapter(nn.Module):
    """g(x) = (U1 x) * sigmoid(U2 x): the gated linear unit of CTNet (Eq. 5).

    Weights start at N(0, init_scale^2) and biases at zero, so at deployment the adapter adds
    (almost) nothing and CTNet predicts as the target model did."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float) -> None:
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(in_dim, out_dim)
        for lin in (self.value, self.gate):
            nn.init.normal_(lin.weight, std=init_scale)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class LinearAdapter(nn.Module):
    """g(x) = U x: the "CTNet w/o GLU" ablation of the paper."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float) -> None:
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.value.weight, std=init_scale)
        nn.init.zeros_(self.value.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x)
