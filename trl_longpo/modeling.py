"""Model checks and RoPE surgery for LongPO.

transformers 5 keeps the RoPE base in `config.rope_parameters["rope_theta"]` and caches `inv_freq` in each rotary
embedding module at construction, so changing θ means updating the config and recomputing the cached buffers.
No library exposes "change θ on a built model", hence the small helpers below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

_CAUSAL_LM_CLASSES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def check_causal_lm(model: nn.Module, role: str = "model") -> None:
    """Refuse models that are not decoder-only causal LMs: LongPO scores next-token log-probs of long prompts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    name = type(base).__name__
    causal = (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and (name in _CAUSAL_LM_CLASSES or name.endswith("ForCausalLM"))
        and base.get_output_embeddings() is not None
    )
    if not causal:
        raise ValueError(
            f"The {role} is a {name}, not a decoder-only causal language model. LongPO needs a model loadable with "
            "`AutoModelForCausalLM` (e.g. MistralForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM)."
        )


def row_sum_dtype(device: torch.device) -> torch.dtype:
    """Per-row sums of per-token log-probs are accumulated in fp64 (fp32 on MPS, which has none): the rewards are
    differences of two sums of thousands of terms, so summing in fp32 would leave errors that depend on the order of
    summation (packed vs padded layouts, SP shards) at the level of the rewards themselves."""
    return torch.float32 if device.type == "mps" else torch.float64


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT and DDP / FSDP / DeepSpeed wrappers."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model = unwrap_engine(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed wrappers (they expose it as `.module`; FSDP2 shards in place).

    A DeepSpeed engine has a `config` of its own (its DeepSpeed config dict, e.g. for TRL's ZeRO-3 reference model),
    so "has a `config`" does not mark the model: unwrap until the `config` is a transformers config.
    """
    while not isinstance(getattr(model, "config", None), PreTrainedConfig) and hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class RopeState:
    """A model's RoPE settings: the config dicts and each rotary module's cached frequencies and scaling."""

    params: list[tuple[object, dict]]
    buffers: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None, float]]


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "rope_type") and hasattr(m, "config")
    ]


def _snapshot(modules: list[nn.Module]) -> RopeState:
    configs = {id(m.config): m.config for m in modules}
    return RopeState(
        params=[(cfg, dict(cfg.rope_parameters)) for cfg in configs.values()],
        buffers=[(m, m.inv_freq.clone(), getattr(m, "original_inv_freq", None), m.attention_scaling) for m in modules],
    )


def _restore(state: RopeState) -> None:
    for cfg, params in state.params:
        cfg.rope_parameters = dict(params)
    for module, inv_freq, original, scaling in state.buffers:
        module.inv_freq.copy_(inv_freq)
        if original is not None:
            module.original_inv_freq.copy_(original)
        module.attention_scaling = scaling


def set_rope_theta(model: nn.Module, theta: float) -> RopeState:
    """Give `model` RoPE base `theta` (config and cached frequencies, recomputed by the module's own RoPE init).

    Returns the previous state, for `restored_rope` / `rope_theta_override`.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    modules = _rotary_modules(model)
    if not modules or "rope_theta" not in (getattr(modules[0].config, "rope_parameters", None) or {}):
        raise ValueError(
            f"a RoPE theta was requested but {type(model).__name__} has no rotary embedding with "
            "`config.rope_parameters['rope_theta']`; the model does not use RoPE in a form that can be rescaled."
        )
    previous = _snapshot(modules)
    for cfg, params in previous.params:
        cfg.rope_parameters = {**params, "rope_theta": float(theta)}
    for module in modules:
        init = (
            module.compute_default_rope_parameters
            if module.rope_type == "default"
            else ROPE_INIT_FUNCTIONS[module.rope_type]
        )
        inv_freq, scaling = init(module.config, device=module.inv_freq.device)
        module.inv_freq.copy_(inv_freq.to(module.inv_freq.dtype))
        if getattr(module, "original_inv_freq", None) is not None:
            module.original_inv_freq.copy_(inv_freq.to(module.original_inv_freq.dtype))
        module.attention_scaling = scaling
    return previous


@contextlib.contextmanager
def restored_rope(saved: RopeState | None) -> Iterator[None]:
    """Temporarily put back a saved RoPE state (reference pass through a PEFT policy with adapters disabled)."""
    if saved is None:
        yield
        return
    current = _snapshot([module for module, *_ in saved.buffers])
    _restore(saved)
    try:
        yield
    finally:
        _restore(current)


@contextlib.contextmanager
def rope_theta_override(model: nn.Module, theta: float | None) -> Iterator[None]:
    """Temporarily run `model` with RoPE base `theta` (e.g. the long-prompt generation pass), then restore it."""
    if theta is None:
        yield
        return
    previous = set_rope_theta(model, theta)
    try:
        yield
    finally:
        _restore(previous)


def rope_theta(model: nn.Module) -> float | None:
    params = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    return params.get("rope_theta")
