"""Ring attention plans: packed rows of causal segments split over an SP group, run by ring-flash-attn's kernels.

Each plan implements `trl_longpo.attention.interface.AttentionPlan` for one batch on one rank: `make_varlen_plan`
builds it from the GLOBAL segment boundaries (`trl_longpo.sequence_parallel.sharding` cuts the matching shard).
`ZigzagVarlenPlan` and `Llama3VarlenPlan` call ring-flash-attn; `LocalVarlenPlan` is an SP group of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from trl_longpo.attention.kernels import load_ring_flash_attn

RingAttnImpl = Literal["zigzag", "llama3"]
RING_ATTN_IMPLS: tuple[str, ...] = ("zigzag", "llama3")
DEFAULT_RING_ATTN_IMPL: RingAttnImpl = "zigzag"
"""Default ring implementation: zigzag.

zigzag gives every rank an equal share of the causal work (rank r holds chunks r and 2W-1-r of each sequence) and
overlaps P2P K/V exchange with compute: ~90% of ideal scaling in ring-flash-attn's 8xH800 benchmark, against ~58%
for llama3, which all-gathers K/V (memory grows with W) and leaves the causal work unbalanced across ranks. LongPO
trains on few, very long sequences, where that throughput gap dominates. llama3 is the choice when precision matters
more (it computes each query's softmax in one kernel call instead of merging W partial results, and it is the only
one correct in fp32 on ring-flash-attn 0.1.8) or when rows pack many short segments (no per-segment padding to 2W).
"""


def _ring_compute_dtype(dtype: torch.dtype, needs_half_precision: bool) -> torch.dtype:
    """bf16/fp16 stay; fp32 becomes bf16 where it must (real flash-attn has no fp32 kernels; ring-flash-attn 0.1.8's
    zigzag backward is wrong in fp32) and stays fp32 otherwise on the CPU stand-in; fp64 (tests) stays fp64."""
    real_flash_attn = load_ring_flash_attn().backend == "flash_attn"
    if dtype == torch.float32 and (real_flash_attn or needs_half_precision):
        dtype = torch.bfloat16
    if real_flash_attn and dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"flash-attn kernels support only bf16/fp16, not {dtype}; fp64 runs need the CPU stand-in")
    return dtype


@dataclass(frozen=True)
class ZigzagVarlenPlan:
    """zigzag_ring_flash_attn_varlen: each segment is split in 2W chunks, rank r holds chunks r and 2W-1-r.

    `cu_seqlens` are the LOCAL boundaries (every global segment length divided by W, so each is even).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_local_tokens: int  # a plain int, so the per-layer shape check needs no device sync
    impl: str = field(default="zigzag", init=False)

    def compute_dtype(self, dtype, device):
        return _ring_compute_dtype(dtype, needs_half_precision=True)  # ring-flash-attn 0.1.8 fp32 backward bug

    def attend(self, q, k, v, *, softmax_scale, group, heads_k_stride):
        kernels = load_ring_flash_attn()
        return kernels.zigzag_varlen(
            q,
            k,
            v,
            self.cu_seqlens,
            self.max_seqlen,
            dropout_p=0.0,
            softmax_scale=softmax_scale,
            causal=True,
            group=group,
        )


@dataclass(frozen=True)
class Llama3VarlenPlan:
    """llama3_flash_attn_varlen: the packed row is split contiguously; K/V are all-gathered `heads_k_stride` kv heads
    at a time (smaller stride: less memory, more collectives). Fields are `llama3_flash_attn_prepare_cu_seqlens`'s."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    local_k_slice: slice
    num_local_tokens: int
    impl: str = field(default="llama3", init=False)

    def compute_dtype(self, dtype, device):
        return _ring_compute_dtype(dtype, needs_half_precision=False)

    def attend(self, q, k, v, *, softmax_scale, group, heads_k_stride):
        kernels = load_ring_flash_attn()
        return kernels.llama3_varlen(
            q,
            k,
            v,
            self.cu_seqlens_q,
            self.cu_seqlens_k,
            self.max_seqlen_q,
            self.max_seqlen_k,
            heads_k_stride,
            self.local_k_slice,
            dropout_p=0.0,
            softmax_scale=softmax_scale,
            causal=True,
            group=group,
        )


@dataclass(frozen=True)
class LocalVarlenPlan:
    """An SP group of one: plain varlen flash attention, no ring. A ring of one is just attention, and zigzag's ring
    code would send to its own rank, which gloo refuses. Same kernel as the ring's blocks (the no-ring baseline)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_local_tokens: int
    impl: str = field(default="local", init=False)

    def compute_dtype(self, dtype, device):
        return _ring_compute_dtype(dtype, needs_half_precision=False)

    def attend(self, q, k, v, *, softmax_scale, group, heads_k_stride):
        kernels = load_ring_flash_attn()
        return kernels.local_varlen(
            q,
            k,
            v,
            self.cu_seqlens,
            self.cu_seqlens,
            self.max_seqlen,
            self.max_seqlen,
            softmax_scale=softmax_scale,
            causal=True,
        )


def make_varlen_plan(
    impl: str, global_cu_seqlens: torch.Tensor, rank: int, world_size: int
) -> ZigzagVarlenPlan | Llama3VarlenPlan | LocalVarlenPlan:
    """Plan for a packed row whose causal segments have the given GLOBAL (unsharded) boundaries, in tokens.

    zigzag needs every segment length to be a multiple of 2 * world_size; llama3 needs the total to be a multiple of
    world_size (`trl_longpo.sequence_parallel.shard_rows` pads accordingly). world_size 1 gives a `LocalVarlenPlan`.
    """
    check_ring_attn_impl(impl)
    cu = global_cu_seqlens.to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1])
    if world_size == 1:
        return LocalVarlenPlan(cu_seqlens=cu, max_seqlen=int(lengths.max()), num_local_tokens=total)
    if impl == "zigzag":
        if bool((lengths % (2 * world_size)).any()):
            raise ValueError(
                f"zigzag ring attention needs segment lengths divisible by 2*sp={2 * world_size}, got "
                f"{lengths.tolist()}"
            )
        return ZigzagVarlenPlan(
            cu_seqlens=cu // world_size,
            max_seqlen=int(lengths.max()) // world_size,
            num_local_tokens=total // world_size,
        )
    if total % world_size:
        raise ValueError(f"llama3 ring attention needs a total length divisible by sp={world_size}, got {total}")
    prepare = load_ring_flash_attn().llama3_prepare_cu_seqlens
    cu_q, cu_k, max_q, max_k, k_slice = prepare(cu, causal=True, rank=rank, world_size=world_size)
    return Llama3VarlenPlan(
        cu_seqlens_q=cu_q.to(torch.int32),
        cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=int(max_q),
        max_seqlen_k=int(max_k),
        local_k_slice=k_slice,
        num_local_tokens=total // world_size,
    )


def check_ring_attn_impl(impl: str) -> None:
    if impl not in RING_ATTN_IMPLS:
        raise ValueError(f"ring_attn_impl must be one of {RING_ATTN_IMPLS}, got {impl!r}")
