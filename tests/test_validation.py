"""Rows, settings and launches that would train silently wrong or fail obscurely are refused with an error naming
the row, the column or the option (issue 9, cases 3-6 and 9)."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import longpo_args, make_rows, make_two_turn_row
from datasets import Dataset, IterableDataset

from trl_longpo import LongPOConfig, LongPOTrainer
from trl_longpo.tokenization import LongPODataError, tokenize_row
from trl_longpo.validation import check_answer_tokens, validate_row


def _trainer(tokenizer, model, rows, tmp_path, eval_rows=None, **config):
    return LongPOTrainer(
        model=model,
        args=longpo_args(tmp_path, **config),
        train_dataset=rows if not isinstance(rows, list) else Dataset.from_list(rows),
        eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
        processing_class=tokenizer,
    )


# ------------------------------------------------------------------------------------------------- settings (case 3)
@pytest.mark.parametrize(
    "field, value",
    [
        ("beta", 0.0),
        ("beta", -1.0),
        ("beta", math.nan),
        ("beta", math.inf),
        ("dpo_weight", math.nan),
        ("dpo_weight", math.inf),
        ("nll_weight", math.nan),
        ("policy_rope_theta", math.inf),
        ("policy_rope_theta", math.nan),
        ("learning_rate", math.nan),
    ],
)
def test_non_positive_beta_and_non_finite_weights_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be (positive|a finite number)"):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


# -------------------------------------------------------------------------------------- message structure (case 4, 5)
def _row(**changes):
    row = copy.deepcopy(make_rows(1)[0])
    row.update(changes)
    return row


USER = {"role": "user", "content": "What is it about?"}
ANSWER = {"role": "assistant", "content": "Something."}
SYSTEM = {"role": "system", "content": "Be brief."}
BAD_ROWS = {
    "empty prompt content": (_row(prompt=[{"role": "user", "content": " "}]), r"message 0 of `prompt`.*empty string"),
    "empty short_prompt content": (
        _row(short_prompt=[SYSTEM, {"role": "user", "content": ""}]),
        r"message 1 of `short_prompt`.*empty string",
    ),
    "prompt ends with assistant": (_row(prompt=[USER, ANSWER]), r"`prompt` ends with a 'assistant' message"),
    "short_prompt ends with assistant": (
        _row(short_prompt=[USER, ANSWER]),
        r"`short_prompt` ends with a 'assistant' message",
    ),
    "short_prompt system only": (_row(short_prompt=[SYSTEM]), r"`short_prompt` ends with a 'system' message"),
    "unknown role": (_row(prompt=[{"role": "narrator", "content": "x"}, USER]), r"role 'narrator'"),
    "system not first": (_row(prompt=[USER, SYSTEM, USER]), r"message 1 of `prompt` is a system message"),
    "None content in prompt": (_row(prompt=[{"role": "user", "content": None}]), r"`prompt`.*found None"),
    "None content in short_prompt": (_row(short_prompt=[{"role": "user", "content": None}]), r"found None"),
    "int content in chosen": (
        _row(chosen=[{"role": "assistant", "content": 5}]),
        r"message 0 of `chosen` \(role 'assistant'\).*found a value of type int \(5\)",
    ),
    "list content in rejected": (
        _row(rejected=[{"role": "assistant", "content": ["a"]}]),
        r"`rejected`.*type list",
    ),
    "message without content": (_row(prompt=[{"role": "user"}]), r"message 0 of `prompt` must be a dict"),
    "standard: int answer": (
        dict(make_rows(1, conversational=False)[0], chosen=3),
        r"`chosen` \(standard format.*found a value of type int \(3\)",
    ),
    "standard: None short_prompt": (
        dict(make_rows(1, conversational=False)[0], short_prompt=None),
        r"`short_prompt` \(standard format.*found None",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_refused_naming_row_column_and_value(case):
    bad, message = BAD_ROWS[case]
    with pytest.raises(LongPODataError, match=rf"^Row 7: .*{message}"):
        validate_row(bad, 7)


# Arrow holds one type per column, so a row with a non-string content comes with a whole column of them
TRAINER_CASES = [
    "None content in prompt",
    "empty short_prompt content",
    "short_prompt system only",
    "prompt ends with assistant",
    "unknown role",
]


@pytest.mark.parametrize("case", TRAINER_CASES)
def test_trainer_refuses_bad_rows_before_tokenization(tokenizer, tiny_model, tmp_path, case):
    bad, message = BAD_ROWS[case]
    rows = make_rows(3)
    rows[1] = bad
    with pytest.raises(LongPODataError, match=rf"^Row 1: .*{message}"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)


def test_trainer_reports_non_string_answers_as_such(tokenizer, tiny_model, tmp_path):
    rows = make_rows(2)
    for row in rows:
        row["chosen"] = [{"role": "assistant", "content": 5}]
    with pytest.raises(LongPODataError, match=r"Row 0: .*`chosen`.*found a value of type int \(5\)"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)


def test_multi_turn_short_prompt_is_validated_per_turn(tokenizer):
    row = make_two_turn_row()
    validate_row(row, 0)  # well-formed
    row["short_prompt"][1] = [SYSTEM]
    with pytest.raises(LongPODataError, match=r"Row 0: `short_prompt\[1\]` ends with a 'system' message"):
        validate_row(row, 0)


def test_streamed_bad_row_names_row_and_column(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4)
    rows[2]["prompt"] = [{"role": "user", "content": None}]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = _trainer(tokenizer, tiny_model, stream, tmp_path, max_steps=1, per_device_train_batch_size=4)
    with pytest.raises(LongPODataError, match=r"Row 2: the content of message 0 of `prompt` .*found None"):
        trainer.train()


# ------------------------------------------------------------------------------------- the central invariant (case 4)
def _merging_row() -> dict:
    """A standard-format row whose long prompt ends with 'The' and short prompt with 'The ': the answer 're is'
    merges with the long prompt's last characters ('There') but not with the short prompt's."""
    row = make_rows(1, conversational=False)[0]
    return dict(row, prompt=row["prompt"] + " The", short_prompt=row["short_prompt"] + " The ", chosen="re is")


def test_answer_tokens_must_be_the_same_for_policy_and_reference(tokenizer, tiny_model, tmp_path):
    tokenized = tokenize_row(_merging_row(), 0, tokenizer, tokenizer.eos_token)
    with pytest.raises(LongPODataError, match=r"Row 0: the `chosen` answer tokenizes differently"):
        check_answer_tokens(tokenized, 0)
    rows = make_rows(3, conversational=False)
    rows[2] = _merging_row()
    with pytest.raises(LongPODataError, match=r"Row 2: the `chosen` answer tokenizes differently"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)


def test_invariant_holds_for_well_formed_rows(tokenizer):
    """Negative control: single-turn, standard and multi-turn rows pass the check (and the check is not vacuous:
    the answers are non-empty)."""
    for index, row in enumerate(make_rows(3) + make_rows(2, conversational=False) + [make_two_turn_row(1)]):
        validate_row(row, index)
        tokenized = tokenize_row(row, index, tokenizer, tokenizer.eos_token)
        assert sum(tokenized["chosen_mask"]) > 0
        check_answer_tokens(tokenized, index)


# ------------------------------------------------------------------------------------------- empty data (case 6)
def test_empty_train_dataset(tokenizer, tiny_model, tmp_path):
    with pytest.raises(LongPODataError, match=r"The train dataset is empty \(0 rows\)"):
        _trainer(tokenizer, tiny_model, Dataset.from_list(make_rows(2)).select([]), tmp_path)


def test_drop_mode_removing_every_row(tokenizer, tiny_model, tmp_path):
    with pytest.raises(LongPODataError, match=r"removed every row of the train dataset.*max_length=5"):
        _trainer(tokenizer, tiny_model, make_rows(3), tmp_path, max_length=5, truncation_mode="drop")


def test_eval_dataset_emptied_by_dropping(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4)
    short_eval = [rows[3]]  # the longest row: dropped, while shorter train rows are kept
    probe = _trainer(tokenizer, tiny_model, rows[:1], tmp_path)
    first = probe.train_dataset[0]
    limit = len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"])) + 1
    with pytest.raises(LongPODataError, match=r"removed every row of the eval dataset"):
        _trainer(
            tokenizer, tiny_model, rows[:1], tmp_path, eval_rows=short_eval, max_length=limit, truncation_mode="drop"
        )


def test_empty_stream(tokenizer, tiny_model, tmp_path):
    empty = IterableDataset.from_generator(lambda: iter([]))
    with pytest.raises(LongPODataError, match="The streamed train dataset yields no rows"):
        _trainer(tokenizer, tiny_model, empty, tmp_path, max_steps=2)


def test_stream_with_every_row_dropped_fails_at_the_first_epoch(tokenizer, tiny_model, tmp_path):
    rows = make_rows(3)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = _trainer(tokenizer, tiny_model, stream, tmp_path, max_steps=2, max_length=5, truncation_mode="drop")
    with pytest.raises(LongPODataError, match=r"epoch of the streamed train dataset yielded no rows \(after 0 steps"):
        trainer.train()


def test_stream_with_rows_trains(tokenizer, tiny_model, tmp_path):
    """Negative control for the epoch guard: a stream with rows trains its steps."""
    rows = make_rows(2)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = _trainer(tokenizer, tiny_model, stream, tmp_path, max_steps=2, per_device_train_batch_size=2)
    trainer.train()
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------------- launch (case 9)
def test_multi_process_launch_run_as_single_jobs_is_refused(tokenizer, tiny_model, tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine without `use_cpu`: the launcher sets
    WORLD_SIZE=2 but accelerate runs each process as its own single-process job. Refused at sp=1 too."""
    args = longpo_args(tmp_path)
    assert args.distributed_state.num_processes == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes were launched but accelerate runs 1.*`use_cpu: true`"):
        _trainer(tokenizer, tiny_model, make_rows(2), tmp_path)


# ------------------------------------------------------------------------------------------- pairs (issue 19, 3)
def test_swapped_prompt_columns_are_refused_and_identical_pairs_reported(tokenizer, tiny_model, tmp_path, caplog):
    """`short_prompt` longer than `prompt` on most rows inverts the method; `chosen == rejected` gives a constant
    loss. Both trained without a word (issue 19)."""
    import logging

    from transformers.utils import logging as hf_logging

    rows = make_rows(4)
    swapped = [{**row, "prompt": row["short_prompt"], "short_prompt": row["prompt"]} for row in rows]
    with pytest.raises(LongPODataError, match=r"4 of 4 rows .* `short_prompt` longer than their `prompt`.*swapped"):
        _trainer(tokenizer, tiny_model, swapped, tmp_path)
    rows[2]["rejected"] = copy.deepcopy(rows[2]["chosen"])
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        _trainer(tokenizer, tiny_model, rows, tmp_path)  # negative control: the right columns train
    assert "1 of 4 rows of the train dataset have `chosen` == `rejected` (rows [2])" in caplog.text
    assert "swapped" not in caplog.text
