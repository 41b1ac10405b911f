"""Every inherited `DPOConfig` field that changes DPO's loss, data or reference handling, honoured or refused.

LongPOTrainer replaces DPOTrainer's loss, tokenization and collation, so a DPO option those code paths read would be
accepted and silently do nothing. Each such field is listed here once: `HONOURED` (with where LongPO applies it) or
`REFUSED` (with why; refused when set to anything but DPOConfig's default). Fields that do
not touch the loss, the data or the reference are listed in `UNRELATED`. `tests/test_validation.py` enumerates
`DPOConfig`'s own fields and fails on any field in none of the three, so a new TRL field is classified before it can
be silently ignored. `LongPOConfig.__post_init__` calls `inherited_field_problems`.

Classified against TRL 1.16's `DPOTrainer` (read from its source: `__init__`, `_prepare_dataset`, `_compute_loss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# field -> where LongPOTrainer applies it
HONOURED: dict[str, str] = {
    "beta": "β of the LongPO preference term",
    "max_length": "rows longer than it raise an error or are dropped (`truncation_mode`); nothing is truncated",
    "truncation_mode": "'error' (default) or 'drop'; DPO's cutting modes are refused",
    "precompute_ref_log_probs": "the reference scores the short prompts once, before training",
    "precompute_ref_batch_size": "batch size of that precompute pass",
    "pad_to_multiple_of": "LongPO's collator pads to it",
    "disable_dropout": "DPOTrainer's set-up, on the policy and the reference",
    "router_aux_loss_coef": "MoE load-balancing loss added to the LongPO loss (unshared prompts only)",
    "dataset_num_proc": "processes of LongPO's tokenization map",
    "activation_offloading": "DPOTrainer's training_step context, which LongPO's wraps",
    "model_init_kwargs": "model loading when `model` is a name (DPOTrainer)",
}

# Label smoothing of TrainingArguments: Trainer applies it only in its own compute_loss, which DPOTrainer replaces.
_TRAINING_ARGUMENTS_REFUSED: dict[str, str] = {
    "label_smoothing_factor": "Trainer's label smoother runs only in Trainer.compute_loss, which DPOTrainer and "
    "LongPOTrainer replace; LongPO has no label smoothing.",
}


# field -> why it is refused; refused when set to anything but DPOConfig's default (so `loss_type` must be sigmoid)
REFUSED: dict[str, str] = {
    "loss_type": (
        "conflicts with LongPO, whose preference term is the sigmoid loss with the short-to-long reference; weight "
        "the NLL with `nll_weight` instead of adding 'sft'."
    ),
    "loss_weights": "is not used by LongPO: set `dpo_weight` and `nll_weight`.",
    "label_smoothing": "(robust DPO / EXO) is not part of the LongPO loss, which would ignore it; leave it 0.",
    "ld_alpha": "(LD-DPO) is not supported by LongPO.",
    "use_weighting": "(WPO) is not supported by LongPO.",
    "f_divergence_type": "must stay 'reverse_kl': LongPO's short-to-long constraint is a reverse KL.",
    "f_alpha_divergence_coef": "only applies to f_divergence_type='alpha_divergence', which LongPO does not support.",
    "discopop_tau": "only applies to loss_type='discopop', which LongPO refuses.",
    "sync_ref_model": "(TR-DPO) conflicts with LongPO: the reference must stay the frozen short-context model.",
    "ref_model_mixup_alpha": "only applies to sync_ref_model (refused).",
    "ref_model_sync_steps": "only applies to sync_ref_model (refused).",
    "padding_free": (
        "is unavailable in TRL 1.16's DPOTrainer (it falls back to padding); LongPO packs rows itself "
        "(`share_prompt`, and sequence parallelism implies packing): leave it False."
    ),
    "pad_token": (
        "(deprecated in TRL) is only read by DPOTrainer's own collator, which LongPO replaces: set "
        "`tokenizer.pad_token` and pass the tokenizer as `processing_class`."
    ),
    **_TRAINING_ARGUMENTS_REFUSED,
}

# DPOConfig fields that change neither the loss, the data nor the reference handling.
UNRELATED: dict[str, str] = {
    "trust_remote_code": "model / tokenizer loading",
}


def dpo_config_fields(config_class: type | None = None) -> list[str]:
    """The fields `DPOConfig` (or `config_class`) declares on top of `TrainingArguments`."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f.name for f in dataclasses.fields(config_class or DPOConfig) if f.name not in base]


def unclassified_fields(config_class: type | None = None) -> list[str]:
    """DPOConfig fields in none of HONOURED, REFUSED, UNRELATED: each could be accepted and silently ignored."""
    return [
        n for n in dpo_config_fields(config_class) if n not in HONOURED and n not in REFUSED and n not in UNRELATED
    ]


def _defaults() -> dict[str, Any]:
    from trl import DPOConfig

    out = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def inherited_field_problems(args: Any) -> list[str]:
    """One message per refused inherited field set on `args` (a LongPOConfig) to a non-default value."""
    defaults = _defaults()
    problems = []
    for name, why in REFUSED.items():
        value = getattr(args, name, defaults.get(name))
        if name == "loss_type" and isinstance(value, str):
            value = [value]
        if value != defaults.get(name):
            problems.append(f"`{name}={value!r}` {why}")
    return problems
