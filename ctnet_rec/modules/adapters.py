"""CTNet's adapters: they carry a frozen source tower's hidden states into the target tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """What one target layer adds from one source state: the subclass's `transform` of the
    state, layer-normalised first (no affine) with `normalise`, times a learned scalar
    `scale` (starting at 1) with `gated`.

    Weights start at N(0, init_scale^2) and biases at zero, so at deployment the adapter adds
    (almost) nothing and CTNet predicts as the target model did."""

    def __init__(self, normalise: bool = False, gated: bool = False) -> None:
        super().__init__()
        self.normalise = normalise
        self.scale = nn.Parameter(torch.ones(())) if gated else None

    @staticmethod
    def near_zero(lin: nn.Linear, init_scale: float) -> nn.Linear:
        nn.init.normal_(lin.weight, std=init_scale)
        nn.init.zeros_(lin.bias)
        return lin

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = F.layer_norm(x, x.shape[-1:])
        out = self.transform(x)
        return out * self.scale if self.scale is not None else out


class GLUAdapter(Adapter):
    """g(x) = (U1 x) * sigmoid(U2 x): the gated linear unit of CTNet (Eq. 5)."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float, normalise: bool = False,
                 gated: bool = False) -> None:
        super().__init__(normalise, gated)
        # both built before either is initialised: the random draws of every earlier version
        self.value, self.gate = nn.Linear(in_dim, out_dim), nn.Linear(in_dim, out_dim)
        for lin in (self.value, self.gate):
            self.near_zero(lin, init_scale)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


class LinearAdapter(Adapter):
    """g(x) = U x: the "CTNet w/o GLU" ablation of the paper."""

    def __init__(self, in_dim: int, out_dim: int, init_scale: float, normalise: bool = False,
                 gated: bool = False) -> None:
        super().__init__(normalise, gated)
        self.value = self.near_zero(nn.Linear(in_dim, out_dim), init_scale)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x)
