"""Ring attention as a transformers-5 attention function, driven by per-batch state set by the caller.

How it plugs in: `register_ring_attention()` registers `ring_attention_forward` with
`transformers.AttentionInterface` under the name "ring_attention" (a name containing "flash" would make transformers
look for a flash kernel and fail), and models select it with `attn_implementation="ring_attention"`. For a name not
registered in `AttentionMaskInterface` transformers builds no mask and passes `attention_mask=None`: sequence
boundaries come from the packing plan below, never from a mask (which would be Sq x Sk per rank anyway).

Per-batch state: the attention function is called once per layer with nothing but q/k/v, so everything that depends
on the batch and on the process layout lives in a `RingAttentionState` that the caller supplies around the forward:
  - as a keyword argument, `model(..., ring_attention=state)` (transformers 5 forwards extra model kwargs down to the
    attention function). This is the preferred way: the state is captured with the layer inputs, so it is still
    there when gradient checkpointing recomputes a layer during backward;
  - or with `with use_ring_attention_state(state): model(...)` (a context variable), for callers that cannot add
    kwargs. It does NOT survive gradient-checkpoint recomputation, which runs after the block has exited.

The seam for other layouts: the state carries a `plan`, any object implementing `RingPlan.attend(q, k, v, ...)`.
`ZigzagVarlenPlan` and `Llama3VarlenPlan` handle packed rows of independent causal segments; tree-shaped batches
(one prompt shared by two answers) use `trl_longpo.attention.tree.TreeAttentionPlan` (block kernels merged by
log-sum-exp, also without SP: `group=None`). A plan with a `compute_dtype(dtype, device)` method picks its own dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from trl_longpo.attention.kernels import load_ring_flash_attn

RING_ATTENTION_NAME = "ring_attention"
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


@runtime_checkable
class RingPlan(Protocol):
    """Kernel arguments for one batch on one rank; built once per batch, used by every layer."""

    impl: str
    num_local_tokens: int
    needs_half_precision: bool  # True when the kernel's fp32 backward is wrong and fp32 inputs must be downcast

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, group, heads_k_stride: int
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hk, D) for this rank's T local tokens -> attention output (T, H, D)."""
        ...


