"""Behaviour-sequence modelling: padding, target attention, and the SIM / ETA retrievers.

Sequences arrive newest first, so position 0 is the most recent behaviour and "the k most
recent" are the first k kept positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor


def pad(jt: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length, D) zero-padded values and the (B, length) mask of real entries."""
    values = jt.values()
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    dense = torch.ops.fbgemm.jagged_to_padded_dense(values, [jt.offsets()], [length], 0.0)
    positions = torch.arange(length, device=values.device)
    return dense, positions.unsqueeze(0) < jt.lengths().unsqueeze(1)


def pad_ids(jt: JaggedTensor, length: int, fill: int = -1) -> torch.Tensor:
    """(B, length) int64 ids (exact, any size) with `fill` where there is no behaviour."""
    values, lengths = jt.values(), jt.lengths()
    positions = torch.arange(length, device=values.device).unsqueeze(0)
    valid = positions < lengths.unsqueeze(1)
    if values.numel() == 0:
        return torch.full(valid.shape, fill, dtype=torch.long, device=values.device)
    idx = torch.where(valid, jt.offsets()[:-1].unsqueeze(1) + positions, 0)
    return torch.where(valid, values[idx], fill)


def _attendable(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A key mask with at least one position per row (a row without behaviours attends to its
    zero padding, and its output is zeroed afterwards), and which rows have any."""
    has_any = mask.any(dim=1)
    safe = mask.clone()
    safe[:, 0] |= ~has_any
    return safe, has_any


class TargetAttention(nn.Module):
    """Multi-head attention with the target item as the query over behaviour keys/values
    (nn.MultiheadAttention's parameters and function).

    With a single query, the key and value projections need not touch every behaviour: per
    head h, q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const, and the constant cancels in
    the softmax; and sum_l a_l (W_v,h x_l + b_v,h) = W_v,h (sum_l a_l x_l) + b_v,h. So the
    scores read the raw behaviours through one projected query per head, and the values are
    projected after the weighted sum: the same function with work per row, not per behaviour
    (tests/test_modules.py checks it against nn.MultiheadAttention, gradients included)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, target: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        safe, has_any = _attendable(mask)
        attn, heads = self.attn, self.attn.num_heads
        dim = attn.embed_dim
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # (E, E) each; head h: rows h*d..(h+1)*d
        b_q, _, b_v = attn.in_proj_bias.chunk(3)
        per_head = (heads, dim // heads, dim)
        q = F.linear(target, w_q, b_q).view(len(target), heads, dim // heads)
        # the query read back through each head's key projection: (B, H, E)
        u = torch.einsum("bhd,hde->bhe", q, w_k.view(per_head)) * (dim // heads) ** -0.5
        scores = (u @ keys.transpose(1, 2)).masked_fill(~safe.unsqueeze(1), float("-inf"))
        context = scores.softmax(dim=-1) @ keys  # (B, H, E): each head's weighted behaviours
        values = torch.einsum("bhe,hde->bhd", context, w_v.view(per_head))
        out = attn.out_proj(values.flatten(1) + b_v)
        return out * has_any.unsqueeze(1).to(out.dtype)


class DINAttention(nn.Module):
    """DIN's local activation unit (Zhou et al., KDD 2018): each behaviour's weight is an MLP
    of [behaviour, target, behaviour - target, behaviour * target], and the interest is the
    weighted sum of the behaviours, not normalised by a softmax (so how much a user did
    counts, not only what). The unit's hidden sizes are the DIN paper's [80, 40]; PReLU as
    there (its Dice activation is left out: a PReLU unit is the common re-implementation).

    It runs on the jagged behaviours (each row's real ones, no padding: a padded position
    weighs nothing, and most of a short sequence's positions are padding)."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (80, 40)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        self.unit = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, target: torch.Tensor, keys: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """target (B, D); keys (N, D), row i's behaviours the next lengths[i] of them."""
        rows = torch.repeat_interleave(torch.arange(len(target), device=target.device),
                                       lengths.long(), output_size=len(keys))
        first, rest = self.unit[0], self.unit[1:]
        # first(pairs) with W = [W_k, W_q, W_d, W_p] on [k, q, k - q, k * q] equals
        # (W_k + W_d) k + W_p (k * q) + ((W_q - W_d) q + b): the query's part is computed once
        # per row, not once per behaviour (the same function, half the work)
        w_k, w_q, w_d, w_p = first.weight.chunk(4, dim=1)
        per_row = F.linear(target, w_q - w_d, first.bias)
        per_key = torch.cat([keys, keys * target.index_select(0, rows)], dim=-1)
        hidden = F.linear(per_key, torch.cat([w_k + w_d, w_p], dim=1)) + \
            per_row.index_select(0, rows)
        weighted = rest(hidden) * keys  # PReLU: (N, C)
        return target.new_zeros(target.shape).index_add(0, rows, weighted)


class SequenceEncoder(nn.Module):
    """One Transformer encoder layer over the short behaviour sequence (post-norm, ReLU, no
    dropout): nn.TransformerEncoderLayer's parameters and function, computed where it matters.
    Only the attention needs the padded (B, L) layout; the projections, feed-forward and norms
    run on the real behaviours alone (most of a short sequence's positions are padding), and
    the attention is two batched matmuls, cheaper on the CPU than the fused kernel at these
    sizes. tests/test_modules.py checks it against the layer, gradients included."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor,
                length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, D): each row's behaviours, newest first, rows split at `offsets`. Returns
        the (B, length, D) encoded behaviours (zero at padding; a row's behaviours past
        `length` are left out) and the (B, length) mask of real ones."""
        layer, attn = self.layer, self.layer.self_attn
        mask = torch.arange(length, device=tokens.device).unsqueeze(0) < \
            offsets.diff().unsqueeze(1)
        safe, _ = _attendable(mask)
        rows, dim, heads = len(mask), tokens.shape[-1], attn.num_heads
        qkv = torch.ops.fbgemm.jagged_to_padded_dense(
            F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias), [offsets], [length], 0.0)
        q, k, v = qkv.view(rows, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5  # (B, H, L, L)
        scores = scores.masked_fill(~safe[:, None, None, :], float("-inf"))
        mixed = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(rows, length, dim)
        mixed = torch.ops.fbgemm.dense_to_jagged(mixed, [offsets])[0]  # back to (N, D)
        hidden = layer.norm1(tokens + attn.out_proj(mixed))
        hidden = layer.norm2(hidden + layer.linear2(F.relu(layer.linear1(hidden))))
        return torch.ops.fbgemm.jagged_to_padded_dense(hidden, [offsets], [length], 0.0), mask


def gather_jagged(jt: JaggedTensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, k, D) embeddings of a jagged sequence at (B, k) positions, zero where not `valid`:
    picks the k straight from the jagged values, never padding the whole sequence."""
    values = jt.values()
    if values.numel() == 0:
        return values.new_zeros(*idx.shape, values.shape[-1])
    flat = torch.where(valid, jt.offsets()[:-1].unsqueeze(1) + idx, 0)
    # index_select, not values[flat]: its backward is an index_add, several times cheaper on
    # CPU than the accumulating index_put of advanced indexing
    picked = values.index_select(0, flat.flatten()).view(*flat.shape, values.shape[-1])
    return picked * valid.unsqueeze(-1).to(values.dtype)


def sim_select(
    categories: torch.Tensor, target_category: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIM (hard search): positions of the k most recent behaviours of the target's category.

    Returns (B, k') indices (k' = min(k, L)) ordered newest first, and which of them are real."""
    length = categories.shape[1]
    k = min(k, length)
    match = mask & (categories == target_category.unsqueeze(1))
    keep = match & (match.long().cumsum(dim=1) <= k)
    recency = torch.arange(length, 0, -1, device=categories.device)
    idx = (keep.long() * recency).topk(k, dim=1).indices
    return idx, keep.gather(1, idx)


class SimHash(nn.Module):
    """Random-hyperplane signatures (LSH for cosine similarity) of embeddings, packed into one
    int64 per embedding (bit j: which side of hyperplane j), so the Hamming distance of two is
    `popcount(a ^ b)`: a few operations per behaviour instead of one per bit. Fixed, not
    trained, saved with the model so a checkpoint hashes the same way."""

    MAX_BITS = 62

    def __init__(self, dim: int, bits: int, seed: int = 0) -> None:
        super().__init__()
        if not 0 < bits <= self.MAX_BITS:
            raise ValueError(f"SimHash bits must be in [1, {self.MAX_BITS}], got {bits}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, bits, generator=g))
        self.register_buffer("bit_values", 2.0 ** torch.arange(bits, dtype=torch.float64),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (((x @ self.planes) > 0).to(torch.float64) @ self.bit_values).long()


def _popcount32(x: torch.Tensor) -> torch.Tensor:
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of non-negative int64 values below 2^62 (SWAR, on each 32-bit half)."""
    return _popcount32(x & 0xFFFFFFFF) + _popcount32(x >> 32)


def simhash_distance(codes: torch.Tensor, jt: JaggedTensor, target_codes: torch.Tensor,
                     length: int) -> torch.Tensor:
    """(B, length) Hamming distances between each behaviour's SimHash code (`codes`, one per
    value of `jt`) and its row's target code; -1 at padding."""
    rows = torch.repeat_interleave(torch.arange(len(target_codes), device=codes.device),
                                   jt.lengths().long(), output_size=len(codes))
    dist = popcount(codes ^ target_codes[rows])
    return pad_ids(JaggedTensor(values=dist, lengths=jt.lengths(), offsets=jt.offsets()),
                   length)


def eta_select(
    distance: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ETA: positions of the k behaviours nearest to the target in SimHash Hamming distance
    (ties go to the more recent). Returns (B, k') indices (k' = min(k, L)) and validity."""
    length = distance.shape[1]
    k = min(k, length)
    recency = torch.arange(length, 0, -1, device=distance.device)
    score = recency - distance * (length + 1)
    score = torch.where(mask, score, torch.full_like(score, torch.iinfo(torch.long).min))
    idx = score.topk(k, dim=1).indices
    return idx, mask.gather(1, idx)
