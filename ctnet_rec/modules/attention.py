"""Behaviour-sequence modelling: padding, target attention, and the SIM / ETA retrievers.

Sequences arrive newest first, so position 0 is the most recent behaviour and "the k most
recent" are the first k kept positions."""

from __future__ import annotations

import typing

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


def padded_slots(offsets: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) positions of each row's first `length` values in the jagged values (0 where
    the row has none) and the (B, length) mask of real ones."""
    positions = torch.arange(length, device=offsets.device).unsqueeze(0)
    valid = positions < offsets.diff().unsqueeze(1)
    return torch.where(valid, offsets[:-1].unsqueeze(1) + positions, 0), valid


def take_padded(values: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor,
                fill: int = -1) -> torch.Tensor:
    """(B, length) values at `padded_slots`, exact (ids of any size), `fill` where not valid."""
    if values.numel() == 0:
        return torch.full(valid.shape, fill, dtype=torch.long, device=values.device)
    return torch.where(valid, values[slots], fill)


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
        first, rest = typing.cast(nn.Linear, self.unit[0]), self.unit[1:]
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


def _self_attention(qkv: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention of (R, L, 3E) packed queries/keys/values over the keys that
    `mask` (R, L) marks real (every row needs one): (R * L, E), two batched matmuls (cheaper on
    the CPU than the fused kernel at these sizes)."""
    rows, length, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.view(rows, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5  # (R, H, L, L)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(rows * length, dim)


class LengthBuckets:
    """Rows grouped by length so each group is padded only to its own longest row: rows up to
    a quarter of `length`, up to half, the rest. Self-attention costs rows x L^2, and most
    short sequences are far shorter than their cap (the demo's: 11 of 30 on average), so the
    groups do about half the work of one padded batch.

    `gather` is an index into the jagged values giving the groups' padded slots one after
    another (a slot past its row's length reads row 0 and is masked); `scatter` gives each
    jagged value its slot in that layout, and the position after the last slot (a zero row)
    for a behaviour past `length`. The group sizes are read on the host: on an accelerator
    that is a sync per step, which the one padded batch avoids."""

    def __init__(self, offsets: torch.Tensor, length: int) -> None:
        device, offsets = offsets.device, offsets.long()
        full = offsets.diff()
        lengths = full.clamp(max=length)
        order = torch.argsort(lengths, stable=True)
        by_length = lengths[order]
        cuts = torch.tensor(sorted({max(length // 4, 1), max(length // 2, 1), length}),
                            device=device)
        ends = torch.searchsorted(by_length, cuts, right=True)
        tops = by_length[(ends - 1).clamp(min=0)] if len(order) else ends  # no rows: no group
        self.masks: list[torch.Tensor] = []  # per group: (rows, padded length) real entries
        starts, gathers, slot, first = [], [], 0, 0
        for end, top in zip(ends.tolist(), tops.tolist(), strict=True):
            if end == first:
                continue
            rows, padded = order[first:end], max(top, 1)
            positions = torch.arange(padded, device=device)
            mask = positions.unsqueeze(0) < by_length[first:end].unsqueeze(1)
            self.masks.append(mask)
            starts.append(slot + torch.arange(end - first, device=device) * padded)
            gathers.append(torch.where(mask, offsets[rows].unsqueeze(1) + positions, 0).flatten())
            slot, first = slot + (end - first) * padded, end
        self.gather = torch.cat(gathers) if gathers else offsets.new_zeros(0)
        row_start = torch.zeros_like(full)
        if starts:
            row_start.index_copy_(0, order, torch.cat(starts))
        row_of = torch.repeat_interleave(torch.arange(len(full), device=device), full,
                                         output_size=int(offsets[-1]))
        position = torch.arange(len(row_of), device=device) - offsets[row_of]
        self.scatter = torch.where(position < length, row_start[row_of] + position, slot)

    def self_attention(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """`_self_attention` of jagged (N, 3E) packed projections, group by group: (N, E)."""
        if len(qkv) == 0:  # no behaviours at all: nothing to attend to
            return qkv[:, :qkv.shape[1] // 3]
        # split, not slices: a slice's backward fills a zero tensor of the whole input
        groups = qkv.index_select(0, self.gather).split([m.numel() for m in self.masks])
        out = [_self_attention(group.view(*mask.shape, -1), _attendable(mask)[0], heads)
               for group, mask in zip(groups, self.masks, strict=True)]
        out.append(qkv.new_zeros(1, qkv.shape[1] // 3))
        # index_select, not advanced indexing: its backward is an index_add
        return torch.cat(out).index_select(0, self.scatter)


class SequenceEncoder(nn.Module):
    """One Transformer encoder layer over the short behaviour sequence (post-norm, ReLU, no
    dropout): nn.TransformerEncoderLayer's parameters and function, computed where it matters.
    Only the attention needs a padded layout; the projections, feed-forward and norms run on
    the real behaviours alone (most of a short sequence's positions are padding). On the CPU
    the attention pads rows in groups of similar length (`LengthBuckets`); elsewhere in one
    padded batch, which needs no host sync. tests/test_modules.py checks both against the
    layer, gradients included."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor, length: int,
                by_length: bool | None = None,
                groups: LengthBuckets | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, D): each row's behaviours, newest first, rows split at `offsets`. Returns
        the (B, length, D) encoded behaviours (zero at padding; a row's behaviours past
        `length` are left out) and the (B, length) mask of real ones. `by_length`: attend in
        length groups (default: on the CPU); `groups`: those groups, made already."""
        layer, attn = self.layer, self.layer.self_attn
        mask = torch.arange(length, device=tokens.device).unsqueeze(0) < \
            offsets.diff().unsqueeze(1)
        qkv = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias)
        if groups is None and (tokens.device.type == "cpu" if by_length is None else by_length):
            groups = LengthBuckets(offsets, length)
        if groups is not None:
            mixed = groups.self_attention(qkv, attn.num_heads)
        else:
            padded = torch.ops.fbgemm.jagged_to_padded_dense(qkv, [offsets], [length], 0.0)
            mixed = _self_attention(padded, _attendable(mask)[0], attn.num_heads)
            mixed = torch.ops.fbgemm.dense_to_jagged(mixed.view(len(mask), length, -1),
                                                     [offsets])[0]  # back to (N, D)
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
    CHUNK_BITS = 16  # a chunk's value, a sum of distinct powers of two below 2^16, is exact in fp32
    ROWS_PER_PASS = 32_768  # the sides of a pass: 8 MB at 62 bits
    planes: torch.Tensor  # buffers
    chunk_weights: torch.Tensor

    def __init__(self, dim: int, bits: int, seed: int = 0) -> None:
        super().__init__()
        if not 0 < bits <= self.MAX_BITS:
            raise ValueError(f"SimHash bits must be in [1, {self.MAX_BITS}], got {bits}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, bits, generator=g))
        # bit j weighs 2^(j mod 16) in chunk j // 16; chunk c is shifted 16c bits into place
        bit = torch.arange(bits)
        weights = torch.zeros(bits, -(-bits // self.CHUNK_BITS))
        weights[bit, bit // self.CHUNK_BITS] = 2.0 ** (bit % self.CHUNK_BITS).float()
        self.register_buffer("chunk_weights", weights, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of (N, dim) embeddings: (N,) int64. On the CPU above `ROWS_PER_PASS` * 2 rows
        (a long sequence at a large batch: 381,006 behaviours at 4,096 rows in the demo), in
        passes of `ROWS_PER_PASS` rows: the (N, bits) sides of one pass would be a 49 MB
        temporary there, which glibc's malloc maps afresh at every call (it serves blocks over
        32 MB by mmap) and the CPU page-faults in, three times the passes' time (a GPU's
        caching allocator keeps its blocks: one pass). Rows are independent: the codes are the
        same to the bit (tests/test_modules.py)."""
        if x.device.type == "cpu" and len(x) > 2 * self.ROWS_PER_PASS:
            return torch.cat([self.signature(part) for part in x.split(self.ROWS_PER_PASS)])
        return self.signature(x)

    def signature(self, x: torch.Tensor) -> torch.Tensor:
        """One pass: the sides as 0/1 floats (an in-place `gt_`: writing a bool tensor costs
        several times as much on the CPU), summed into 16-bit chunks by one matmul, then
        shifted into place."""
        sides = (x @ self.planes).gt_(0).float()
        chunks = (sides @ self.chunk_weights).long()
        code = chunks[:, 0]
        for c in range(1, chunks.shape[1]):  # or'ed, not summed: a sum over 2-4 is slower
            code = code | (chunks[:, c] << c * self.CHUNK_BITS)
        return code


def _popcount32(x: torch.Tensor) -> torch.Tensor:
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of non-negative int64 values below 2^62 (SWAR, on each 32-bit half)."""
    return _popcount32(x & 0xFFFFFFFF) + _popcount32(x >> 32)


def simhash_distance(codes: torch.Tensor, target_codes: torch.Tensor, slots: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """(B, length) Hamming distances between each behaviour's SimHash code (`codes`, one per
    jagged value, laid out by `padded_slots`) and its row's target code; -1 at padding."""
    padded = take_padded(codes, slots, valid, 0)
    return torch.where(valid, popcount(padded ^ target_codes.unsqueeze(1)), -1)


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
