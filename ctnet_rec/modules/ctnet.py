"""CTNet: a frozen source tower joined to a trainable target tower by one adapter per MLP
layer, z_l = psi(BN(W_l z_{l-1}) + g_l(z^S)) (the paper's Eq. 4, with the tower's batch norm)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import CTNetConfig, FeatureConfig, TowerConfig
from ctnet_rec.modules.adapters import GLUAdapter, LinearAdapter
from ctnet_rec.modules.embeddings import LookedUp
from ctnet_rec.modules.tower import BehaviourPositions, Tower, TowerOutput

SourceInput = tuple[KeyedJaggedTensor, torch.Tensor]  # the batch as the source reads it


class CTNet(nn.Module):
    """`source` is frozen and read-only: no gradients, batch norm always in eval mode, run
    under no_grad. `target` keeps every parameter of the target model; only the adapters are
    new. Adapter l reads the source state chosen by `adapter_tap`:

    - "same_layer" (default, Eq. 4): z^S_l, the source's hidden state of the same depth;
    - "previous_layer": z^S_{l-1}, so the first adapter reads the source input E^S (the paper
      also names z^S_0 = E^S), giving the target the source's embeddings directly;
    - "both": one adapter on each, their outputs added.

    With `output_fusion`, the served logit also adds w (source's logit - c), w and c set by
    the trainer on rows neither tower has trained on (`training/output_fusion.py`). The
    designs are compared in docs/experiment.md, "When transfer helps".

    The long-sequence interests A_SIM, A_ETA (the costliest part of a tower) may be computed
    once: `share_long_sequence_attention`, the target reads the source's (the paper's
    section 4.7; the target's scores move at deployment); `source_long_interest`, the source
    reads the target's (the target computes what it did): "target", everywhere (the source
    then never looks up its long-sequence ids); "target_for_adapters", for the states the
    adapters read, while the source's logit, read only by the output fusion in scoring, is
    its own (so a training step skips the source's long-sequence work)."""

    fusion_weight: torch.Tensor  # buffers, with `output_fusion`
    fusion_offset: torch.Tensor

    def __init__(self, source: Tower, target: Tower, cfg: CTNetConfig) -> None:
        super().__init__()
        self.source, self.target, self.cfg = source, target, cfg
        self.source.requires_grad_(False)
        self.source.eval()
        src_dims = [source.mlp.in_dim, *source.model_cfg.mlp_hidden]
        tgt_dims = target.model_cfg.mlp_hidden
        offset = 0 if cfg.adapter_tap == "previous_layer" else 1
        self.taps = [layer + offset for layer in range(len(tgt_dims))]
        if self.taps[-1] >= len(src_dims):
            raise ValueError(
                f"the source MLP has {len(src_dims) - 1} hidden layers, the target "
                f"{len(tgt_dims)}: {cfg.adapter_tap!r} adapters need source states "
                f"{self.taps}, counting E^S as 0")
        cls = GLUAdapter if cfg.adapter == "glu" else LinearAdapter

        def one_per_layer(taps: list[int]) -> nn.ModuleList:
            return nn.ModuleList(cls(src_dims[t], out, cfg.adapter_init_scale,
                                     cfg.adapter_input_norm, cfg.adapter_gate)
                                 for t, out in zip(taps, tgt_dims, strict=True))

        self.adapters = one_per_layer(self.taps)
        # "both": a second adapter per layer reads the state one below (E^S for the first)
        self.input_adapters = one_per_layer([t - 1 for t in self.taps]) \
            if cfg.adapter_tap == "both" else None
        # `source_long_interest`, "own" where the source has no long-sequence units
        self.long_interest = cfg.source_long_interest \
            if source.sim is not None or source.eta is not None else "own"
        # the source's own long-sequence interests, for its logit in scoring: only with
        # "target_for_adapters" and the output fusion (the one reader of that logit)
        self.source_scores_own_interest = self.long_interest == "target_for_adapters" \
            and cfg.output_fusion
        # the source looks up none of its long-sequence ids where it reads the target's
        # interests alone
        unread = [source.long.item_column, source.long.category_column] \
            if self.long_interest != "own" and source.long is not None else []
        self.view = SourceView(source.features, target.features, unread,
                               unread_in_eval=not self.source_scores_own_interest)
        # both towers read the same ids with the same sequence settings: the ids' positions
        # (length groups, SIM's selection) are made once, the same values either way
        self.share_positions = self.view.same_schema and \
            source.positions_key() == target.positions_key()
        # off: the adapters add nothing, as if zeroed, and no source logit is fused (what the
        # source contributes is the difference); for evaluation, not a model setting
        self.use_adapters = True
        # the target's lookups without gradients (its tables, whose optimisers are fused
        # into the backward pass, stay as they are): for passes that train the adapters alone
        self.target_lookups_frozen = False
        if cfg.output_fusion:  # w and c of the fused output, set by the trainer (0: none)
            self.register_buffer("fusion_weight", torch.zeros(()))
            self.register_buffer("fusion_offset", torch.zeros(()))
        sharing = [name for name, on in (
            ("share_long_sequence_attention", cfg.share_long_sequence_attention),
            (f"source_long_interest = {cfg.source_long_interest!r}",
             self.long_interest != "own")) if on]
        if len(sharing) > 1:
            raise ValueError(f"{' and '.join(sharing)}: each tower would read the other's "
                             "long-sequence interests; choose one")
        if sharing:
            mine = [m is not None for m in (target.sim, target.eta)]
            theirs = [m is not None for m in (source.sim, source.eta)]
            if mine != theirs or target.layout.token_dim != source.layout.token_dim:
                raise ValueError(
                    f"{sharing[0]} needs the same long-sequence modules in both towers: "
                    f"SIM/ETA source {theirs} vs target {mine}, token dims "
                    f"{source.layout.token_dim} vs {target.layout.token_dim}")

    def train(self, mode: bool = True) -> CTNet:
        super().train(mode)
        self.source.eval()  # frozen: its batch-norm statistics never move
        return self

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> TowerOutput:
        """Target rows in the target's feature layout; the source reads them through its own.
        Both towers' lookups are called here, on the batch's features (or the source's view
        of them), so that TorchRec's train pipeline finds and pipelines them."""
        src_input, src_looked_up, positions = self.source_lookups(sparse, dense)
        assert self.target.embeddings is not None  # a tower with its own tables
        with torch.no_grad() if self.target_lookups_frozen else nullcontext():
            looked_up = self.target.embeddings(sparse)
        return joined(self, sparse, dense, looked_up, src_input, src_looked_up, positions)

    def source_lookups(self, sparse: KeyedJaggedTensor, dense: torch.Tensor
                       ) -> tuple[SourceInput, LookedUp, BehaviourPositions | None]:
        """The batch as the source reads it, the source's table lookups, and the ids'
        positions when the towers share them (`share_positions`)."""
        viewed = self.view(sparse, dense)
        positions = positions_of(self.target, sparse) if self.share_positions else None
        assert self.source.embeddings is not None  # a tower with its own tables
        # no_grad, not inference mode: on the CPU, fbgemm's fused lookup is registered only
        # behind the autograd dispatch key, which inference mode skips
        with torch.no_grad():
            looked_up = self.source.embeddings(viewed[0])
        return viewed, looked_up, positions

    def output_parts(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Per row, [the target tower's logit (adapters included), the source's logit]: what
        the fused output's weight is fitted on."""
        assert self.target.embeddings is not None
        out, src = self.from_lookups(sparse, dense, self.target.embeddings(sparse),
                                     *self.source_lookups(sparse, dense), fuse=False)
        return torch.stack([out.logits, src.logits], dim=1)

    def from_lookups(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                     looked_up: LookedUp, src_input: SourceInput, src_looked_up: LookedUp,
                     positions: BehaviourPositions | None, fuse: bool = True
                     ) -> tuple[TowerOutput, TowerOutput]:
        """Both towers after their lookups: the target's output (on its embeddings
        `looked_up`, the adapters reading the source's states) and the source's. With
        `output_fusion`, in eval mode (what is scored and served), the target's logit plus w
        (source's logit - c); training fits the towers without it (w is fitted apart, out of
        sample). `positions`: the ids' positions, made already (else each tower makes its
        own)."""
        if self.long_interest != "own":
            inputs, interest = self.target.embed(sparse, dense, None, looked_up, positions)
            reused = [a.detach() for a in interest]
            if self.training or not self.source_scores_own_interest:
                src = frozen_after_lookups(self.source, *src_input, src_looked_up, positions,
                                           reused)
            else:  # scoring: the source's own logit, the adapters' states as in training
                own = frozen_after_lookups(self.source, *src_input, src_looked_up, positions)
                src = frozen_on_interest(self.source, own, reused)
            logits, hidden = self.target.mlp(inputs, self.adapter_outputs(src))
            out = TowerOutput(logits, inputs, hidden, interest)
        else:
            src = frozen_after_lookups(self.source, *src_input, src_looked_up, positions)
            shared = src.long_interest if self.cfg.share_long_sequence_attention else None
            out = self.target(sparse, dense, self.adapter_outputs(src), long_interest=shared,
                              looked_up=looked_up, positions=positions)
        if self.cfg.output_fusion and fuse and self.use_adapters and not self.training:
            out.logits = out.logits + self.fusion_weight * (src.logits - self.fusion_offset)
        return out, src

    def adapter_outputs(self, src: TowerOutput) -> list[torch.Tensor | None] | None:
        """What the adapters add to the target's MLP layers from the source's states (None
        with `use_adapters` off)."""
        if not self.use_adapters:
            return None
        states = [src.inputs, *src.hidden]
        adds = [a(states[t]) for a, t in zip(self.adapters, self.taps, strict=True)]
        if self.input_adapters is not None:
            adds = [x + a(states[t - 1]) for x, a, t in zip(adds, self.input_adapters,
                                                           self.taps, strict=True)]
        return list(adds)


@torch.fx.wrap
def joined(ctnet: CTNet, sparse: KeyedJaggedTensor, dense: torch.Tensor, looked_up: LookedUp,
           src_input: SourceInput, src_looked_up: LookedUp,
           positions: BehaviourPositions | None) -> TowerOutput:
    """`ctnet.from_lookups`' target output, one opaque call to torch.fx (see
    `tower.after_lookups`)."""
    return ctnet.from_lookups(sparse, dense, looked_up, src_input, src_looked_up, positions)[0]


@torch.fx.wrap
def positions_of(tower: Tower, sparse: KeyedJaggedTensor) -> BehaviourPositions:
    """`tower.behaviour_positions`, one opaque call to torch.fx (see `tower.after_lookups`;
    torch.fx patches a wrapped function only in the module that wraps it)."""
    return tower.behaviour_positions(sparse)


def frozen_after_lookups(tower: Tower, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                         looked_up: LookedUp, positions: BehaviourPositions | None,
                         long_interest: list[torch.Tensor] | None = None) -> TowerOutput:
    """A frozen tower's `from_embeddings` in inference mode (no autograd records, no version
    counters: about a tenth of its time on the CPU), its outputs copied out of it, since
    inference tensors cannot be saved for the adapters' backward."""
    with torch.inference_mode():
        out = tower.from_embeddings(sparse, dense, looked_up, long_interest=long_interest,
                                    positions=positions)
    return TowerOutput(out.logits.clone(), out.inputs.clone(), [h.clone() for h in out.hidden],
                       [a.clone() for a in out.long_interest])


def frozen_on_interest(tower: Tower, out: TowerOutput,
                       long_interest: list[torch.Tensor]) -> TowerOutput:
    """A frozen tower's output `out` with its MLP run again on its input E with
    `long_interest` in place of its own A_SIM, A_ETA: the states it has when given those
    (`from_embeddings(long_interest=...)`, the same floats), its own logit kept."""
    cols = tower.long_interest_columns()
    inputs = torch.cat([out.inputs[:, :cols.start], *long_interest, out.inputs[:, cols.stop:]],
                       dim=-1)
    with torch.inference_mode():
        _, hidden = tower.mlp(inputs)
    return TowerOutput(out.logits, inputs, [h.clone() for h in hidden], out.long_interest)


class SourceView(nn.Module):
    """Target inputs as the source tower reads them: keys only the source has arrive empty,
    keys only the target has are dropped; likewise dense columns (zeros when missing). The
    `unread` keys (ids the source is not to look up) arrive empty too, in training and,
    with `unread_in_eval`, in scoring.

    Shared keys pass their ids through unchanged, so both schemas must treat a shared key's
    raw ids alike: the same id policy and, unless the policy is managed (each tower then maps
    the ids to its own rows), the same table size. Refused otherwise."""

    def __init__(self, source: FeatureConfig, target: FeatureConfig,
                 unread: list[str] | None = None, unread_in_eval: bool = True) -> None:
        super().__init__()
        src_keys, tgt_keys = source.sparse_keys(), target.sparse_keys()
        self.keys = src_keys
        self.unread = set(unread or [])
        self.unread_in_eval = unread_in_eval
        self.same_schema = src_keys == tgt_keys and \
            source.dense_names() == target.dense_names()
        for key in [k for k in src_keys if k in tgt_keys]:
            mapping = _mapping_of(source, key), _mapping_of(target, key)
            if mapping[0] != mapping[1]:
                raise ValueError(
                    f"feature {key!r}: the source maps its ids as {mapping[0]} (id policy, "
                    f"rows or bucket boundaries), the target as {mapping[1]}; CTNet feeds the "
                    "source tower the target's ids, so a shared feature needs the same policy "
                    "and, unless managed, the same table size (a bucketised numeric: the same "
                    "boundaries)")
        tgt_dense = target.dense_names()
        self.dense_index = [tgt_dense.index(n) if n in tgt_dense else -1
                            for n in source.dense_names()]

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> SourceInput:
        unread = self.unread if self.training or self.unread_in_eval else set()
        if self.same_schema and not unread:
            return sparse, dense
        jts = sparse.to_dict()
        rows = sparse.stride()
        empty = JaggedTensor(values=torch.zeros(0, dtype=sparse.values().dtype,
                                                device=dense.device),
                             lengths=torch.zeros(rows, dtype=sparse.lengths().dtype,
                                                 device=dense.device))
        kjt = KeyedJaggedTensor.from_jt_dict({k: empty if k in unread else
                                              jts.get(k, empty) for k in self.keys})
        if self.same_schema:
            return kjt, dense
        cols = [dense[:, i] if i >= 0 else dense.new_zeros(rows) for i in self.dense_index]
        return kjt, torch.stack(cols, 1) if cols else dense.new_zeros(rows, 0)


def _mapping_of(features: FeatureConfig, key: str) -> tuple[str, int | tuple[float, ...] | None]:
    """(id policy, rows) of the table a sparse key looks up; rows None when managed (the
    tower maps ids itself); a bucketised numeric's boundaries (same count, other values: the
    source would read other buckets)."""
    table = features.table_of(key)
    if table is None:
        return "bucket", next(tuple(n.boundaries) for n in features.numeric if n.name == key)
    policy = features.policy_of(table)
    return policy, None if policy == "managed" else features.table(table).num_embeddings


SOURCE_TABLE_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


TowerConfigs = tuple[FeatureConfig, TowerConfig]


def build_ctnet(source: TowerConfigs, target: TowerConfigs, cfg: CTNetConfig,
                device: torch.device | None = None, source_table_dtype: str = "fp32") -> CTNet:
    """CTNet from the two towers' configs, the source tables stored in `source_table_dtype`
    ("fp32" or "fp16")."""
    return CTNet(Tower(*source, device=device,
                       table_dtype=SOURCE_TABLE_DTYPES[source_table_dtype]),
                 Tower(*target, device=device), cfg)
