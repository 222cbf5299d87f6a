from __future__ import annotations

import copy

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from ctnet_rec.data.reader import ParquetBatchReader
from ctnet_rec.modules.attention import (
    LengthBuckets,
    SequenceEncoder,
    SimHash,
    TargetAttention,
    _attendable,
    eta_select,
    gather_jagged,
    pad,
    padded_slots,
    popcount,
    sim_select,
    simhash_distance,
    take_padded,
)
from ctnet_rec.modules.tower import Tower


def test_pad_and_mask_with_empty_rows():
    jt = JaggedTensor(values=torch.arange(10.0).view(5, 2), lengths=torch.tensor([0, 3, 2, 0]))
    dense, mask = pad(jt, 2)
    assert dense.shape == (4, 2, 2)
    assert mask.tolist() == [[False, False], [True, True], [True, True], [False, False]]
    assert dense[1].tolist() == [[0.0, 1.0], [2.0, 3.0]]  # first (newest) entries kept
    assert dense[0].abs().sum() == 0
    ids = JaggedTensor(values=torch.tensor([2**62, -5, 7]), lengths=torch.tensor([2, 0, 1]))
    slots, valid = padded_slots(ids.offsets(), 3)
    assert take_padded(ids.values(), slots, valid).tolist() == \
        [[2**62, -5, -1], [-1, -1, -1], [7, -1, -1]]
    assert take_padded(ids.values()[:0], *padded_slots(torch.zeros(4, dtype=torch.long), 3)
                       ).tolist() == [[-1] * 3] * 3


def jagged(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, offsets) of the masked-in positions of a (B, L, D) tensor (a prefix per row)."""
    lengths = mask.sum(dim=1)
    return padded[mask], torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def test_attention_handles_empty_and_all_padding_rows():
    torch.manual_seed(0)
    ta, enc = TargetAttention(8, 2), SequenceEncoder(8, 2)
    keys = torch.randn(3, 4, 8)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    encoded, enc_mask = enc(*jagged(keys, mask), 4)
    assert torch.equal(enc_mask, mask)
    out = ta(torch.randn(3, 8), encoded, mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().sum() == 0  # no behaviours, no signal
    assert out[0].abs().sum() > 0
    # padding positions do not influence the result
    keys2 = keys.clone()
    keys2[0, 2:] = 100.0
    torch.testing.assert_close(ta(torch.ones(3, 8), keys2, mask)[0],
                               ta(torch.ones(3, 8), keys, mask)[0])
    # a batch without any behaviour
    nothing, none_mask = enc(torch.zeros(0, 8), torch.zeros(4, dtype=torch.long), 4)
    assert nothing.shape == (3, 4, 8) and nothing.abs().sum() == 0 and not none_mask.any()


def test_target_attention_is_multihead_attention():
    """TargetAttention computes nn.MultiheadAttention (its own parameters) with the target as
    the single query, values and gradients, masked positions ignored, without projecting every
    behaviour."""
    torch.manual_seed(3)
    ta = TargetAttention(12, 3)
    with torch.no_grad():
        ta.attn.in_proj_bias.normal_()  # nonzero biases: the key bias must cancel, not vanish
    target, keys = torch.randn(6, 12, requires_grad=True), torch.randn(6, 5, 12, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5,
                         [True, False, True, False, True], [True] * 5, [True] + [False] * 4])
    got = ta(target, keys, mask)
    safe, has_any = _attendable(mask)
    want, _ = ta.attn(target.unsqueeze(1), keys, keys, key_padding_mask=~safe, need_weights=False)
    want = want.squeeze(1) * has_any.unsqueeze(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), [target, keys, *ta.parameters()])
    wants = torch.autograd.grad(want.square().sum(), [target, keys, *ta.parameters()])
    # the key bias's gradient is zero in exact arithmetic (it cancels); the reference's is
    # rounding noise, up to ~2e-6 on some CPUs, where ours is exactly zero
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("by_length", [True, False], ids=["length groups", "one padded batch"])
def test_sequence_encoder_is_the_transformer_encoder_layer(by_length: bool):
    """SequenceEncoder (on the real behaviours, attention padded in length groups or in one
    batch) computes nn.TransformerEncoderLayer (its own parameters) on the padded sequence,
    values and gradients, at real positions; padding comes out zero; behaviours past the
    length are left out as padding leaves them out."""
    torch.manual_seed(4)
    enc = SequenceEncoder(12, 3)
    tokens = torch.randn(5, 6, 12)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False], [False] * 6,
                         [True] * 5 + [False], [True] + [False] * 5])
    values, offsets = jagged(tokens, mask)
    values.requires_grad_(True)
    got, got_mask = enc(values, offsets, 6, by_length)
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [6], 0.0)
    safe, _ = _attendable(mask)
    want = enc.layer(padded, src_key_padding_mask=~safe) * mask.unsqueeze(-1)
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), [values, *enc.parameters()])
    wants = torch.autograd.grad(want.square().sum(), [values, *enc.parameters()])
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    short, short_mask = enc(values, offsets, 4, by_length)  # rows cut to their 4 newest
    cut = enc.layer(padded[:, :4], src_key_padding_mask=~_attendable(mask[:, :4])[0])
    torch.testing.assert_close(short, cut * mask[:, :4].unsqueeze(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(short_mask, mask[:, :4])


def test_length_groups_cover_every_row_once_and_pad_each_to_its_longest():
    """The length groups of a batch with lengths 0..40 under a cap of 30: every row and every
    kept behaviour in one group, each group padded to its longest row (far less padding than
    one batch of 30), and the encoder's output equal to the one padded batch's,
    gradients included, behaviours past the cap and empty rows included."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 41, (64,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    buckets = LengthBuckets(offsets, 30)
    capped = lengths.clamp(max=30)
    assert sum(len(m) for m in buckets.masks) == 64
    assert sum(int(m.sum()) for m in buckets.masks) == int(capped.sum())
    assert all(int(m.sum(1).max()) == m.shape[1] for m in buckets.masks if m.any())
    assert sum(m.numel() for m in buckets.masks) < 0.8 * 64 * 30
    enc = SequenceEncoder(8, 2)
    values = torch.randn(int(offsets[-1]), 8, generator=g, requires_grad=True)
    (grouped, _), (padded, _) = (enc(values, offsets, 30, by) for by in (True, False))
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(*(torch.autograd.grad(out.square().sum(), values)
                                 for out in (grouped, padded)), rtol=1e-4, atol=1e-6)


