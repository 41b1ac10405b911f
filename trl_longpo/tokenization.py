"""Tokenize LongPO rows exactly as TRL's DPOTrainer tokenizes preference rows, plus the short prompts.

DPOTrainer renders `prompt` (with the generation prompt) and `prompt + completion`, and starts the completion where
the two token lists diverge. LongPO does the same for the long prompt (policy side) and for each short prompt
(reference side), so that with `short_prompt == prompt` the reference sees byte-for-byte DPO's inputs.

Multi-turn rows (paper Eq. 13, conversational only): `chosen`/`rejected` alternate assistant answers and user
follow-up instructions. The policy sees one long conversation; only assistant-answer tokens are marked as completion
(the follow-up user turns are context). The reference scores answer i on `short_prompt[i]` alone.
"""

from __future__ import annotations

import json
from typing import Any

from trl.data_utils import _tokenize, common_prefix_length, is_conversational

REQUIRED_COLUMNS = ("prompt", "short_prompt", "chosen", "rejected")
TOKENIZED_COLUMNS = (
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "chosen_mask",
    "rejected_mask",
    "short_prompt_ids",
    "short_chosen_ids",
    "short_rejected_ids",
)


class LongPODataError(ValueError):
    """A dataset row that LongPO cannot train on; the message names the row and the field."""


def check_columns(column_names: list[str] | None, dataset_name: str) -> None:
    if column_names is None:  # IterableDataset without known features: checked per row instead
        return
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        hint = ""
        if "short_prompt" in missing:
            hint = (
                " `short_prompt` is the short chunk the chosen answer was generated from, followed by the same "
                "instruction as `prompt` (see the README's dataset format, or build rows with `trl-longpo generate`)."
            )
        raise LongPODataError(
            f"The {dataset_name} dataset is missing the column(s) {missing}; LongPO needs {list(REQUIRED_COLUMNS)}, "
            f"got {column_names}.{hint}"
        )


def _assistant_turns(messages: list[dict], field: str, index: int) -> list[int]:
    """Positions of the assistant messages in a conversational completion, validated."""
    if not isinstance(messages, list) or not messages:
        raise LongPODataError(f"Row {index}: `{field}` is empty; it must hold at least one assistant message.")
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns or turns[0] != 0 or turns[-1] != len(messages) - 1:
        raise LongPODataError(
            f"Row {index}: `{field}` must start and end with an assistant message (roles: "
            f"{[m.get('role') for m in messages]})."
        )
    return turns


def _short_prompts(short_prompt: Any, n_turns: int, conversational: bool, index: int) -> list:
    """Normalise `short_prompt` to one prompt per assistant turn."""
    if conversational:
        if isinstance(short_prompt, list) and short_prompt and all(isinstance(m, dict) for m in short_prompt):
            prompts = [short_prompt]  # a single message list: single-turn row
        elif isinstance(short_prompt, list) and short_prompt and all(isinstance(p, list) for p in short_prompt):
            prompts = short_prompt
        else:
            raise LongPODataError(
                f"Row {index}: `short_prompt` must be a message list (single-turn) or a list of message lists, one "
                f"per assistant turn (multi-turn), because `prompt` is conversational; got {short_prompt!r:.200}."
            )
        if any(not p for p in prompts):
            raise LongPODataError(f"Row {index}: a `short_prompt` message list is empty.")
    else:
        prompts = [short_prompt]
    if len(prompts) != n_turns:
        raise LongPODataError(
            f"Row {index}: `short_prompt` holds {len(prompts)} short prompt(s) but `chosen` has {n_turns} assistant "
            "turn(s); a multi-turn row needs exactly one short prompt per assistant turn."
        )
    return prompts


def _completion_mask(
    processing_class, prompt: list[dict], completion: list[dict], turns: list[int], full_ids: list[int], kwargs: dict
) -> list[int]:
    """1 on the tokens of each assistant answer of `prompt + completion`, 0 elsewhere (multi-turn conversations)."""
    mask = [0] * len(full_ids)
    for k in turns:
        before = _tokenize(processing_class, prompt + completion[:k], add_generation_prompt=True, **kwargs)[
            "input_ids"
        ]
        upto = _tokenize(processing_class, prompt + completion[: k + 1], **kwargs)["input_ids"]
        start = common_prefix_length(before, upto)
        end = common_prefix_length(upto, full_ids)
        for t in range(start, end):
            mask[t] = 1
    return mask


def tokenize_prompt(processing_class, prompt: str | list[dict], **chat_template_kwargs) -> list[int]:
    """A prompt's token ids as the trainer renders it: the chat template with the generation prompt for a message
    list, the tokenizer's plain encoding (with its special tokens) for a string. Generation starts right after."""
    if isinstance(prompt, list):
        return _tokenize(processing_class, prompt, add_generation_prompt=True, **chat_template_kwargs)["input_ids"]
    return _tokenize(processing_class, prompt)["input_ids"]


