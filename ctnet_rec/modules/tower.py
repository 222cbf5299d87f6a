"""The single-domain CTR tower ("Base" model of the paper)."""

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.config import FeatureConfig, SequenceConfig, TowerConfig
from ctnet_rec.modules.attention import (
    DINAttention,
    LengthBuckets,
    SequenceEncoder,
    SimHash,
    TargetAttention,
    eta_select,
    gather_jagged,
    pad,
    padded_slots,
    sim_select,
    simhash_distance,
    take_padded,
)
from ctnet_rec.modules.embeddings import EmbeddingLayout, LookedUp, TowerEmbeddings
from ctnet_rec.modules.mlp import TowerMLP


@dataclass
class TowerOutput:
    """Logits, the MLP input E and each hidden layer's output (what CTNet's adapters read),
    and the long-sequence interests A_SIM, A_ETA (what a CTNet target tower may reuse)."""

    logits: torch.Tensor
    inputs: torch.Tensor
    hidden: list[torch.Tensor]
    long_interest: list[torch.Tensor]


@dataclass
class BehaviourPositions:
    """What a batch's ids alone decide for a tower's sequence units: the short sequence's
    length groups (its self-attention on the CPU), the long sequence's slots in the jagged
    values and mask of real positions (`padded_slots`), and SIM's selection. Two towers that
    read the same ids with the same sequence settings (`Tower.positions_key`) make the same,
    so CTNet makes them once for both towers."""

    short_groups: LengthBuckets | None = None
    long_slots: torch.Tensor | None = None
    long_mask: torch.Tensor | None = None
    sim: tuple[torch.Tensor, torch.Tensor] | None = None


FIRST_LAYER = "mlp.linears.0.weight"  # a tower's first MLP layer, as its state names it

