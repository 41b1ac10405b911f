"""Model checks and RoPE surgery for LongPO.

transformers 5 keeps the RoPE base in `config.rope_parameters["rope_theta"]` and caches `inv_freq` in each rotary
embedding module at construction, so changing θ means updating the config and recomputing the cached buffers.
No library exposes "change θ on a built model", hence the small helpers below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
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


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def set_rope_theta(model: nn.Module, theta: float) -> dict[nn.Module, tuple[torch.Tensor, float]]:
    """Give `model` RoPE base `theta` (config and cached frequencies). Returns the previous buffers for restoring."""
    config = model.config.get_text_config()
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        raise ValueError(
            f"`policy_rope_theta` is set but {type(model).__name__}'s config has no `rope_parameters['rope_theta']`; "
            "the model does not use RoPE in a form LongPO can rescale."
        )
    modules = _rotary_modules(model)
    if not modules:
        raise ValueError(f"`policy_rope_theta` is set but {type(model).__name__} has no rotary embedding module.")
    previous = {m: (m.inv_freq.clone(), getattr(m, "attention_scaling", 1.0)) for m in modules}
    params["rope_theta"] = float(theta)
    config.rope_parameters = params
    for module in modules:
        fresh = type(module)(config=module.config if getattr(module, "config", None) is not None else config)
        module.inv_freq = fresh.inv_freq.to(module.inv_freq.device)
        if hasattr(module, "original_inv_freq"):
            module.original_inv_freq = fresh.original_inv_freq.to(module.inv_freq.device)
        module.attention_scaling = fresh.attention_scaling
    return previous


@contextlib.contextmanager
def rope_frequencies(saved: dict[nn.Module, tuple[torch.Tensor, float]] | None) -> Iterator[None]:
    """Temporarily put back saved RoPE frequencies (reference pass through a PEFT policy with adapters disabled)."""
    if not saved:
        yield
        return
    current = {m: (m.inv_freq, m.attention_scaling) for m in saved}
    try:
        for module, (inv_freq, scaling) in saved.items():
            module.inv_freq, module.attention_scaling = inv_freq.to(module.inv_freq.device), scaling
        yield
    finally:
        for module, (inv_freq, scaling) in current.items():
            module.inv_freq, module.attention_scaling = inv_freq, scaling


def rope_theta(model: nn.Module) -> float | None:
    params = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    return params.get("rope_theta")
