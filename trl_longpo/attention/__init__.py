"""Attention backends for trl_longpo, kept in one package.

- `interface`: the transformers attention function, its per-batch `AttentionState` and the `AttentionPlan` protocol
  (what a layout implements: `attend` and `compute_dtype`).
- `ring`: ring plans (ring-flash-attn's zigzag / llama3 varlen kernels) for packed rows split over an SP group.
- `tree`: tree kernels and plan (shared prompt: several sequences with one prefix, as blocks merged by log-sum-exp).
- `patching`: registering the function under each layout's name, switching models to it and back, model checks.
- `kernels`: makes ring-flash-attn's kernels importable on transformers 5 and on machines without flash-attn
  (`flash_attn_cpu`: flash-attn's signatures over PyTorch's CPU flash kernels).

Importing this package is cheap: nothing is installed into `sys.modules` until `load_ring_flash_attn()` (or the first
ring-attention forward) runs.
"""

from trl_longpo.attention.interface import AttentionPlan, AttentionState, attention_forward, use_attention_state
from trl_longpo.attention.kernels import RingKernels, flash_attn_backend, install_flash_attn, load_ring_flash_attn
from trl_longpo.attention.patching import (
    RING_ATTENTION_NAME,
    TREE_ATTENTION_NAME,
    attention_implementation,
    check_attention_model,
    original_attention,
    register_attention,
    restore_attention,
    switch_attention,
)
from trl_longpo.attention.ring import (
    DEFAULT_RING_ATTN_IMPL,
    RING_ATTN_IMPLS,
    Llama3VarlenPlan,
    LocalVarlenPlan,
    ZigzagVarlenPlan,
    check_ring_attn_impl,
    make_varlen_plan,
)

__all__ = [
    "DEFAULT_RING_ATTN_IMPL",
    "RING_ATTENTION_NAME",
    "RING_ATTN_IMPLS",
    "TREE_ATTENTION_NAME",
    "AttentionPlan",
    "AttentionState",
    "Llama3VarlenPlan",
    "LocalVarlenPlan",
    "RingKernels",
    "ZigzagVarlenPlan",
    "attention_forward",
    "attention_implementation",
    "check_attention_model",
    "check_ring_attn_impl",
    "flash_attn_backend",
    "install_flash_attn",
    "load_ring_flash_attn",
    "make_varlen_plan",
    "original_attention",
    "register_attention",
    "restore_attention",
    "switch_attention",
    "use_attention_state",
]
