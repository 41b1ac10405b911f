"""Pack a batch of rows into one padding-free sequence and cut this rank's shard in the ring layout.

Why pack: ring attention's varlen kernels take one flat sequence of causal segments (cu_seqlens). Packing the
batch's rows back to back drops the pad tokens of a padded batch (no compute spent on them) and lets one plan describe
the whole batch; each input row becomes one segment.

What is guaranteed, and why it matters for parity with the unsplit model:
  - labels are shifted on each FULL row before sharding (token t predicts label t+1): a shard boundary never loses or
    duplicates a target, so per-rank partial sums add up to the unsplit row sums;
  - position_ids are the TRUE positions in the row (what the unsplit model would use for RoPE), carried into the
    shard; positions local to the shard would silently change every rotary embedding;
  - padding added for divisibility gets label -100 and row index -1, and sits at the END of a segment, so causal
    attention never lets a real token see it: it changes neither loss nor metrics nor any real token's activations.
Layouts (W = sp size):
  - zigzag: every segment is padded to a multiple of 2W and cut in 2W equal chunks; rank r holds chunks r and
    2W-1-r of every segment (balances causal work; required by zigzag_ring_flash_attn_varlen).
  - llama3: the packed row is padded at its end to a multiple of 2W (W would do; 2W keeps one rule for both) and cut
    in W contiguous pieces; the padding is its own trailing segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trl_longpo.attention.interface import AttentionPlan
from trl_longpo.attention.ring import check_ring_attn_impl, make_varlen_plan
from trl_longpo.packing import IGNORE_INDEX
from trl_longpo.rounding import round_up


@dataclass(frozen=True)
class PackedShard:
    """This rank's share of a packed batch, flat (no batch dimension): model inputs, shifted targets, bookkeeping."""

    input_ids: torch.Tensor  # (T_local,)
    position_ids: torch.Tensor  # (T_local,), true positions within each row
    targets: torch.Tensor  # (T_local,), ALREADY shifted: the token predicted at each position; -100 = none
    row_index: torch.Tensor  # (T_local,), input row of each token, -1 for padding
    masks: torch.Tensor  # (K, T_local) bool: the given token masks, shifted like the targets (padding: False)
    num_rows: int
    global_cu_seqlens: torch.Tensor  # boundaries of the packed, padded (unsharded) segments
    plan: AttentionPlan  # kernel arguments for ring attention on this rank


def _real_span(mask_row: torch.Tensor) -> tuple[int, int]:
    idx = torch.nonzero(mask_row, as_tuple=False).flatten()
    if idx.numel() == 0:
        return 0, 0
    start, stop = int(idx[0]), int(idx[-1]) + 1
    if stop - start != idx.numel():
        raise ValueError("attention_mask must mark one contiguous block of tokens per row (left or right padding)")
    return start, stop


