"""Checks that LongPO rows render and score as the method assumes, with errors naming the row, the column and what
was found.

Before tokenization, `validate_row` checks the message structure: a chat template silently drops unknown roles,
renders an answer after an EOS when a prompt ends with an assistant message, and turns `None` content into a raw
jinja2 error. After tokenization, `check_answer_tokens` verifies the method's central invariant: the answer tokens
the policy scores on the long prompt are exactly those the reference scores on the short prompt(s).
"""

from __future__ import annotations

from typing import Any

from datasets import IterableDataset
from transformers import TrainerCallback
from transformers.utils import logging

from .tokenization import LongPODataError, row_lengths, tokenize_row

ROLES = ("system", "user", "assistant")
PROMPT_COLUMNS = ("prompt", "short_prompt")
ANSWER_COLUMNS = ("chosen", "rejected")

logger = logging.get_logger(__name__)


def _found(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return f"an empty string {value!r}" if not value.strip() else f"the string {value[:60]!r}"
    return f"a value of type {type(value).__name__} ({value!r:.60})"


def _check_text(value: Any, index: int, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise LongPODataError(f"Row {index}: {where} must be a non-empty string; found {_found(value)}.")


def _check_messages(messages: Any, index: int, where: str, is_prompt: bool) -> None:
    """Roles in ROLES, a system message only first (prompts only), non-empty string content; prompts end with a
    user message (an assistant message last would put the answer after an EOS; a system message alone leaves the
    template's user markup to be scored as the answer)."""
    if not isinstance(messages, list) or not messages:
        raise LongPODataError(f"Row {index}: {where} must be a non-empty list of messages; found {_found(messages)}.")
    for position, message in enumerate(messages):
        at = f"message {position} of {where}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise LongPODataError(
                f"Row {index}: {at} must be a dict with 'role' and 'content'; found {_found(message)}."
            )
        role = message["role"]
        if role not in ROLES:
            raise LongPODataError(
                f"Row {index}: {at} has role {role!r}; LongPO accepts {list(ROLES)} (a chat template may drop other "
                "roles silently)."
            )
        if role == "system" and (not is_prompt or position != 0):
            raise LongPODataError(f"Row {index}: {at} is a system message; only a prompt's first message may be one.")
        _check_text(message["content"], index, f"the content of {at} (role {role!r})")
    if is_prompt and messages[-1]["role"] != "user":
        last = messages[-1]["role"]
        reason = (
            "an answer would follow the assistant's EOS"
            if last == "assistant"
            else "a system message alone makes the reference score template tokens as part of the answer"
        )
        raise LongPODataError(
            f"Row {index}: {where} ends with a {last!r} message; it must end with the user's instruction ({reason})."
        )


def validate_row(example: dict[str, Any], index: int) -> None:
    """Message structure and content types of one row, before any chat template sees it."""
    prompt = example.get("prompt")
    conversational = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    if not conversational:
        for column in (*PROMPT_COLUMNS, *ANSWER_COLUMNS):
            if column in example:
                _check_text(example[column], index, f"`{column}` (standard format, as `prompt` is not a message list)")
        return
    _check_messages(prompt, index, "`prompt`", is_prompt=True)
    short = example.get("short_prompt")
    if isinstance(short, list) and short and all(isinstance(p, list) for p in short):  # one per assistant turn
        for turn, messages in enumerate(short):
            _check_messages(messages, index, f"`short_prompt[{turn}]`", is_prompt=True)
    elif isinstance(short, list) and short and isinstance(short[0], dict):
        _check_messages(short, index, "`short_prompt`", is_prompt=True)
    # other shapes get tokenization's error, which explains the two accepted shapes
    for column in ANSWER_COLUMNS:
        if isinstance(example.get(column), list):
            _check_messages(example[column], index, f"`{column}`", is_prompt=False)


def check_answer_tokens(tokenized: dict[str, list], index: int) -> None:
    """The central invariant: per answer, the tokens scored by the policy (masked long-side completion) equal the
    concatenated tokens scored by the reference (short-side completions, one per turn)."""
    for side in ANSWER_COLUMNS:
        policy = [t for t, m in zip(tokenized[f"{side}_ids"], tokenized[f"{side}_mask"]) if m]
        reference = [t for turn in tokenized[f"short_{side}_ids"] for t in turn]
        if policy != reference:
            first = next(
                (i for i, (a, b) in enumerate(zip(policy, reference)) if a != b), min(len(policy), len(reference))
            )
            raise LongPODataError(
                f"Row {index}: the `{side}` answer tokenizes differently after the long prompt ({len(policy)} tokens) "
                f"than after the short prompt ({len(reference)} tokens; first difference at answer token {first}), so "
                "the policy and the reference would score different answers. Usually the prompt's last characters "
                "merge with the answer's first ones: end both prompts the same way, or start the answer with a space "
                "or newline."
            )


def check_not_empty(dataset, dataset_name: str) -> None:
    """An empty dataset is an error before training (DPOTrainer would fail on a bare `StopIteration`). A stream is
    peeked at its first row, as DPOTrainer itself does."""
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise LongPODataError(f"The {dataset_name} dataset is empty (0 rows).")
    if isinstance(dataset, IterableDataset):
        try:
            next(iter(dataset))
        except StopIteration:
            raise LongPODataError(f"The streamed {dataset_name} dataset yields no rows.") from None


class EmptyEpochGuard(TrainerCallback):
    """Stops a streamed run whose epoch yielded no batch (e.g. `truncation_mode='drop'` removed every row), which the
    Trainer would otherwise end as a successful run of 0 steps."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._batches = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._batches += 1

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._batches == 0:
            raise LongPODataError(
                f"An epoch of the streamed train dataset yielded no rows (after {state.global_step} steps): the "
                "stream is empty, or every row was removed (truncation_mode='drop' with max_length="
                f"{getattr(args, 'max_length', None)}). Check the stream, or raise `max_length`."
            )


def check_pairs(dataset, dataset_name: str, num_proc: int | None = None) -> None:
    """Dataset-level checks of a tokenized map-style dataset that a single row cannot reveal.

    - `short_prompt` longer than `prompt` on most rows: the columns are swapped (the policy would learn on the short
      context against a reference on the long one, the method inverted): an error naming the columns.
    - `chosen` identical to `rejected`: the preference term is the constant log 2 with no gradient, and the reward
      accuracy is decided by rounding: counted and reported with the first row indices.
    A streamed dataset is not scanned (its rows are not all known before training).
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        return

    def flags(batch: dict[str, list]) -> dict[str, list[bool]]:
        return {
            "swapped": [len(s[0]) > len(p) for p, s in zip(batch["prompt_ids"], batch["short_prompt_ids"])],
            "identical": [c == r for c, r in zip(batch["chosen_ids"], batch["rejected_ids"])],
        }

    columns = ["prompt_ids", "short_prompt_ids", "chosen_ids", "rejected_ids"]
    found = dataset.select_columns(columns).map(
        flags, batched=True, remove_columns=columns, num_proc=num_proc, desc=f"Checking {dataset_name} pairs"
    )
    swapped = [i for i, flag in enumerate(found["swapped"]) if flag]
    identical = [i for i, flag in enumerate(found["identical"]) if flag]
    total = len(dataset)
    if 2 * len(swapped) > total:
        raise LongPODataError(
            f"{len(swapped)} of {total} rows of the {dataset_name} dataset have a `short_prompt` longer than their "
            f"`prompt` (rows {swapped[:10]}): the two columns look swapped. `prompt` is the LONG input (whole document "
            "+ instruction) the policy learns on; `short_prompt` the short chunk + instruction the reference scores."
        )
    if swapped:
        logger.warning(
            f"{len(swapped)} of {total} rows of the {dataset_name} dataset have a `short_prompt` longer than their "
            f"`prompt` (rows {swapped[:10]}); check that these columns are not swapped."
        )
    if identical:
        logger.warning(
            f"{len(identical)} of {total} rows of the {dataset_name} dataset have `chosen` == `rejected` (rows "
            f"{identical[:10]}): their preference term is the constant log 2 with no gradient (only the NLL term "
            "trains on them) and their reward accuracy is decided by rounding. Remove them (`trl-longpo generate` "
            "drops such pairs)."
        )


def prepare_row(example: dict, index: int, processing_class, eos_token: str) -> dict[str, list]:
    """Validate the messages, tokenize, and check that policy and reference score the same answer tokens."""
    validate_row(example, index)
    tokenized = tokenize_row(example, index, processing_class, eos_token)
    check_answer_tokens(tokenized, index)
    return tokenized


def enforce_max_length(dataset, args, dataset_name: str):
    """Rows over `max_length` are an error (default) or dropped with a logged count; never truncated."""
    max_length = args.max_length

    def too_long(example) -> bool:
        lengths = row_lengths(example)
        return max(lengths["long"], lengths["short"]) > max_length

    if isinstance(dataset, IterableDataset):
        if args.truncation_mode == "drop":
            logger.warning(f"Rows of the streamed {dataset_name} dataset longer than {max_length} tokens are dropped.")
            return dataset.filter(lambda ex: not too_long(ex))

        def check(example, index):
            if too_long(example):
                raise LongPODataError(
                    _over_length_message(dataset_name, [(index, row_lengths(example))], 1, max_length)
                )
            return example

        return dataset.map(check, with_indices=True)

    lengths = dataset.map(
        lambda ex: row_lengths(ex),
        remove_columns=dataset.column_names,
        num_proc=args.dataset_num_proc,
        desc=f"Measuring {dataset_name} rows",
    )
    over = [
        (i, {"long": lg, "short": sh})
        for i, (lg, sh) in enumerate(zip(lengths["long"], lengths["short"]))
        if max(lg, sh) > max_length
    ]
    if not over:
        return dataset
    if args.truncation_mode == "error":
        raise LongPODataError(_over_length_message(dataset_name, over[:5], len(over), max_length))
    keep = sorted(set(range(len(dataset))) - {i for i, _ in over})
    logger.warning(
        f"Dropped {len(over)} of {len(dataset)} rows of the {dataset_name} dataset longer than max_length="
        f"{max_length} tokens (truncation_mode='drop'); first dropped rows: {[i for i, _ in over[:10]]}."
    )
    return dataset.select(keep)


def _over_length_message(dataset_name: str, rows: list, total: int, max_length: int) -> str:
    shown = ", ".join(f"row {i} (long {ln['long']}, short {ln['short']} tokens)" for i, ln in rows)
    return (
        f"{total} row(s) of the {dataset_name} dataset exceed max_length={max_length}: {shown}. LongPO never truncates "
        "a long context silently. Raise `max_length` (or set it to None), or set `truncation_mode='drop'` to drop "
        "these rows with a logged count."
    )
