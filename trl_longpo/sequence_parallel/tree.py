"""Tree attention (shared prompt) under sequence parallelism: each rank holds 1/sp of the packed trees.

Layout: the packed trees (`trl_longpo.packing`) are cut exactly as `shard_rows` cuts causal rows, with true positions:
  - llama3: the packed sequence is padded at its end (a trailing causal segment) and cut in sp contiguous pieces;
  - zigzag: every tree is padded to a multiple of 2·sp (the padding is a causal segment of its own, so no real token
    sees it) and cut in 2·sp chunks; rank r holds chunks r and 2·sp−1−r (balanced causal work).
Attention: every rank's K/V reach every rank of the SP group in every layer, one owner's shard at a time (broadcast;
the bytes of an all-gather), forward and again in backward (only the local shard is saved), and each shard's dK/dV is
reduced to its owner before the next (`trl_longpo.attention.tree._BlockAttention`). Each rank runs the tree's blocks
(`trl_longpo.attention.tree`) restricted to its own queries, key ranges in rank-major key rows (split per owner). This
is one schedule for both layouts: for `ring_attn_impl="zigzag"` the token layout stays zigzag (balanced work), but K/V
travel by broadcast instead of the P2P ring, because a ring step's key block would cut across branches that only some
queries may see. Documented, not silent: the log says so; memory per rank includes one shard's K/V (bf16) and dK/dV
(fp32) at a time (`heads_k_stride` does not apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_longpo.attention.tree import Block, Tree, TreeAttentionPlan, tree_blocks
from trl_longpo.packing import IGNORE_INDEX, PackedTrees
from trl_longpo.rounding import round_up
from trl_longpo.sequence_parallel.sharding import local_ranges


@dataclass(frozen=True)
class TreeShard:
    """This rank's tokens of packed trees (flat, no batch dimension) and its attention plan."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    row_index: torch.Tensor  # -1 for padding
    masks: torch.Tensor  # (K, T_local)
    num_rows: int
    plan: TreeAttentionPlan


def _key_pieces(start: int, stop: int, storage: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Split global key range [start, stop) into (gathered offset, length) pieces; adjacent pieces are merged."""
    pieces: list[tuple[int, int]] = []
    for g0, g1, offset in storage:
        a, b = max(start, g0), min(stop, g1)
        if a >= b:
            continue
        at = offset + a - g0
        if pieces and pieces[-1][0] + pieces[-1][1] == at:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + b - a)
        else:
            pieces.append((at, b - a))
    return pieces


def local_tree_blocks(
    trees: list[Tree], segment_lengths: list[int], sp_rank: int, sp_size: int, impl: str
) -> tuple[list[Block], int]:
    """The blocks of `trees` for `sp_rank`'s queries, keys indexed in the rank-major all-gather; and the local count."""
    storage, mine, offset = [], [], 0
    for rank in range(sp_size):
        for a, b in local_ranges(segment_lengths, rank, sp_size, impl):
            storage.append((a, b, offset))
            if rank == sp_rank:
                mine.append((a, b, offset))
            offset += b - a
    local_base = mine[0][2] if mine else 0
    blocks = []

    def add(q0: int, qn: int, k0: int, kn: int, causal: bool) -> None:
        blocks.append(Block(q0, qn, k0, kn, causal))

    for g in tree_blocks(trees):
        for c0, c1, off in mine:
            a, b = max(g.q_start, c0), min(g.q_start + g.q_len, c1)
            if a >= b:
                continue
            q0 = off - local_base + a - c0
            if g.causal:  # query i sees keys [g.k_start, i]: full on [k_start, a), causal square on [a, b)
                for k0, kn in _key_pieces(g.k_start, a, storage):
                    add(q0, b - a, k0, kn, causal=False)
                add(q0, b - a, off + a - c0, b - a, causal=True)
            else:
                for k0, kn in _key_pieces(g.k_start, g.k_start + g.k_len, storage):
                    add(q0, b - a, k0, kn, causal=False)
    return blocks, sum(b - a for a, b, _ in mine)


def shard_trees(
    packed: PackedTrees,
    *,
    sp_rank: int,
    sp_size: int,
    impl: str,
    group: dist.ProcessGroup | None,
    pad_token_id: int = 0,
    backend: str | None = None,
    ulysses: int = 1,
) -> TreeShard:
    """Pad `packed` for `impl`, cut `sp_rank`'s shard and build its plan (see the module docstring).

    With a Ulysses degree u > 1 the tokens are cut by `local_ranges(..., ulysses=u)` and the plan covers the ring
    shard (u x n tokens after the all-to-all; the whole trees when u = sp) with `group` the ring group (None without
    a ring); `SequenceParallelContext.shard_trees` wraps it in a `UlyssesPlan`."""
    unit = 2 * sp_size
    trees, segments, pads = [], [], []
    for tree in packed.trees:
        pad = round_up(tree.length, unit) - tree.length if impl == "zigzag" else 0
        trees.append(tree)
        if pad:
            trees.append(Tree(pad))
        segments.append(tree.length + pad)
        pads.append(pad)
    total = sum(segments)
    tail = round_up(max(total, 1), unit) - total
    if tail:
        trees.append(Tree(tail))
        segments.append(tail)

    def padded(values: torch.Tensor, fill) -> torch.Tensor:
        parts, start = [], 0
        for tree, pad in zip(packed.trees, pads):
            parts.append(values[..., start : start + tree.length])
            parts.append(values.new_full((*values.shape[:-1], pad), fill))
            start += tree.length
        parts.append(values.new_full((*values.shape[:-1], tail), fill))
        return torch.cat(parts, dim=-1)

    positions = padded(packed.position_ids, 0)  # padding sees only padding: any position works
    ranges = local_ranges(segments, sp_rank, sp_size, impl, ulysses)
    local = torch.cat([torch.arange(a, b) for a, b in ranges]).to(positions.device)
    ring = sp_size // ulysses
    blocks, num_local = local_tree_blocks(trees, segments, sp_rank // ulysses, ring, impl)
    group = group if ring > 1 else None
    return TreeShard(
        input_ids=padded(packed.input_ids, pad_token_id)[local],
        position_ids=positions[local],
        targets=padded(packed.targets, IGNORE_INDEX)[local],
        row_index=padded(packed.row_index, -1)[local],
        masks=padded(packed.masks, False)[:, local],
        num_rows=packed.num_rows,
        plan=TreeAttentionPlan(tuple(blocks), num_local, gather_group=group, backend=backend),
    )