def local_ranges(
    segment_lengths: list[int], sp_rank: int, sp_size: int, impl: str, ulysses: int = 1
) -> list[tuple[int, int]]:
    """[start, stop) ranges of the packed, padded sequence held by `sp_rank`, in its local order (segment lengths
    already padded for `impl`: multiples of 2 x sp for zigzag, a total multiple of 2 x sp for llama3).

    With a Ulysses degree u > 1 (sp = u x ring degree r), SP rank s = ring_rank x u + j: ring rank s // u takes its
    ring shard (the layout below with r ranks) and Ulysses rank j the j-th contiguous 1/u of it, so the Ulysses
    all-to-all (rank-major) rebuilds the ring shard in its local order (`trl_longpo.sequence_parallel.ulysses`)."""
    check_ring_attn_impl(impl)
    if ulysses > 1:
        ranges = local_ranges(segment_lengths, sp_rank // ulysses, sp_size // ulysses, impl)
        per_rank = sum(b - a for a, b in ranges) // ulysses
        start = (sp_rank % ulysses) * per_rank
        stop, pos, out = start + per_rank, 0, []
        for a, b in ranges:
            lo, hi = max(start, pos), min(stop, pos + b - a)
            if lo < hi:
                out.append((a + lo - pos, a + hi - pos))
            pos += b - a
        return out
    if impl == "llama3":
        per_rank = sum(segment_lengths) // sp_size
        return [(sp_rank * per_rank, (sp_rank + 1) * per_rank)]
    ranges, start = [], 0
    for length in segment_lengths:
        chunk = length // (2 * sp_size)
        for c in (sp_rank, 2 * sp_size - 1 - sp_rank):
            ranges.append((start + c * chunk, start + (c + 1) * chunk))
        start += length
    return ranges


def shard_local_indices(
    segment_lengths: list[int], sp_rank: int, sp_size: int, impl: str, ulysses: int = 1
) -> torch.Tensor:
    """Indices into the packed, padded sequence held by `sp_rank` (segment lengths already padded for `impl`)."""
    pieces = [torch.arange(a, b) for a, b in local_ranges(segment_lengths, sp_rank, sp_size, impl, ulysses)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def shard_rows(
    input_ids: torch.Tensor,
    masks: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    sp_rank: int,
    sp_size: int,
    impl: str,
    pad_token_id: int = 0,
    max_length: int | None = None,
    ulysses: int = 1,
) -> PackedShard:
    """Pack `input_ids` (B, L) rows into one sequence, pad it for `impl`, and return `sp_rank`'s shard.

    `masks` are (B, L) token masks in the Hugging Face convention (aligned with `input_ids`, NOT shifted: mask[b, t]
    scores token t, predicted at t-1); `masks[0]` decides which positions get a target and must cover the others.
    `attention_mask` (B, L) marks each row's real tokens (one contiguous block; left or right padding).
    `position_ids` (B, L) default to 0..n-1 over each row's real tokens. `max_length` bounds the padded packed length
    (a clear error instead of an out-of-memory deep inside the ring). `ulysses`: the Ulysses degree (`local_ranges`).
    """
    check_ring_attn_impl(impl)
    if input_ids.dim() != 2 or not masks or any(m.shape != input_ids.shape for m in masks):
        raise ValueError(
            f"input_ids and every token mask must be (batch, length); got {tuple(input_ids.shape)} and "
            f"{[tuple(m.shape) for m in masks]}"
        )
    num_rows = input_ids.shape[0]
    device = input_ids.device
    stacked = torch.stack([m.bool() for m in masks])
    labels = input_ids.masked_fill(~stacked[0], IGNORE_INDEX)
    ids, tgts, pos, rows, msk, lengths = [], [], [], [], [], []
    pad_unit = 2 * sp_size
    for b in range(num_rows):
        start, stop = _real_span(attention_mask[b]) if attention_mask is not None else (0, input_ids.shape[1])
        n = stop - start
        if n == 0:
            continue
        row_ids = input_ids[b, start:stop]
        shifted = torch.full_like(labels[b, start:stop], IGNORE_INDEX)
        shifted[:-1] = labels[b, start + 1 : stop]
        row_pos = position_ids[b, start:stop] if position_ids is not None else torch.arange(n, device=device)
        pad = round_up(n, pad_unit) - n if impl == "zigzag" else 0
        ids.append(torch.cat([row_ids, row_ids.new_full((pad,), pad_token_id)]))
        tgts.append(torch.cat([shifted, shifted.new_full((pad,), IGNORE_INDEX)]))
        row_masks = stacked.new_zeros((stacked.size(0), n + pad))
        row_masks[:, : n - 1] = stacked[:, b, start + 1 : stop]
        msk.append(row_masks)
        # Padding continues the row's positions (any value works: nothing real attends to it).
        pos.append(torch.cat([row_pos, row_pos[-1] + 1 + torch.arange(pad, device=device, dtype=row_pos.dtype)]))
        rows.append(torch.full((n + pad,), b, dtype=torch.long, device=device))
        rows[-1][n:] = -1
        lengths.append(n + pad)
    total = sum(lengths)
    tail = round_up(max(total, 1), pad_unit) - total  # llama3: trailing padding segment (zigzag: already aligned)
    if tail:
        ids.append(input_ids.new_full((tail,), pad_token_id))
        tgts.append(labels.new_full((tail,), IGNORE_INDEX))
        pos.append(torch.arange(tail, device=device, dtype=pos[0].dtype if pos else torch.long))
        rows.append(torch.full((tail,), -1, dtype=torch.long, device=device))
        msk.append(stacked.new_zeros((stacked.size(0), tail)))
        lengths.append(tail)
        total += tail
    if max_length is not None and total > max_length:
        raise ValueError(
            f"packed batch has {total} tokens (after padding to multiples of 2*sp={pad_unit}), more than the "
            f"configured maximum {max_length}"
        )
    global_cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    local = shard_local_indices(lengths, sp_rank, sp_size, impl, ulysses).to(device)
    packed_pos = torch.cat(pos)
    return PackedShard(
        input_ids=torch.cat(ids)[local],
        position_ids=packed_pos[local],
        targets=torch.cat(tgts)[local],
        row_index=torch.cat(rows)[local],
        masks=torch.cat(msk, dim=1)[:, local],
        num_rows=num_rows,
        global_cu_seqlens=global_cu,
        # Under Ulysses the plan is the ring's (or, with no ring, the whole sequence's) for the u x n tokens the
        # all-to-all delivers; the caller wraps it (`SequenceParallelContext.shard_rows`).
        plan=make_varlen_plan(impl, global_cu.to(device), sp_rank // ulysses, sp_size // ulysses),
    )
