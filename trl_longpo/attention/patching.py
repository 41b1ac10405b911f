"""Switching a transformers model between its own attention and trl_longpo's, and the checks that go with it.

One home for: registering `attention_forward` under each layout's name, switching a model to it (for a run:
`switch_attention`; around a block: `attention_implementation`), putting the model's own implementation back
(`restore_attention`, `original_attention`), and refusing models the plans cannot run (`check_attention_model`).
The model's own implementation (e.g. "sdpa") is stored once, on the model, the first time it is switched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from trl_longpo.attention.interface import attention_forward, check_heads_k_stride, check_sliding_window
from trl_longpo.modeling import base_model, unwrap_engine

RING_ATTENTION_NAME = "ring_attention"
TREE_ATTENTION_NAME = "tree_attention"
_ORIGINAL = "_longpo_original_attn_implementation"


def register_attention(name: str) -> str:
    """Register `attention_forward` with transformers under `name` (idempotent) and return the name."""
    from transformers import AttentionInterface

    if "flash" in name:
        raise ValueError(f"attention implementation name {name!r} must not contain 'flash' (transformers reserves it)")
    AttentionInterface.register(name, attention_forward)
    return name


def _ours(name: str | None) -> bool:
    return name in (RING_ATTENTION_NAME, TREE_ATTENTION_NAME)


def switch_attention(model: torch.nn.Module, name: str) -> None:
    """Switch `model` (through PEFT / engine wrappers) to the registered implementation `name`, remembering its own."""
    base = base_model(model)
    current = base.config._attn_implementation
    if current == name:
        return
    if not _ours(current):
        setattr(base, _ORIGINAL, current)
    base.set_attn_implementation(register_attention(name))


def restore_attention(model: torch.nn.Module) -> None:
    """Give `model` back the implementation it had before `switch_attention` (no-op if it was never switched)."""
    base = base_model(model)
    if _ours(base.config._attn_implementation):
        base.set_attn_implementation(getattr(base, _ORIGINAL, "sdpa"))


@contextlib.contextmanager
def attention_implementation(*models: torch.nn.Module | None, name: str | None) -> Iterator[None]:
    """Run the models with implementation `name` inside the block, then switch each back to what it had; `name=None`
    means the models' own implementation (unsplit forwards such as generation on a model switched for a run)."""
    previous = []
    try:
        for model in models:
            if model is None:
                continue
            base = base_model(model)
            if any(base is seen for seen, _ in previous):
                continue
            previous.append((base, base.config._attn_implementation))
            if name is None:
                restore_attention(base)
            else:
                switch_attention(base, name)
        yield
    finally:
        for base, implementation in reversed(previous):
            if base.config._attn_implementation != implementation:
                base.set_attn_implementation(implementation)


def original_attention(*models: torch.nn.Module | None):
    """The models with their own attention inside the block (see `attention_implementation`)."""
    return attention_implementation(*models, name=None)


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether layers are recomputed in backward: `is_activation_checkpointing`, or its older name (which recent
    transformers versions deprecate with a warning)."""
    model = base_model(model)
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _effective_sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps a window but disables it
        return None
    return window


def check_attention_model(
    model: torch.nn.Module,
    heads_k_stride: int = 1,
    allow_sliding_window: bool = False,
    ulysses_degree: int = 1,
    tree: bool = False,
) -> None:
    """Refuse what the plans cannot run: a sliding window (unless explicitly allowed, then warn), a kv head count the
    heads stride does not divide, attention dropout, a Ulysses degree that does not divide the query heads; with
    `tree` (shared prompt) also logit softcapping and prompt-learning adapters. Needs no process group, so it runs
    before the mesh exists."""
    config = unwrap_engine(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if tree:
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(
                "`share_prompt=True` cannot pack pairs for a prompt-learning PEFT adapter (virtual tokens are "
                "prepended to every sequence). Set `share_prompt=False`."
            )
        if getattr(text_config, "attn_logit_softcapping", None):
            raise ValueError(
                "`share_prompt=True`: tree attention does not implement attention logit softcapping "
                f"(attn_logit_softcapping={text_config.attn_logit_softcapping}). Set `share_prompt=False`."
            )
    try:
        check_sliding_window(_effective_sliding_window(text_config), allow_sliding_window)
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        if ulysses_degree > 1:  # after the all-to-all each rank holds replicated_kv / u kv heads
            from trl_longpo.sequence_parallel.planning import check_ulysses_degree, replicated_kv_heads

            heads = text_config.num_attention_heads
            check_ulysses_degree(heads, num_kv_heads, ulysses_degree)
            num_kv_heads = replicated_kv_heads(heads, num_kv_heads, ulysses_degree) // ulysses_degree
        check_heads_k_stride(num_kv_heads, heads_k_stride)
        if getattr(text_config, "attention_dropout", 0.0):
            raise ValueError(f"ring attention does not support attention dropout ({text_config.attention_dropout})")
    except ValueError as err:
        if tree:
            raise ValueError(f"`share_prompt=True` (tree attention): {err}. Or set `share_prompt=False`.") from err
        raise
    if tree:
        try:
            with attention_implementation(model, name=TREE_ATTENTION_NAME):
                pass
        except (ValueError, NotImplementedError) as err:
            raise ValueError(
                f"`share_prompt=True` needs a model that takes a custom attention function (transformers' "
                f"AttentionInterface); {type(base_model(model)).__name__} refused it: {err}. Set "
                "`share_prompt=False`."
            ) from err