def test_sim_picks_the_k_most_recent_of_the_target_category():
    g = torch.Generator().manual_seed(1)
    cats = torch.randint(0, 3, (50, 20), generator=g)
    lengths = torch.randint(0, 21, (50,), generator=g)
    mask = torch.arange(20).unsqueeze(0) < lengths.unsqueeze(1)
    target = torch.randint(0, 3, (50,), generator=g)
    idx, valid = sim_select(cats, target, mask, k=4)
    assert idx.shape == (50, 4)
    for b in range(50):
        want = [p for p in range(int(lengths[b])) if cats[b, p] == target[b]][:4]
        assert idx[b][valid[b]].tolist() == want


def test_eta_picks_the_k_nearest_by_hamming():
    g = torch.Generator().manual_seed(2)
    h = SimHash(8, 16)
    lengths = torch.randint(0, 16, (40,), generator=g)
    items = JaggedTensor(values=torch.randn(int(lengths.sum()), 8, generator=g), lengths=lengths)
    target = torch.randn(40, 8, generator=g)
    mask = torch.arange(15).unsqueeze(0) < lengths.unsqueeze(1)
    distance = simhash_distance(h(items.values()), h(target),
                                *padded_slots(items.offsets(), 15))
    idx, valid = eta_select(distance, mask, k=5)
    per_row, planes = items.to_dense(), h.planes
    for b in range(40):
        n = int(lengths[b])
        side = (target[b] @ planes) > 0
        dist = [int(((per_row[b][p] @ planes > 0) != side).sum()) for p in range(n)]
        assert distance[b, :n].tolist() == dist
        want = sorted(range(n), key=lambda p: (dist[p], p))[:5]  # nearest, then most recent
        assert idx[b][valid[b]].tolist() == want


