"""A learned orthogonal map between two domains' embedding spaces (DDTCDR, DASL)."""

from __future__ import annotations

import torch
from torch import nn


class OrthogonalMap(nn.Module):
    """x -> X x with X = exp(A - A^T), orthogonal by construction, so X^T maps back exactly and
    distances between users are kept (DDTCDR's "latent orthogonal mapping"). A starts at zero:
    X = I, the other domain's embedding as it is."""

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.skew = nn.Parameter(torch.zeros(dim, dim, device=device))

    def reset_parameters(self) -> None:  # DistributedModelParallel materialises meta modules
        nn.init.zeros_(self.skew)

    def forward(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        matrix = torch.linalg.matrix_exp(self.skew - self.skew.T)
        return x @ matrix if inverse else x @ matrix.T
