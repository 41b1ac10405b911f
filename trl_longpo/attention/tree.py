"""Tree attention: several sequences that share a prefix, packed once, attended as a sum of rectangular blocks.

Why: a LongPO pair is one long prompt and two short answers. Packed as ONE sequence `[trunk][branch 0][branch 1]`
(see `trl_longpo.packing`), the trunk is embedded, attended and stored once; each branch must see the trunk and its
own earlier tokens, never another branch. That mask is not causal, but it is a union of a few blocks that ordinary
kernels compute: a causal square (`[trunk][branch 0]` is just a causal sequence; every later branch attends itself
causally) and a full rectangle (a later branch's queries against the trunk's keys). The blocks of one query range are
merged with their log-sum-exps (exact: softmax over a union of key sets), and every block's backward is given the
MERGED out/lse, which makes the sum of the blocks' gradients the gradient of the merged attention (the contract ring
attention relies on as well). Only causal squares (Sq == Sk) and full rectangles are used, so no kernel's alignment
convention for causal Sq != Sk matters.

Backends (chosen per call by `select_backend`):
  - "cpu": PyTorch's CPU flash kernel `aten._scaled_dot_product_flash_attention_for_cpu` (returns out + lse; its
    backward takes the given out/lse; GQA native; fp64/fp32/bf16; skips masked blocks);
  - "flash": flash-attn's `_flash_attn_forward/_backward` (CUDA; bf16/fp16), chosen automatically for CUDA tensors when
    flash-attn imports. On CPU the same code runs on trl_longpo's flash-attn stand-in (tests).
The dense boolean mask (`tree_mask`) is the reference in tests only; training never builds an L x L mask.

`TreeAttentionPlan` implements `trl_longpo.attention.interface.AttentionPlan`: a model switched to the
"tree_attention" implementation (`trl_longpo.attention.patching`) and given `attention_state=AttentionState(plan=...)`
runs tree attention; under sequence parallelism the plan also all-gathers K/V over the SP group
(`trl_longpo.sequence_parallel.tree`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Tree:
    """One packed tree: `trunk` shared tokens, then each branch's tokens. A tree without branches is a plain causal
    segment (padding under SP)."""

    trunk: int
    branches: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.trunk + sum(self.branches)


@dataclass(frozen=True)
class Block:
    """Queries [q_start, q_start + q_len) attend keys [k_start, k_start + k_len): all of them, or causally (a square
    block on the diagonal, q_len == k_len). Coordinates are rows of the q and k tensors the plan is applied to."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)

    @property
    def k(self) -> slice:
        return slice(self.k_start, self.k_start + self.k_len)


def tree_blocks(trees: Sequence[Tree]) -> list[Block]:
    """Global blocks of packed trees: `[trunk][branch 0]` causal; each later branch causal on itself and full on the
    trunk."""
    blocks, offset = [], 0
    for tree in trees:
        head = tree.trunk + (tree.branches[0] if tree.branches else 0)
        if head:
            blocks.append(Block(offset, head, offset, head, causal=True))
        start = offset + head
        for length in tree.branches[1:]:
            if length:
                blocks.append(Block(start, length, start, length, causal=True))
                if tree.trunk:
                    blocks.append(Block(start, length, offset, tree.trunk, causal=False))
            start += length
        offset += tree.length
    return blocks


def tree_mask(trees: Sequence[Tree]) -> torch.Tensor:
    """Dense (N, N) boolean mask of packed trees (True = key visible). Test reference only."""
    total = sum(t.length for t in trees)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for b in tree_blocks(trees):
        part = torch.ones(b.q_len, b.k_len, dtype=torch.bool)
        mask[b.q, b.k] = part.tril() if b.causal else part
    return mask


# ------------------------------------------------------------------------------------------------------- backends
# Both take q (S, H, D), k/v (S_k, H_k, D) and return out (S, H, D) and lse (H, S); backward returns dq, dk, dv.


def _cpu_forward(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), 0.0, causal, scale=scale
    )
    return out[0].transpose(0, 1), lse[0]


