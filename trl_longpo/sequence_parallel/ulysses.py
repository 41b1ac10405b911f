"""Ulysses (all-to-all over attention heads) and the Ulysses x ring hybrid: the communication pieces.

Ulysses: each of the u ranks of a Ulysses group holds n tokens of the sequence for ALL heads. One all-to-all per
tensor trades that for ALL u x n tokens of the group for H/u heads (`seq_to_heads`), attention then runs locally on
whole sequences (any plan: varlen rows, shared-prompt trees), and a second all-to-all returns the output to the token
layout (`heads_to_seq`). Each rank sends (u-1)/u of q, k, v and out once per layer, whatever u is: a fixed volume per
token, against the ring's K/V passed around r-1 times. Hybrid (USP): sp = u x r; all-to-all inside a Ulysses group
(consecutive ranks, NVLink), ring attention across the r groups on the gathered shard with H/u heads.

Token order: `seq_to_heads` returns the group's tokens rank-major (rank 0's n tokens, then rank 1's, ...), so the
layout gives each Ulysses rank a contiguous 1/u of its ring shard (`sharding.local_ranges`).

GQA: the head count must be a multiple of u. KV heads fewer than u (or not divisible by it) are replicated first
(`expand_kv_heads`), as DeepSpeed-Ulysses and yunchang do, to the smallest count that u divides and that divides the
query heads (`planning.replicated_kv_heads`): Qwen2.5-7B's 4 KV heads become 28 at u = 7 or 14, and its 28 query
heads allow u in {1, 2, 4, 7, 14, 28}; a degree that does not divide the query heads is refused with the largest
valid one named (`planning.check_ulysses_degree`).

Written here on `torch.distributed.all_to_all_single` rather than imported: yunchang's `SeqAllToAll4D` is the same
few lines for a dense (batch, seq, heads, dim) layout, but `import yunchang` imports its whole package (its own copy
of the ring kernels, import-time flash-attn / triton / NPU probes that our CPU flash-attn stand-in would mislead), and
its attention layers take dense batches without cu_seqlens or trees. DeepSpeed's `_SeqAllToAll` /
`UlyssesSPAttentionHF` (accelerate's `sp_size`) would make DeepSpeed a hard dependency and owns the data layout,
positions and loss (plain LM loss only). What we need is only the exchange; the layout, positions and plans are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_longpo.attention.interface import AttentionPlan
from trl_longpo.sequence_parallel.planning import check_ulysses_degree, replicated_kv_heads


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    u = dist.get_world_size(group)
    n, heads, dim = x.shape
    send = x.reshape(n, u, heads // u, dim).transpose(0, 1).contiguous()  # (u, n, H/u, D): block j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's n tokens for my heads
    return recv.reshape(u * n, heads // u, dim)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    u = dist.get_world_size(group)
    total, heads, dim = x.shape
    send = x.reshape(u, total // u, heads, dim).contiguous()  # block j: rank j's tokens, my heads
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, rank j's heads
    return recv.transpose(0, 1).reshape(total // u, u * heads, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _seq_to_heads(grad.contiguous(), ctx.group), None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(n, H, D) this rank's tokens, all heads -> (u*n, H/u, D) the group's tokens (rank-major), this rank's heads
    (rank j of the group gets heads [j*H/u, (j+1)*H/u)). Differentiable (the backward is the inverse exchange)."""
    u = dist.get_world_size(group)
    if x.dim() != 3 or x.shape[1] % u:
        raise ValueError(f"seq_to_heads needs (tokens, heads, dim) with heads divisible by {u}, got {tuple(x.shape)}")
    return x if u == 1 else _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of `seq_to_heads`: (u*n, H/u, D) -> (n, H, D)."""
    u = dist.get_world_size(group)
    if x.dim() != 3 or x.shape[0] % u:
        raise ValueError(f"heads_to_seq needs (tokens, heads, dim) with tokens divisible by {u}, got {tuple(x.shape)}")
    return x if u == 1 else _HeadsToSeq.apply(x, group)


def expand_kv_heads(kv: torch.Tensor, num_heads: int, ulysses: int) -> torch.Tensor:
    """(n, Hk, D) -> (n, Hk', D): each KV head repeated Hk'/Hk times (adjacent), Hk' = `replicated_kv_heads`.

    Query head i keeps its KV head: with H/Hk' query heads per replicated KV head, i // (H/Hk') // (Hk'/Hk) equals
    i // (H/Hk). The backward sums the copies' gradients (repeat_interleave's autograd)."""
    target = replicated_kv_heads(num_heads, kv.shape[1], ulysses)
    return kv if target == kv.shape[1] else kv.repeat_interleave(target // kv.shape[1], dim=1)


def ulysses_attention(q, k, v, attend, group: dist.ProcessGroup, num_heads: int | None = None):
    """q (n, H, D), k/v (n, Hk, D) for this rank's tokens -> (n, H, D): all-to-all to (u*n tokens, H/u heads), run
    `attend(q, k, v)` on those (the whole group's tokens, rank-major, for this rank's heads), all-to-all back."""
    u = dist.get_world_size(group)
    heads = num_heads or q.shape[1]
    check_ulysses_degree(heads, k.shape[1], u)
    k, v = expand_kv_heads(k, heads, u), expand_kv_heads(v, heads, u)
    out = attend(seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group))
    return heads_to_seq(out, group)


# ------------------------------------------------------------------------------------------------ layout and plan


@dataclass(frozen=True)
class UlyssesPlan:
    """An `AttentionPlan` (`trl_longpo.attention.interface`) for Ulysses (ring_group None: `inner` covers the whole
    packed sequence) or the hybrid (`inner` is the ring plan of this rank's ring shard, run over `ring_group` with H/u
    heads).

    `inner` is any plan (varlen rows, ring, shared-prompt tree) built for the u x n tokens the all-to-all delivers."""

    inner: AttentionPlan
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup | None
    num_local_tokens: int
    impl: str = "ulysses"

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return self.inner.compute_dtype(dtype, device)

    def attend(self, q, k, v, *, softmax_scale, group=None, heads_k_stride=1):
        def local(q, k, v):
            return self.inner.attend(
                q, k, v, softmax_scale=softmax_scale, group=self.ring_group, heads_k_stride=heads_k_stride
            )

        return ulysses_attention(q, k, v, local, self.ulysses_group)


def init_ulysses_groups(
    sp_size: int, ulysses: int, dp_size: int, rank: int
) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(Ulysses group, ring group or None) of `rank`: within each SP group of `sp_size` consecutive ranks, Ulysses
    groups are `ulysses` consecutive ranks (one node's NVLink when u divides the GPUs per node) and ring groups take
    one rank of each (stride u). Collective: every rank creates every group, in the same order."""
    if ulysses < 1 or sp_size % ulysses:
        raise ValueError(f"ulysses_degree={ulysses} must divide sequence_parallel_size={sp_size}")
    ring = sp_size // ulysses
    mine_u = mine_r = None
    for dp in range(dp_size):
        base = dp * sp_size
        for r in range(ring):
            ranks = [base + r * ulysses + j for j in range(ulysses)]
            group = dist.new_group(ranks)
            mine_u = group if rank in ranks else mine_u
        for j in range(ulysses):
            ranks = [base + r * ulysses + j for r in range(ring)]
            group = dist.new_group(ranks) if ring > 1 else None
            mine_r = group if rank in ranks else mine_r
    return mine_u, mine_r
