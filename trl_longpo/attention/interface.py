"""The attention interface: one transformers attention function, the per-batch state it reads, the plan protocol.

How it plugs in: `trl_longpo.attention.patching` registers `attention_forward` with `transformers.AttentionInterface`
under a name per layout ("ring_attention", "tree_attention"; a name containing "flash" would make transformers look
for a flash kernel). For a name not registered in `AttentionMaskInterface` transformers builds no mask and passes
`attention_mask=None`: which keys a query sees comes from the batch's plan, never from an (Sq x Sk) mask.

Per-batch state: the attention function is called once per layer with nothing but q/k/v, so everything that depends
on the batch and on the process layout lives in an `AttentionState` passed as `model(..., attention_state=state)`
(transformers 5 forwards extra model kwargs down to the attention function). The state is captured with the layer
inputs, so it is still there when gradient checkpointing recomputes a layer during backward. `use_attention_state`
(a context variable) is for callers that cannot add kwargs; it does not survive checkpoint recomputation.

A new layout (ring, tree, Ulysses, ...) implements `AttentionPlan`: `attend` on packed (T, H, D) tensors and
`compute_dtype`, the dtype its kernels run in. Nothing else changes: the function, the state and the patching are
shared.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist


@runtime_checkable
class AttentionPlan(Protocol):
    """Kernel arguments for one batch on one rank; built once per batch, used by every layer."""

    impl: str  # a short name for messages and logs ("zigzag", "llama3", "local", "tree", ...)
    num_local_tokens: int  # a plain int, so the per-layer shape check needs no device sync

    def compute_dtype(self, dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype q/k/v are cast to for this plan's kernels (the output is cast back to the model's dtype)."""
        ...

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, group, heads_k_stride: int
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, Hk, D) for this rank's T local tokens -> attention output (T, H, D)."""
        ...


@dataclass(frozen=True)
class AttentionState:
    """Everything the attention function needs for one forward: the process group, the batch's plan, and options.

    `attention_dtype`: overrides the plan's `compute_dtype` (None = the plan decides: bf16/fp16 stay as they are,
    fp32 becomes bf16 where a kernel has no correct fp32 path, fp64 stays fp64 on CPU).
    """

    group: dist.ProcessGroup | None
    plan: AttentionPlan
    heads_k_stride: int = 1
    allow_sliding_window: bool = False
    attention_dtype: torch.dtype | None = None


_current_state: contextvars.ContextVar[AttentionState | None] = contextvars.ContextVar(
    "trl_longpo_attention_state", default=None
)


@contextlib.contextmanager
def use_attention_state(state: AttentionState) -> Iterator[AttentionState]:
    """Make `state` the attention state for forwards run inside the block (not for checkpoint recomputation)."""
    token = _current_state.set(state)
    try:
        yield state
    finally:
        _current_state.reset(token)


def check_heads_k_stride(num_key_value_heads: int, heads_k_stride: int) -> None:
    if heads_k_stride < 1 or num_key_value_heads % heads_k_stride:
        raise ValueError(
            f"ring_heads_k_stride={heads_k_stride} must be a positive divisor of the model's number of key/value "
            f"heads ({num_key_value_heads})"
        )


_warned_sliding_window = False


def check_sliding_window(sliding_window: int | None, allow: bool) -> None:
    """Plans do not apply windows across blocks: refuse, or (explicit override) warn once that it is ignored."""
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


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    attention_state: AttentionState | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers-5 attention function: q (B, H, S, D), k/v (B, Hk, S, D) local tokens -> ((B, S, H, D), None)."""
    state = attention_state if attention_state is not None else _current_state.get()
    if state is None:
        raise RuntimeError(
            "this attention implementation needs an AttentionState: pass model(..., attention_state=state) or run "
            "the forward inside `use_attention_state(state)` (trl_longpo.scoring builds it for every batch)"
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
    check_heads_k_stride(key.shape[1], state.heads_k_stride)
    if batch * seqlen != state.plan.num_local_tokens:
        raise ValueError(
            f"attention plan covers {state.plan.num_local_tokens} local tokens but the forward has "
            f"{batch}x{seqlen}; build the plan from the same sharded batch"
        )
    dtype = state.attention_dtype or state.plan.compute_dtype(query.dtype, query.device)
    # (B, H, S, D) -> (B*S, H, D): the kernels see the batch as one packed sequence described by the plan.
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