def _split_prompt_completions(processing_class, prompt, chosen, rejected, conversational: bool, kwargs: dict):
    """DPOTrainer's rule: the completion starts where prompt and prompt+completion diverge (min over both answers)."""
    if conversational:
        prompt_ids = tokenize_prompt(processing_class, prompt, **kwargs)
        chosen_full = _tokenize(processing_class, prompt + chosen, **kwargs)["input_ids"]
        rejected_full = _tokenize(processing_class, prompt + rejected, **kwargs)["input_ids"]
    else:
        prompt_ids = tokenize_prompt(processing_class, prompt)
        chosen_full = _tokenize(processing_class, prompt + chosen)["input_ids"]
        rejected_full = _tokenize(processing_class, prompt + rejected)["input_ids"]
    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return prompt_ids[:prompt_len], chosen_full, rejected_full, prompt_len


def tokenize_row(example: dict[str, Any], index: int, processing_class, eos_token: str) -> dict[str, list]:
    """Tokenize one LongPO row whose messages passed `validation.validate_row`; raises `LongPODataError` naming the
    row for a structure it cannot train on (turn counts, answer roles)."""
    for column in REQUIRED_COLUMNS:
        if column not in example:
            raise LongPODataError(f"Row {index}: missing field `{column}`; LongPO needs {list(REQUIRED_COLUMNS)}.")
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    conversational = is_conversational({"prompt": prompt})
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}

    if conversational:
        chosen_turns = _assistant_turns(chosen, "chosen", index)
        rejected_turns = _assistant_turns(rejected, "rejected", index)
        if len(chosen_turns) != len(rejected_turns):
            raise LongPODataError(
                f"Row {index}: `chosen` has {len(chosen_turns)} assistant turns but `rejected` has "
                f"{len(rejected_turns)}; both answer the same instructions."
            )
        user_c = [m for m in chosen if m.get("role") != "assistant"]
        user_r = [m for m in rejected if m.get("role") != "assistant"]
        if user_c != user_r:
            raise LongPODataError(
                f"Row {index}: the follow-up user turns of `chosen` and `rejected` differ; both must answer the same "
                "instructions in the same order."
            )
        short_prompts = _short_prompts(example["short_prompt"], len(chosen_turns), True, index)
    else:
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if text.strip() == eos_token:
                raise LongPODataError(f"Row {index}: `{name}` holds only the EOS token.")
        # Same as DPOTrainer: standard-format completions end with EOS
        chosen = chosen if chosen.endswith(eos_token) else chosen + eos_token
        rejected = rejected if rejected.endswith(eos_token) else rejected + eos_token
        chosen_turns = rejected_turns = [0]
        short_prompts = _short_prompts(example["short_prompt"], 1, False, index)

    # Policy side: the long prompt with the whole (possibly multi-turn) conversation
    prompt_ids, chosen_full, rejected_full, prompt_len = _split_prompt_completions(
        processing_class, prompt, chosen, rejected, conversational, kwargs
    )
    if conversational and len(chosen_turns) > 1:
        chosen_mask = _completion_mask(processing_class, prompt, chosen, chosen_turns, chosen_full, kwargs)
        rejected_mask = _completion_mask(processing_class, prompt, rejected, rejected_turns, rejected_full, kwargs)
        # The first answer starts at the shared prompt boundary, exactly as for a single-turn row
        for mask in (chosen_mask, rejected_mask):
            first_end = mask.index(1) if 1 in mask else prompt_len
            for t in range(prompt_len, first_end):
                mask[t] = 1
        chosen_mask, rejected_mask = chosen_mask[prompt_len:], rejected_mask[prompt_len:]
    else:
        chosen_mask = [1] * (len(chosen_full) - prompt_len)
        rejected_mask = [1] * (len(rejected_full) - prompt_len)

    # Reference side: answer i on short prompt i alone
    short_prompt_ids, short_chosen_ids, short_rejected_ids = [], [], []
    for turn, short in enumerate(short_prompts):
        if conversational:
            answer_w, answer_l = [chosen[chosen_turns[turn]]], [rejected[rejected_turns[turn]]]
        else:
            answer_w, answer_l = chosen, rejected
        s_prompt_ids, s_chosen_full, s_rejected_full, s_len = _split_prompt_completions(
            processing_class, short, answer_w, answer_l, conversational, kwargs
        )
        short_prompt_ids.append(s_prompt_ids)
        short_chosen_ids.append(s_chosen_full[s_len:])
        short_rejected_ids.append(s_rejected_full[s_len:])

    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_full[prompt_len:],
        "rejected_ids": rejected_full[prompt_len:],
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
        "short_prompt_ids": short_prompt_ids,
        "short_chosen_ids": short_chosen_ids,
        "short_rejected_ids": short_rejected_ids,
    }


def row_lengths(example: dict[str, list]) -> dict[str, int]:
    """Longest policy sequence and longest reference sequence of a tokenized row."""
    prompt = len(example["prompt_ids"])
    long_len = prompt + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
    short_len = max(
        len(p) + max(len(c), len(r))
        for p, c, r in zip(example["short_prompt_ids"], example["short_chosen_ids"], example["short_rejected_ids"])
    )
    return {"long": long_len, "short": short_len}