def _cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(x.transpose(0, 1).unsqueeze(0) for x in (dout, q, k, v, out)), lse.unsqueeze(0), 0.0, causal, scale=scale
    )
    return tuple(g[0].transpose(0, 1) for g in grads)


def _flash_interface():
    import importlib

    return importlib.import_module("flash_attn.flash_attn_interface")


def _flash_forward(q, k, v, causal: bool, scale: float, interface=None):
    fa = interface or _flash_interface()
    out, lse, *_ = fa._flash_attn_forward(q[None], k[None], v[None], 0.0, scale, causal, -1, -1, 0.0, None, False)
    return out[0], lse[0]


def _flash_backward(dout, q, k, v, out, lse, causal: bool, scale: float, interface=None):
    fa = interface or _flash_interface()
    dq, dk, dv = torch.empty_like(q[None]), torch.empty_like(k[None]), torch.empty_like(v[None])
    fa._flash_attn_backward(
        dout[None].contiguous(), q[None], k[None], v[None], out[None], lse[None].contiguous(), dq, dk, dv,
        0.0, scale, causal, -1, -1, 0.0, None, False, None,
    )  # fmt: skip
    return dq[0], dk[0], dv[0]


@dataclass(frozen=True)
class TreeBackend:
    name: str
    forward: Callable
    backward: Callable


def _stand_in_backend() -> TreeBackend:
    """flash-attn's calling convention on trl_longpo's CPU stand-in (tests of the GPU code path without a GPU)."""
    from trl_longpo.attention import flash_attn_cpu

    return TreeBackend(
        "flash_stand_in",
        functools.partial(_flash_forward, interface=flash_attn_cpu),
        functools.partial(_flash_backward, interface=flash_attn_cpu),
    )


BACKENDS: dict[str, Callable[[], TreeBackend]] = {
    "cpu": lambda: TreeBackend("cpu", _cpu_forward, _cpu_backward),
    "flash": lambda: TreeBackend("flash", _flash_forward, _flash_backward),
    "flash_stand_in": _stand_in_backend,
}


@functools.cache
def _real_flash_attn_available() -> bool:
    from trl_longpo.attention.kernels import flash_attn_backend

    if flash_attn_backend() == "cpu_stand_in":
        return False
    try:
        _flash_interface()
    except (ImportError, OSError):
        return False
    return True


def select_backend(device: torch.device) -> str:
    """ "flash" for CUDA tensors when flash-attn imports, "cpu" for CPU tensors; anything else is refused."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and _real_flash_attn_available():
        return "flash"
    raise RuntimeError(
        f"tree attention (share_prompt=True) on {device.type} needs flash-attn (pip install flash-attn) on CUDA; "
        "on CPU it uses PyTorch's CPU flash kernel. Set share_prompt=False to run the unshared path instead."
    )


# ----------------------------------------------------------------------------------------------- block attention


def _blocks_by_owner(blocks: Sequence[Block], per_rank: int) -> dict[int, list[Block]]:
    """Blocks keyed by the rank that owns their keys (rank-major key rows, `per_rank` each), key rows made local to
    that rank's shard. A block whose keys span several ranks is split (exact: blocks are merged by log-sum-exp)."""
    owned: dict[int, list[Block]] = {}
    for b in blocks:
        start, stop = b.k_start, b.k_start + b.k_len
        if b.causal and start // per_rank != (stop - 1) // per_rank:
            raise ValueError(f"causal block {b} crosses a shard boundary ({per_rank} keys per rank)")
        while start < stop:
            owner = start // per_rank
            end = min(stop, (owner + 1) * per_rank)
            owned.setdefault(owner, []).append(
                Block(b.q_start, b.q_len, start - owner * per_rank, end - start, b.causal)
            )
            start = end
    return owned


