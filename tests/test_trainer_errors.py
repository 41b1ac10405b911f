"""Bad input gets a clear error naming the field, row or option (issue 2, test 8)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import longpo_args, make_rows, make_two_turn_row
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM
from trl import DPOConfig

from trl_longpo import LongPOConfig, LongPOTrainer
from trl_longpo.tokenization import LongPODataError


def _trainer(tokenizer, model, rows, tmp_path, **config):
    return LongPOTrainer(
        model=model,
        args=longpo_args(tmp_path, **config),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def test_missing_short_prompt_column(tokenizer, tiny_model, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "short_prompt"} for r in make_rows(2)]
    with pytest.raises(LongPODataError, match=r"missing the column\(s\) \['short_prompt'\]"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_empty_answers(tokenizer, tiny_model, tmp_path, field):
    rows = make_rows(3)
    rows[2][field] = [{"role": "assistant", "content": "  "}]
    with pytest.raises(LongPODataError, match=rf"Row 2: the content of message 0 of `{field}` .*empty string"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)
    standard = make_rows(3, conversational=False)
    standard[1][field] = ""
    with pytest.raises(LongPODataError, match=rf"Row 1: `{field}` .*empty string"):
        _trainer(tokenizer, tiny_model, standard, tmp_path)


def test_multi_turn_short_prompt_count_mismatch(tokenizer, tiny_model, tmp_path):
    row = make_two_turn_row()
    row["short_prompt"] = row["short_prompt"][:1] * 3
    with pytest.raises(LongPODataError, match=r"Row 0: `short_prompt` holds 3 short prompt\(s\) but `chosen` has 2"):
        _trainer(tokenizer, tiny_model, [row], tmp_path)


def test_multi_turn_follow_up_instructions_must_match(tokenizer, tiny_model, tmp_path):
    row = make_two_turn_row()
    row["rejected"][1] = {"role": "user", "content": "A different question?"}
    with pytest.raises(LongPODataError, match="follow-up user turns"):
        _trainer(tokenizer, tiny_model, [row], tmp_path)


def test_short_prompt_format_must_match_prompt(tokenizer, tiny_model, tmp_path):
    rows = [dict(r, short_prompt=r["short_prompt"][0]["content"]) for r in make_rows(2)]  # a string, not messages
    with pytest.raises(LongPODataError, match="Row 0: `short_prompt` must be a message list"):
        _trainer(tokenizer, tiny_model, rows, tmp_path)


def test_long_prompt_over_max_length_is_an_error_by_default(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4)
    with pytest.raises(LongPODataError, match=r"exceed max_length=60: row 0 \(long \d+, short \d+ tokens\)") as info:
        _trainer(tokenizer, tiny_model, rows, tmp_path, max_length=60)
    assert "truncation_mode='drop'" in str(info.value)


def test_drop_mode_drops_and_logs(tokenizer, tiny_model, tmp_path, caplog):
    rows = make_rows(4)
    lengths = []
    probe = _trainer(tokenizer, tiny_model, rows, tmp_path)
    for ex in probe.train_dataset:
        lengths.append(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])))
    limit = sorted(lengths)[1]  # keeps the two shortest rows
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tokenizer, tiny_model, rows, tmp_path, max_length=limit, truncation_mode="drop")
    assert len(trainer.train_dataset) == 2
    assert all(
        len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= limit
        for ex in trainer.train_dataset
    )
    assert "Dropped 2 of 4 rows" in caplog.text


def test_non_causal_model_is_refused(tokenizer, tmp_path):
    bert = BertForMaskedLM(
        BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="BertForMaskedLM, not a decoder-only causal language model"):
        _trainer(tokenizer, bert, make_rows(2), tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": ["sigmoid", "sft"]}, "conflicts with LongPO"),
        ({"ld_alpha": 0.5}, "ld_alpha"),
        ({"dpo_weight": 0.0, "nll_weight": 0.0}, "both 0"),
        ({"nll_scope": "tokens"}, "nll_scope"),
        ({"truncation_mode": "keep_start"}, "truncation_mode='keep_start'"),
        ({"sync_ref_model": True}, "sync_ref_model"),
        ({"dpo_weight": -1.0}, "non-negative"),
        ({"policy_rope_theta": -5.0}, "policy_rope_theta"),
    ],
)
def test_conflicting_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", **options)


def test_dpo_config_is_refused(tokenizer, tiny_model, tmp_path):
    with pytest.raises(TypeError, match="must be a `LongPOConfig`"):
        LongPOTrainer(
            model=tiny_model,
            args=DPOConfig(output_dir=str(tmp_path), bf16=False),
            train_dataset=Dataset.from_list(make_rows(2)),
            processing_class=tokenizer,
        )


# ----------------------------------------------------------------------------- sequence parallelism and kernels
def test_sequence_parallel_needs_a_world_divisible_by_sp(tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by sequence_parallel_size 2"):
        _trainer(tokenizer, tiny_model, make_rows(2), tmp_path, sequence_parallel_size=2)


def test_sliding_window_model_is_refused_under_ring_attention(tokenizer, tmp_path, monkeypatch):
    from trl_longpo.attention import interface
    from trl_longpo.tiny import build_tiny_model

    monkeypatch.setattr(interface, "_warned_sliding_window", False)  # the warning is once per process

    windowed = build_tiny_model(sliding_window=4096)
    with pytest.raises(ValueError, match=r"sliding_window=4096.*ring_ignore_sliding_window=True"):
        _trainer(tokenizer, windowed, make_rows(2), tmp_path, sequence_parallel_size=2)
    # The explicit override passes the model check (and then stops at the world size, as this test is not distributed)
    with pytest.warns(UserWarning, match="ignores the model's sliding window"):
        with pytest.raises(ValueError, match="world size 1"):
            _trainer(
                tokenizer,
                build_tiny_model(sliding_window=4096),
                make_rows(2),
                tmp_path,
                sequence_parallel_size=2,
                ring_ignore_sliding_window=True,
            )


def test_heads_stride_must_divide_kv_heads(tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"ring_heads_k_stride=3 must be a positive divisor .* \(2\)"):
        _trainer(
            tokenizer,
            tiny_model,
            make_rows(2),
            tmp_path,
            sequence_parallel_size=2,
            ring_attn_impl="llama3",
            ring_heads_k_stride=3,
        )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sequence_parallel_size": 0}, "sequence_parallel_size"),
        ({"ring_attn_impl": "stripe"}, "ring_attn_impl"),
        ({"sequence_parallel_reference": "shared"}, "sequence_parallel_reference"),
        ({"sequence_parallel_size": 2, "padding_free": True}, "padding_free"),
    ],
)
def test_conflicting_sequence_parallel_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", **options)


def test_local_reference_needs_a_separate_reference_model(tokenizer, tiny_model, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="sequence_parallel_reference='local'"):
        LongPOTrainer(
            model=tiny_model,
            args=longpo_args(tmp_path, sequence_parallel_size=2, sequence_parallel_reference="local"),
            train_dataset=Dataset.from_list(make_rows(2)),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"]),
        )


def test_liger_is_refused_without_a_gpu(tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel=True` needs a CUDA GPU"):
        _trainer(tokenizer, tiny_model, make_rows(2), tmp_path, use_liger_kernel=True)


@pytest.mark.parametrize(
    ("sizes", "instead"),
    [({"cp_size": 2}, "sequence_parallel_size=2"), ({"sp_size": 4}, "sequence_parallel_size=4, ulysses_degree=4")],
)
def test_accelerate_context_and_sequence_parallelism_are_refused(tmp_path, monkeypatch, sizes, instead):
    from accelerate.parallelism_config import ParallelismConfig

    name = next(iter(sizes))
    with pytest.raises(ValueError, match=rf"parallelism_config \({name}=\d\) is not supported.*{instead}\) instead"):
        longpo_args(tmp_path, parallelism_config=ParallelismConfig(**sizes))
    # the same from `accelerate launch` with a parallelism_config section (it exports these variables)
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv(f"PARALLELISM_CONFIG_{name.upper()}", str(sizes[name]))
    with pytest.raises(ValueError, match=rf"trl-longpo's sequence parallelism replaces it.*{instead}\) instead"):
        longpo_args(tmp_path)
    monkeypatch.setenv(f"PARALLELISM_CONFIG_{name.upper()}", "1")  # sizes of 1: nothing to refuse
    assert longpo_args(tmp_path).parallelism_config is None


def test_moe_under_shared_prompt_names_the_working_setting(tokenizer, tmp_path):
    """The refusal names `router_aux_loss_coef=0` (issue 19), which the trainer then accepts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=2048,
    )  # fmt: skip
    model = MixtralForCausalLM(config)  # fp32: the grouped expert matmul has no fp64 kernel
    with pytest.raises(ValueError, match=r"MoE router auxiliary loss.*Set `router_aux_loss_coef=0`"):
        _trainer(tokenizer, model, make_rows(2), tmp_path, share_prompt=True)
    losses = []
    for share_prompt in (True, False):  # with the coefficient at 0, shared equals unshared
        trainer = _trainer(
            tokenizer, model, make_rows(2), tmp_path, share_prompt=share_prompt, router_aux_loss_coef=0.0, beta=0.5
        )
        assert not trainer.aux_loss_enabled
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        with trainer.scorer.step_attention(trainer.model, trainer.ref_model), torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