def test_popcount_counts_bits():
    x = torch.tensor([0, 1, 2**62 - 1, 0b1011, 2**40 + 2**33 + 7])
    assert popcount(x).tolist() == [bin(v).count("1") for v in x.tolist()]


def test_gather_jagged_picks_positions_and_zeroes_the_rest():
    jt = JaggedTensor(values=torch.arange(12.0).reshape(6, 2), lengths=torch.tensor([2, 0, 4]))
    idx = torch.tensor([[1, 0], [0, 1], [3, 2]])
    valid = torch.tensor([[True, True], [False, False], [True, False]])
    got = gather_jagged(jt, idx, valid)
    want = torch.tensor([[[2.0, 3], [0, 1]], [[0, 0], [0, 0]], [[10, 11], [0, 0]]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bits", [1, 13, 32, 62])
def test_simhash_packs_bit_j_as_the_side_of_hyperplane_j(bits: int):
    h = SimHash(16, bits)
    x = torch.randn(300, 16)
    sides = ((x @ h.planes) > 0).long()
    assert h(x).tolist() == (sides << torch.arange(bits)).sum(dim=1).tolist()
    assert h(x[:0]).shape == (0,)


def test_simhash_codes_many_rows_in_passes_alike(monkeypatch):
    """Above two passes' rows the codes are made pass by pass: the same to the bit."""
    h = SimHash(16, 62)
    x = torch.randn(700, 16)
    whole = h(x)
    monkeypatch.setattr(SimHash, "ROWS_PER_PASS", 128)
    passes = []
    monkeypatch.setattr(h, "signature", lambda part: passes.append(len(part)) or
                        SimHash.signature(h, part))
    assert torch.equal(h(x), whole)
    assert passes == [128] * 5 + [60]
    passes.clear()
    assert torch.equal(h(x[:256]), whole[:256]) and passes == [256]


def test_simhash_is_deterministic_and_locality_sensitive():
    h = SimHash(16, 62)
    assert torch.equal(h.planes, SimHash(16, 62).planes)
    x = torch.randn(100, 16)
    assert h(x).dtype == torch.int64 and (h(x) >= 0).all()
    near = popcount(h(x) ^ h(x + 0.05 * torch.randn(100, 16))).float().mean()
    far = popcount(h(x) ^ h(torch.randn(100, 16))).float().mean()
    assert near < far / 4
    with pytest.raises(ValueError, match="bits must be in"):
        SimHash(16, 63)


@pytest.fixture(scope="module")
def batch(tiny_world, demo_config):
    reader = ParquetBatchReader(tiny_world, "B", [3], demo_config.features, demo_config.data,
                                batch_size=128, shuffle=False)
    return next(iter(reader))


@pytest.mark.parametrize(("ta", "sim", "eta", "n_attn"),
                         [(True, True, True, 3), (False, True, False, 1), (False, False, False, 0)])
def test_tower_modules_switch_off(demo_config, batch, ta, sim, eta, n_attn):
    model = copy.deepcopy(demo_config.model)
    model.use_target_attention, model.use_sim, model.use_eta = ta, sim, eta
    torch.manual_seed(0)
    tower = Tower(demo_config.features, model)
    out = tower(batch.sparse, batch.dense)
    token = 2 * 16
    pooled = 16 + 8 + 4 + 4 + 4  # user, seller, age, hour, price buckets
    assert out.inputs.shape == (len(batch), pooled + token * (1 + n_attn))
    assert out.logits.shape == (len(batch),) and torch.isfinite(out.logits).all()
    assert [h.shape[1] for h in out.hidden] == model.mlp_hidden
    out.logits.sum().backward()
    item_table = tower.embeddings.sequence.embeddings["item"].weight
    assert item_table.grad is not None and item_table.grad.abs().sum() > 0


def test_a_tower_neither_reads_nor_looks_up_a_sequence_it_does_not_use(demo_config, tiny_world,
                                                                        batch):
    """The DIN row (no SIM, no ETA): the long sequence is not in its tables' features, not in
    what its trainer reads, and a batch carrying it scores as one without it."""
    from ctnet_rec.experiment.runner import din_config
    from ctnet_rec.training.distributed import init_distributed
    from ctnet_rec.training.trainer import PeriodTrainer

    cfg = din_config(demo_config)
    torch.manual_seed(0)
    tower = Tower(cfg.features, cfg.model).eval()
    long = next(s for s in cfg.features.sequences if s.kind == "long")
    assert long.item_column not in {f for c in tower.embeddings.sequence.embedding_configs()
                                    for f in c.feature_names}
    narrowed = cfg.features.for_model(cfg.model)
    assert long.item_column not in narrowed.required_columns()
    trainer = PeriodTrainer(cfg, init_distributed("cpu"))
    assert trainer.features_read() == narrowed
    lean = next(iter(ParquetBatchReader(tiny_world, "B", [3], narrowed, cfg.data,
                                        batch_size=128, shuffle=False)))
    assert long.item_column in batch.sparse.keys() and long.item_column not in lean.sparse.keys()
    torch.testing.assert_close(tower(batch.sparse, batch.dense).logits,
                               tower(lean.sparse, lean.dense).logits)
    # the full tower reads every sequence
    assert demo_config.features.for_model(demo_config.model) == demo_config.features


def test_tower_with_users_without_history(demo_config, tiny_world):
    reader = ParquetBatchReader(tiny_world, "C", [0], demo_config.features, demo_config.data,
                                batch_size=400, shuffle=False)
    b = next(iter(reader))
    lengths = b.sparse["hist_item_ids"].lengths()
    assert (lengths == 0).any()  # the first period has users with no history at all
    tower = Tower(demo_config.features, demo_config.model).eval()
    assert torch.isfinite(tower(b.sparse, b.dense).logits).all()


def test_mlp_adds_hook(demo_config, batch):
    tower = Tower(demo_config.features, demo_config.model).eval()
    out = tower(batch.sparse, batch.dense)
    zeros = [torch.zeros_like(h) for h in out.hidden]
    torch.testing.assert_close(tower(batch.sparse, batch.dense, zeros).logits, out.logits)
    bumped = tower(batch.sparse, batch.dense, [None, None, torch.ones_like(out.hidden[2])])
    assert not torch.allclose(bumped.logits, out.logits)
    torch.testing.assert_close(bumped.hidden[0], out.hidden[0])


def test_din_unit_sums_weighted_behaviours_without_normalising():
    from ctnet_rec.modules.attention import DINAttention

    torch.manual_seed(0)
    din = DINAttention(8)
    target, e = torch.randn(3, 8), torch.randn(3, 8)
    one = din(target, e, torch.ones(3, dtype=torch.long))
    twice = din(target, e.repeat_interleave(2, dim=0), torch.full((3,), 2))
    torch.testing.assert_close(twice, 2 * one)  # no softmax: two clicks weigh twice one
    # a row without behaviours has no interest
    assert not din(target, e[:2], torch.tensor([1, 0, 1]))[1].any()


def test_din_unit_is_the_mlp_of_the_four_pairs():
    """On jagged behaviours, with the query's share of the first layer computed once per row,
    the unit and its gradients are DIN's MLP over [k, q, k - q, k * q] per padded behaviour,
    padding masked out."""
    from ctnet_rec.modules.attention import DINAttention, pad

    torch.manual_seed(0)
    din = DINAttention(8)
    lengths = torch.tensor([3, 0, 5, 1])
    target = torch.randn(4, 8, requires_grad=True)
    values = torch.randn(int(lengths.sum()), 8, requires_grad=True)
    got = din(target, values, lengths)
    keys, mask = pad(JaggedTensor(values=values, lengths=lengths), 5)
    q = target.unsqueeze(1).expand_as(keys)
    pairs = torch.cat([keys, q, keys - q, keys * q], dim=-1)
    weights = din.unit(pairs.flatten(0, 1)).view(4, 5, 1) * mask.unsqueeze(-1)
    want = (weights * keys).sum(dim=1)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), [target, values, din.unit[0].weight])
    wants = torch.autograd.grad(want.square().sum(), [target, values, din.unit[0].weight])
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w)
