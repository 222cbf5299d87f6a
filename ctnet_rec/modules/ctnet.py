"""CTNet: a frozen source tower joined to a trainable target tower by one adapter per MLP
layer, z_l = psi(BN(W_l z_{l-1}) + g_l(z^S)) (the paper's Eq. 4, with the tower's batch norm)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctnet_rec.config import CTNetConfig
from ctnet_rec.modules.adapters import GLUAdapter, LinearAdapter
from ctnet_rec.modules.tower import Tower, TowerOutput


class CTNet(nn.Module):
    """`source` is frozen and read-only: no gradients, batch norm always in eval mode, run
    under no_grad. `target` keeps every parameter of the target model; only the adapters are
    new. Adapter l reads the source state chosen by `adapter_tap`:

    - "same_layer" (default, Eq. 4): z^S_l, the source's hidden state of the same depth;
    - "previous_layer": z^S_{l-1}, so the first adapter reads the source input E^S (the paper
      also names z^S_0 = E^S), giving the target the source's embeddings directly."""

    def __init__(self, source: Tower, target: Tower, cfg: CTNetConfig) -> None:
        super().__init__()
        self.source, self.target, self.cfg = source, target, cfg
        self.source.requires_grad_(False)
        self.source.eval()
        src_dims = [source.mlp.linears[0].in_features, *source.model_cfg.mlp_hidden]
        tgt_dims = target.model_cfg.mlp_hidden
        offset = 1 if cfg.adapter_tap == "same_layer" else 0
        self.taps = [layer + offset for layer in range(len(tgt_dims))]
        if self.taps[-1] >= len(src_dims):
            raise ValueError(
                f"the source MLP has {len(src_dims) - 1} hidden layers, the target "
                f"{len(tgt_dims)}: {cfg.adapter_tap!r} adapters need source states "
                f"{self.taps}, counting E^S as 0")
        cls = GLUAdapter if cfg.adapter == "glu" else LinearAdapter
        self.adapters = nn.ModuleList(
            cls(src_dims[t], out, cfg.adapter_init_scale)
            for t, out in zip(self.taps, tgt_dims, strict=True)
        )

    def train(self, mode: bool = True) -> CTNet:
        super().train(mode)
        self.source.eval()  # frozen: its batch-norm statistics never move
        return self

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                source_sparse: KeyedJaggedTensor | None = None,
                source_dense: torch.Tensor | None = None) -> TowerOutput:
        """Target inputs, and the same rows under the source's feature config when its schema
        differs (by default the source reads the target's inputs)."""
        with torch.no_grad():
            src = self.source(source_sparse if source_sparse is not None else sparse,
                              source_dense if source_dense is not None else dense)
        states = [src.inputs, *src.hidden]
        adds = [a(states[t]) for a, t in zip(self.adapters, self.taps, strict=True)]
        return self.target(sparse, dense, adds)