def _key_shards(k: torch.Tensor, v: torch.Tensor, blocks: Sequence[Block], group):
    """(owner, its K, its V, the blocks on its keys) one owner at a time: without `group`, the local K/V and all
    blocks; with it, each SP rank's K/V in turn, broadcast from that rank (one shard's K/V in memory at a time)."""
    if group is None:
        yield None, k, v, blocks
        return
    owned = _blocks_by_owner(blocks, k.shape[0])
    me = dist.get_rank(group)
    for owner in range(dist.get_world_size(group)):
        kv = torch.stack([k, v]) if owner == me else k.new_empty((2, *k.shape))
        dist.broadcast(kv, group=group, group_src=owner)
        yield owner, kv[0], kv[1], owned.get(owner, [])


class _BlockAttention(torch.autograd.Function):
    """Exact attention over a union of blocks. With `group`, k/v are this rank's shard: every rank's K/V arrive one
    shard at a time (broadcast from its owner) in forward and again in backward (only the local shard is saved), and
    each shard's fp32 dK/dV is reduced to its owner before the next shard: no rank holds K/V or dK/dV for the whole
    group's tokens (per rank: one shard's bf16 K/V and fp32 dK/dV, 12 B per kv value). Same bytes on the wire as an
    all-gather + reduce-scatter."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, scale, backend, group):
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(q.shape[:-1] + v.shape[-1:], dtype=acc)
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc)
        for _, k_o, v_o, owned in _key_shards(k, v, blocks, group):
            for b in owned:
                o_b, l_b = backend.forward(q[b.q], k_o[b.k], v_o[b.k], b.causal, scale)
                o_b, l_b = o_b.to(acc), l_b.to(acc)
                old = lse[:, b.q]
                new = torch.logaddexp(old, l_b)  # the first block of a row: old = -inf, new = l_b, out = o_b exactly
                out[b.q] = out[b.q] * (old - new).exp().T.unsqueeze(-1) + o_b * (l_b - new).exp().T.unsqueeze(-1)
                lse[:, b.q] = new
        out = out.to(q.dtype)
        lse = lse.float() if acc == torch.float32 else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.scale, ctx.backend, ctx.group = blocks, scale, backend, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=acc)
        dk = dv = None
        for owner, k_o, v_o, owned in _key_shards(k, v, ctx.blocks, group):
            dkv = torch.zeros((2, *k_o.shape), dtype=acc, device=k_o.device)
            for b in owned:
                gq, gk, gv = ctx.backend.backward(
                    dout[b.q], q[b.q], k_o[b.k], v_o[b.k], out[b.q], lse[:, b.q], b.causal, ctx.scale
                )
                dq[b.q] += gq
                dkv[0, b.k] += gk
                dkv[1, b.k] += gv
            if owner is not None:
                dist.reduce(dkv, group=group, group_dst=owner, op=dist.ReduceOp.SUM)
            if owner is None or owner == dist.get_rank(group):
                dk, dv = dkv[0], dkv[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: Sequence[Block],
    *,
    scale: float | None = None,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Attention of q (T, H, D) over k/v (T_k, H_k, D) restricted to `blocks` (every query must be in one)."""
    name = backend or select_backend(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockAttention.apply(q, k, v, tuple(blocks), scale, BACKENDS[name](), group)


@dataclass(frozen=True)
class TreeAttentionPlan:
    """An `AttentionPlan` for packed trees: `blocks` in (local query row, key row) coordinates. With `gather_group` set
    (sequence parallelism) key rows index the rank-major all-gather of every rank's local tokens."""

    blocks: tuple[Block, ...]
    num_local_tokens: int
    gather_group: dist.ProcessGroup | None = None
    backend: str | None = None  # None: `select_backend` for the tensors' device
    impl: str = field(default="tree", init=False)

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        if (self.backend or select_backend(device)) == "flash" and dtype == torch.float32:
            return torch.bfloat16  # flash-attn has no fp32 kernels
        return dtype

    def attend(self, q, k, v, *, softmax_scale, group=None, heads_k_stride=1):
        return block_attention(
            q, k, v, self.blocks, scale=softmax_scale, backend=self.backend, group=self.gather_group
        )


def plan_for_trees(trees: Sequence[Tree], backend: str | None = None) -> TreeAttentionPlan:
    """The unsplit plan of packed trees (one device)."""
    return TreeAttentionPlan(tuple(tree_blocks(trees)), sum(t.length for t in trees), backend=backend)
