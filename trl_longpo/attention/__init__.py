"""Attention backends for trl_longpo, kept in one package.

- `kernels`: makes ring-flash-attn's kernels importable on transformers 5 (without its HF adapter) and on machines
  without flash-attn (pure-PyTorch stand-in, `flash_attn_cpu`).
- `ring`: the "ring_attention" transformers attention function and the per-batch `RingAttentionState` it reads.

Importing this package is cheap: nothing is installed into `sys.modules` until `load_ring_flash_attn()` (or the first
ring-attention forward) runs.
"""

from trl_longpo.attention.kernels import RingKernels, flash_attn_backend, install_flash_attn, load_ring_flash_attn
from trl_longpo.attention.ring import (
    DEFAULT_RING_ATTN_IMPL,
    RING_ATTENTION_NAME,
    RING_ATTN_IMPLS,
    Llama3VarlenPlan,
    LocalVarlenPlan,
    RingAttentionState,
    RingPlan,
    ZigzagVarlenPlan,
    check_heads_k_stride,
    check_ring_attn_impl,
    check_sliding_window,
    make_varlen_plan,
    register_ring_attention,
    ring_attention_forward,
    use_ring_attention_state,
)

__all__ = [
    "DEFAULT_RING_ATTN_IMPL",
    "RING_ATTENTION_NAME",
    "RING_ATTN_IMPLS",
    "Llama3VarlenPlan",
    "LocalVarlenPlan",
    "RingAttentionState",
    "RingKernels",
    "RingPlan",
    "ZigzagVarlenPlan",
    "check_heads_k_stride",
    "check_ring_attn_impl",
    "check_sliding_window",
    "flash_attn_backend",
    "install_flash_attn",
    "load_ring_flash_attn",
    "make_varlen_plan",
    "register_ring_attention",
    "ring_attention_forward",
    "use_ring_attention_state",
]
