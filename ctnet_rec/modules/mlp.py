"""The tower's MLP, with a hook for CTNet's adapters."""

from __future__ import annotations

import torch
from torch import nn


class TowerMLP(nn.Module):
    """Linear -> BatchNorm -> LeakyReLU per hidden layer, then a linear logit.

    `forward` returns the logit and every hidden layer's output (z_1..z_L), because CTNet's
    adapters read a source tower's hidden states. `adds[l]`, when given, is added to layer l's
    normalised pre-activation: z_l = psi(BN(W_l z_{l-1}) + adds[l]) (CTNet Eq. 4)."""

    def __init__(self, in_dim: int, hidden: list[int], slope: float) -> None:
        super().__init__()
        self.in_dim = in_dim  # E's width
        dims = [in_dim, *hidden]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.norms = nn.ModuleList(nn.BatchNorm1d(h) for h in hidden)
        self.act = nn.LeakyReLU(slope)
        self.out = nn.Linear(dims[-1], 1)

    def forward(
        self, x: torch.Tensor, adds: list[torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = []
        for i, (lin, bn) in enumerate(zip(self.linears, self.norms, strict=True)):
            pre = bn(lin(x))
            if adds is not None and adds[i] is not None:
                pre = pre + adds[i]
            x = self.act(pre)
            hidden.append(x)
        return self.out(x).squeeze(-1), hidden