class Tower(nn.Module):
    """E = concat(pooled ids, target item+category, A_TA, A_SIM, A_ETA, dense numerics);
    p = sigmoid(MLP(E)). Behaviour tokens are item and category embeddings concatenated.

    - TA: one Transformer layer over the short sequence, then target attention.
    - SIM: the k most recent long-sequence behaviours of the target's category, then TA.
    - ETA: the k long-sequence behaviours nearest to the target by SimHash Hamming distance,
      then TA.
    Any of the three is left out when the config switches it off or lacks the sequence."""

    def __init__(self, features: FeatureConfig, model: TowerConfig,
                 device: torch.device | None = None,
                 table_dtype: DataType = DataType.FP32, lookups: bool = True) -> None:
        """`lookups=False`: a tower without tables of its own, for models that look the ids up
        elsewhere (the joint-learning baselines) and pass the embeddings to `forward`."""
        super().__init__()
        features = features.for_model(model)
        self.features, self.model_cfg = features, model
        self.embeddings = TowerEmbeddings(features, device, table_dtype) if lookups else None
        self.layout = EmbeddingLayout.of(features)
        shared = features.sequence_tables()
        self.target_keys = [f.name for f in features.id_features if f.table in shared]
        short = next((s for s in features.sequences if s.kind == "short"), None)
        long = next((s for s in features.sequences if s.kind == "long"), None)
        self.short = short if model.use_target_attention else None
        self.long = long if (model.use_sim or model.use_eta) else None
        token = 2 * self.layout.token_dim
        heads = model.attention_heads
        din = model.short_sequence == "din"
        self.encoder = SequenceEncoder(token, heads) if self.short and not din else None
        self.ta: nn.Module | None = None
        if self.short:
            self.ta = DINAttention(token) if din else TargetAttention(token, heads)
        self.sim = TargetAttention(token, heads) if long and model.use_sim else None
        self.eta = TargetAttention(token, heads) if long and model.use_eta else None
        self.simhash = SimHash(self.layout.token_dim, model.eta_hash_bits) if self.eta else None
        n_attn = sum(m is not None for m in (self.ta, self.sim, self.eta))
        in_dim = (self.layout.pooled_dim + token * (1 + n_attn)
                  + len(features.dense_names()))
        self.mlp = TowerMLP(in_dim, model.mlp_hidden, model.leaky_relu_slope)

    @staticmethod
    def behaviours(emb: dict[str, JaggedTensor], seq: SequenceConfig) -> JaggedTensor:
        """A sequence's tokens (item and category embeddings side by side), jagged."""
        items = emb[seq.item_column]
        return JaggedTensor(values=torch.cat([items.values(), emb[seq.category_column].values()],
                                             dim=-1),
                            lengths=items.lengths(), offsets=items.offsets())

    def positions_key(self) -> tuple[object, ...]:
        """The settings `behaviour_positions` reads besides the ids: towers with equal keys
        make equal positions of the same batch."""
        return (self.short if self.encoder is not None else None, self.long,
                self.model_cfg.sim_top_k if self.sim is not None else None,
                self.features.category_column)

    def behaviour_positions(self, sparse: KeyedJaggedTensor) -> BehaviourPositions:
        """This tower's `BehaviourPositions` of the batch `sparse`."""
        out = BehaviourPositions()
        if self.encoder is not None and sparse.values().device.type == "cpu":
            assert self.short is not None  # the encoder is built with it
            out.short_groups = LengthBuckets(sparse[self.short.item_column].offsets(),
                                             self.short.max_len)
        if self.long is not None:
            s = self.long
            out.long_slots, out.long_mask = padded_slots(sparse[s.item_column].offsets(),
                                                         s.max_len)
            if self.sim is not None:
                ids = take_padded(sparse[s.category_column].values(), out.long_slots,
                                  out.long_mask)
                out.sim = sim_select(ids, sparse[self.features.category_column].values(),
                                     out.long_mask, self.model_cfg.sim_top_k)
        return out

    def embed(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
              long_interest: list[torch.Tensor] | None = None,
              looked_up: LookedUp | None = None,
              positions: BehaviourPositions | None = None) -> tuple[torch.Tensor,
                                                                    list[torch.Tensor]]:
        """The MLP input E, and its long-sequence part. Given `long_interest` (another tower's
        A_SIM, A_ETA), the long-sequence work is skipped and those are used instead; given
        `looked_up`, the embeddings are those instead of this tower's tables'; given
        `positions`, those instead of this tower's `behaviour_positions`."""
        if looked_up is None:
            assert self.embeddings is not None, "a tower without tables is given `looked_up`"
            looked_up = self.embeddings(sparse)
        if positions is None:
            positions = self.behaviour_positions(sparse)
        pooled, emb = looked_up
        item_key, cat_key = self.features.item_column, self.features.category_column
        target = torch.cat([emb[item_key].values(), emb[cat_key].values()], dim=-1)
        interests = []
        if self.short is not None:
            s, ta = self.short, self.ta
            assert ta is not None  # built with the short sequence
            tokens = self.behaviours(emb, s)
            if isinstance(self.ta, DINAttention):  # on the jagged behaviours
                interests.append(ta(target, tokens.values(), tokens.lengths()))
            else:
                padded, mask = self.encoder(tokens.values(), tokens.offsets(), s.max_len,
                                            groups=positions.short_groups) \
                    if self.encoder is not None else pad(tokens, s.max_len)
                interests.append(ta(target, padded, mask))
        if long_interest is None:
            long_interest = self.long_sequence_interest(emb, target, positions)
        parts = self.combine(pooled, emb, target, interests + long_interest)
        if dense.shape[1]:
            parts.append(dense)
        return torch.cat(parts, dim=-1), long_interest

    def combine(self, pooled: dict[str, torch.Tensor], emb: dict[str, JaggedTensor],
                target: torch.Tensor, interests: list[torch.Tensor]) -> list[torch.Tensor]:
        """E's parts before the dense features: the pooled embeddings by key (a sharded
        collection orders its output by placement, so the layout of E would otherwise change
        with the world size and plan), the target, the attention units' interests."""
        return [*(pooled[k] for k in self.layout.pooled_keys), target, *interests]

    def long_interest_columns(self) -> slice:
        """Where A_SIM, A_ETA lie in E (`combine`: pooled, target, A_TA, then these)."""
        token = 2 * self.layout.token_dim
        start = self.layout.pooled_dim + token * (2 if self.ta is not None else 1)
        return slice(start, start + token * sum(m is not None for m in (self.sim, self.eta)))

    def long_sequence_interest(self, emb: dict[str, JaggedTensor], target: torch.Tensor,
                               positions: BehaviourPositions) -> list[torch.Tensor]:
        """[A_SIM, A_ETA] (those switched on): the long sequence's retrieval + attention."""
        out: list[torch.Tensor] = []
        if self.long is not None:
            s = self.long
            items, cats = emb[s.item_column], emb[s.category_column]
            slots, mask = positions.long_slots, positions.long_mask
            assert slots is not None and mask is not None  # made with the long sequence

            def attend(module: TargetAttention, idx: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
                keys = torch.cat([gather_jagged(items, idx, valid),
                                  gather_jagged(cats, idx, valid)], dim=-1)
                return module(target, keys, valid)

            if self.sim is not None:
                assert positions.sim is not None  # made with SIM
                out.append(attend(self.sim, *positions.sim))
            if self.eta is not None and self.simhash is not None:  # built together
                with torch.no_grad():
                    distance = simhash_distance(
                        self.simhash(items.values()),
                        self.simhash(emb[self.features.item_column].values()), slots, mask)
                idx, valid = eta_select(distance, mask, self.model_cfg.eta_top_k)
                out.append(attend(self.eta, idx, valid))
        return out

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                adds: list[torch.Tensor | None] | None = None,
                long_interest: list[torch.Tensor] | None = None,
                looked_up: LookedUp | None = None,
                positions: BehaviourPositions | None = None) -> TowerOutput:
        if looked_up is None:
            assert self.embeddings is not None, "a tower without tables is given `looked_up`"
            looked_up = self.embeddings(sparse)
        return after_lookups(self, sparse, dense, looked_up, adds, long_interest, positions)

    def from_embeddings(self, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                        looked_up: LookedUp, adds: list[torch.Tensor | None] | None = None,
                        long_interest: list[torch.Tensor] | None = None,
                        positions: BehaviourPositions | None = None) -> TowerOutput:
        """Everything of `forward` after the table lookups."""
        inputs, interest = self.embed(sparse, dense, long_interest, looked_up, positions)
        logits, hidden = self.mlp(inputs, adds)
        return TowerOutput(logits, inputs, hidden, interest)


@torch.fx.wrap
def after_lookups(tower: Tower, sparse: KeyedJaggedTensor, dense: torch.Tensor,
                  looked_up: LookedUp, adds: list[torch.Tensor | None] | None,
                  long_interest: list[torch.Tensor] | None,
                  positions: BehaviourPositions | None) -> TowerOutput:
    """`tower.from_embeddings`, as one opaque call to torch.fx: TorchRec's train pipeline
    traces a model only to find the lookups that read the batch, and what follows them
    (data-dependent selection, jagged attention) is not symbolically traceable."""
    return tower.from_embeddings(sparse, dense, looked_up, adds, long_interest, positions)

