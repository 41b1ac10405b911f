"""Pack sequences that share a prompt into one tree per group: the prompt is computed once (`share_prompt=True`).

A LongPO pair is `prompt + chosen` and `prompt + rejected`. Packed as one sequence (P = prompt length):

    tokens     p0 p1 … p(P-2) | p(P-1) c0 c1 … | p(P-1) r0 r1 …
    positions  0  1  … P-2    | P-1    P  P+1  | P-1    P  P+1        (rejected continues from the prompt end)
    sees       trunk, causal  | trunk + itself | trunk + itself (never the chosen branch)

The fork: the last prompt token predicts the first token of BOTH answers, and one position has one label. So the last
prompt token starts each branch (a copy in every branch after the first: one extra token per pair): the trunk is
`prompt[:-1]`, and each branch's own copy of `p(P-1)`, with the same position and the same visible context, has
exactly the hidden states of the unshared sequence and carries that branch's first-answer label. Every position of
the packed sequence therefore has exactly one label (labels are pre-shifted: `targets[t]` is the token predicted at
t), and every unshared (row, position) pair maps to one packed position with the same context: log-probs, entropy,
top-1 and NLL sums are those of the unshared path. Trunk positions belong to the group's first row (LongPO: the
chosen row, whose sequence-scope NLL covers the prompt); a mask of another row on the shared prompt cannot be
represented and is refused.

Multi-turn rows (paper Eq. 13) need nothing special: each branch is the whole rest of its conversation (answer 1,
follow-up instructions, answer 2, …). The reference shares its short prompt the same way, per turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trl_longpo.attention.tree import Tree

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedTrees:
    """Groups of rows packed as trees, as flat (N,) tensors (no batch dimension)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor  # true positions of each token in its unshared row
    targets: torch.Tensor  # pre-shifted: the token predicted at each position; -100 at each branch's last token
    row_index: torch.Tensor  # unshared row each position's prediction belongs to
    masks: torch.Tensor  # (K, N) bool: the K given token masks, moved to the predicting positions
    trees: tuple[Tree, ...]
    num_rows: int


def pair_groups(prompt_lengths: Sequence[int]) -> list[tuple[tuple[int, int], int]]:
    """DPO layout (B chosen rows, then B rejected rows): row b and row B + b share `prompt_lengths[b]` tokens."""
    batch = len(prompt_lengths)
    return [((b, batch + b), int(n)) for b, n in enumerate(prompt_lengths)]


def pack_shared_prompts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    masks: Sequence[torch.Tensor],
    groups: Sequence[tuple[Sequence[int], int]],
) -> PackedTrees:
    """Pack right-padded rows `input_ids` (R, L) into trees, one per group `(rows, shared_length)`.

    `masks` are (R, L) token masks in the Hugging Face convention (mask[r, t]: score token t, predicted at t-1). Every
    row must be in exactly one group and start with the group's `shared_length` tokens (checked).
    """
    num_rows = input_ids.size(0)
    lengths = attention_mask.sum(dim=1).tolist()
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions < attention_mask.sum(dim=1, keepdim=True)):
        raise ValueError("pack_shared_prompts needs right-padded rows (attention_mask: ones, then zeros)")
    seen = sorted(r for rows, _ in groups for r in rows)
    if seen != list(range(num_rows)):
        raise ValueError(f"every row must be in exactly one group; groups cover rows {seen} of {num_rows}")
    stacked = torch.stack([m.bool() for m in masks]) if len(masks) else torch.zeros((0, *input_ids.shape), dtype=torch.bool)
    stacked = stacked.to(input_ids.device)
    device = input_ids.device
    ids, pos, tgt, rows, msk, trees = [], [], [], [], [], []
    for members, shared in groups:
        owner = members[0]
        if shared < 1 or any(lengths[r] < shared for r in members):
            raise ValueError(
                f"rows {list(members)}: shared length {shared} must be in 1..{min(lengths[r] for r in members)}"
            )
        prefix = input_ids[owner, :shared]
        for r in members[1:]:
            if not torch.equal(input_ids[r, :shared], prefix):
                raise ValueError(f"rows {owner} and {r} do not start with the same {shared} prompt tokens")
            if bool(stacked[:, r, 1:shared].any()):
                raise ValueError(
                    f"row {r} has a scored token inside the prompt it shares with row {owner}; only the group's first "
                    "row can score shared tokens"
                )
        trunk = shared - 1
        ids.append(prefix[:trunk])
        pos.append(torch.arange(trunk, device=device))
        tgt.append(input_ids[owner, 1:shared])
        rows.append(torch.full((trunk,), owner, device=device))
        msk.append(stacked[:, owner, 1:shared])
        branches = []
        for r in members:
            n = lengths[r]
            ids.append(input_ids[r, trunk:n])
            pos.append(torch.arange(trunk, n, device=device))
            tgt.append(torch.cat([input_ids[r, shared:n], input_ids.new_full((1,), IGNORE_INDEX)]))
            rows.append(torch.full((n - trunk,), r, device=device))
            msk.append(torch.cat([stacked[:, r, shared:n], stacked.new_zeros((stacked.size(0), 1))], dim=1))
            branches.append(n - trunk)
        trees.append(Tree(trunk, tuple(branches)))
    return PackedTrees(
        input_ids=torch.cat(ids),
        position_ids=torch.cat(pos),
        targets=torch.cat(tgt),
        row_index=torch.cat(rows),
        masks=torch.cat(msk, dim=1),
        trees=tuple(trees),
        num_rows=num_rows,
    )