@dataclass(frozen=True)
class ZigzagVarlenPlan:
    """zigzag_ring_flash_attn_varlen: each segment is split in 2W chunks, rank r holds chunks r and 2W-1-r.

    `cu_seqlens` are the LOCAL boundaries (every global segment length divided by W, so each is even).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_local_tokens: int  # a plain int, so the per-layer shape check needs no device sync
    impl: str = field(default="zigzag", init=False)
    needs_half_precision: bool = field(default=True, init=False)  # ring-flash-attn 0.1.8 fp32 backward bug

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
    needs_half_precision: bool = field(default=False, init=False)

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
    needs_half_precision: bool = field(default=False, init=False)

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


@dataclass(frozen=True)
class RingAttentionState:
    """Everything the attention function needs for one forward: the SP group, the batch's plan, and options.

    `attention_dtype`: the dtype q/k/v are cast to for the kernels (output cast back). None (default) = automatic:
    bf16/fp16 stay as they are; fp32 becomes bf16 where it must (real flash-attn has no fp32 kernels, and
    ring-flash-attn 0.1.8's zigzag backward is wrong in fp32), and stays fp32 for llama3 on the CPU stand-in; fp64
    (tight-tolerance tests on the stand-in) stays fp64.
    """

    group: dist.ProcessGroup | None
    plan: RingPlan
    heads_k_stride: int = 1
    allow_sliding_window: bool = False
    attention_dtype: torch.dtype | None = None


_current_state: contextvars.ContextVar[RingAttentionState | None] = contextvars.ContextVar(
    "trl_longpo_ring_attention_state", default=None
)


@contextlib.contextmanager
def use_ring_attention_state(state: RingAttentionState) -> Iterator[RingAttentionState]:
    """Make `state` the ring-attention state for forwards run inside the block (not for checkpoint recomputation)."""
    token = _current_state.set(state)
    try:
        yield state
    finally:
        _current_state.reset(token)


def check_ring_attn_impl(impl: str) -> None:
    if impl not in RING_ATTN_IMPLS:
        raise ValueError(f"ring_attn_impl must be one of {RING_ATTN_IMPLS}, got {impl!r}")


def check_heads_k_stride(num_key_value_heads: int, heads_k_stride: int) -> None:
    if heads_k_stride < 1 or num_key_value_heads % heads_k_stride:
        raise ValueError(
            f"ring_heads_k_stride={heads_k_stride} must be a positive divisor of the model's number of key/value "
            f"heads ({num_key_value_heads})"
        )


_warned_sliding_window = False


def check_sliding_window(sliding_window: int | None, allow: bool) -> None:
    """Ring kernels do not apply windows across blocks: refuse, or (explicit override) warn that it is ignored."""
    global _warned_sliding_window
    if sliding_window is None:
        return
    if not allow:
        raise ValueError(
            f"the model uses sliding-window attention (sliding_window={sliding_window}), which ring attention does "
            "not implement across sequence-parallel blocks. Set config.sliding_window=None (full attention), or pass "
            "allow_sliding_window=True (LongPOConfig: ring_ignore_sliding_window=True) to run full attention anyway."
        )
    if not _warned_sliding_window:
        _warned_sliding_window = True
        warnings.warn(
            f"ring attention ignores the model's sliding window ({sliding_window}) and attends over the full causal "
            "context (allow_sliding_window=True)",
            UserWarning,
            stacklevel=3,
        )


def _compute_dtype(dtype: torch.dtype, state: RingAttentionState, real_flash_attn: bool) -> torch.dtype:
    if state.attention_dtype is not None:
        dtype = state.attention_dtype
    elif dtype == torch.float32 and (real_flash_attn or state.plan.needs_half_precision):
        dtype = torch.bfloat16
    if real_flash_attn and dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"flash-attn kernels support only bf16/fp16, not {dtype}; fp64 runs need the CPU stand-in")
    return dtype


def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    ring_attention: RingAttentionState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers-5 attention function: q (B, H, S, D), k/v (B, Hk, S, D) local shards -> ((B, S, H, D), None)."""
    state = ring_attention if ring_attention is not None else _current_state.get()
    if state is None:
        raise RuntimeError(
            f"attn_implementation={RING_ATTENTION_NAME!r} needs a RingAttentionState: pass model(..., "
            "ring_attention=state) or run the forward inside `use_ring_attention_state(state)` "
            "(trl_longpo.sequence_parallel.sp_log_probs does this)"
        )
    if dropout and dropout > 0:
        raise ValueError(f"ring attention does not support attention dropout ({dropout}); set attention_dropout=0")
    if softcap:
        raise ValueError(f"ring attention does not support attention logit softcapping (softcap={softcap})")
    if attention_mask is not None:
        raise ValueError(
            "ring attention got an attention mask; sequence boundaries must come from the packing plan (cu_seqlens), "
            "not from masks"
        )
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError("ring attention implements causal (decoder) attention only")
    check_sliding_window(sliding_window, state.allow_sliding_window)
    batch, nheads, seqlen, head_dim = query.shape
    nheads_k = key.shape[1]
    check_heads_k_stride(nheads_k, state.heads_k_stride)
    if batch * seqlen != state.plan.num_local_tokens:
        raise ValueError(
            f"ring attention plan covers {state.plan.num_local_tokens} local tokens but the forward has "
            f"{batch}x{seqlen}; build the plan from the same sharded batch"
        )
    if hasattr(state.plan, "compute_dtype"):  # plans with their own kernels (tree attention)
        dtype = state.attention_dtype or state.plan.compute_dtype(query.dtype, query.device)
    else:
        dtype = _compute_dtype(query.dtype, state, load_ring_flash_attn().backend == "flash_attn")
    # (B, H, S, D) -> (B*S, H, D): the varlen kernels see the batch as one packed sequence described by the plan.
    q, k, v = (x.transpose(1, 2).reshape(batch * seqlen, x.shape[1], -1).to(dtype) for x in (query, key, value))
    out = state.plan.attend(
        q,
        k,
        v,
        softmax_scale=scaling if scaling is not None else head_dim**-0.5,
        group=state.group,
        heads_k_stride=state.heads_k_stride,
    )
    return out.reshape(batch, seqlen, nheads, -1).to(query.dtype), None


def register_ring_attention(name: str = RING_ATTENTION_NAME) -> str:
    """Register `ring_attention_forward` with transformers under `name` (idempotent) and return the name."""
    from transformers import AttentionInterface

    if "flash" in name:
        raise ValueError(f"attention implementation name {name!r} must not contain 'flash' (transformers reserves it)")
    AttentionInterface.register(name, ring_attention_forward)
    return name
