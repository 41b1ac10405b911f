"""Precompute, training, save/reload and resume (issue 2, tests 6 and 7)."""

from __future__ import annotations

import pytest
import torch
from conftest import clone, longpo_args, make_rows, make_two_turn_row
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from trl_longpo import LongPOTrainer


def _rows():
    # Arrow needs one type per column: in a dataset mixing single- and multi-turn rows, every `short_prompt` is a
    # list of message lists (one per assistant turn)
    single = [dict(r, short_prompt=[r["short_prompt"]]) for r in make_rows(6)]
    return single + [make_two_turn_row(seed=1), make_two_turn_row(seed=2)]


def _first_batch_loss(trainer) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_precompute_matches_on_the_fly_and_reuses_cache(tokenizer, tiny_model, tmp_path, monkeypatch):
    # A dataset on disk has cache files, so the precomputed reference log-probs are cached next to it (as in DPO)
    Dataset.from_list(_rows()).save_to_disk(tmp_path / "data")
    dataset = load_from_disk(str(tmp_path / "data"))
    on_the_fly = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(tmp_path, per_device_train_batch_size=8),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    calls = []
    original = LongPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(
        LongPOTrainer, "compute_ref_log_probs", lambda self, m, b: calls.append(1) or original(self, m, b)
    )
    precomputed = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(
            tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3, per_device_train_batch_size=8
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert precomputed.ref_model is None and len(calls) == 3  # ceil(8 rows / 3)
    assert "ref_chosen_logps" in precomputed.train_dataset.column_names
    assert _first_batch_loss(precomputed) == pytest.approx(_first_batch_loss(on_the_fly), abs=1e-5)
    for metric in ("logps/ref_chosen", "logps/ref_rejected", "rewards/margins"):
        assert precomputed._metrics["train"][metric][-1] == pytest.approx(
            on_the_fly._metrics["train"][metric][-1], abs=1e-5
        )
    # Second run on the same data and model: served from the cache file, no reference forward
    calls.clear()
    again = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert calls == []
    assert again.train_dataset["ref_chosen_logps"] == precomputed.train_dataset["ref_chosen_logps"]


def test_training_decreases_loss_and_reloads(tokenizer, tiny_model, tmp_path):
    trainer = LongPOTrainer(
        model=tiny_model,
        args=longpo_args(
            tmp_path,
            learning_rate=3e-3,
            warmup_steps=0,
            lr_scheduler_type="constant",
            max_steps=8,
            per_device_train_batch_size=8,
            dpo_weight=1.0,
        ),
        train_dataset=Dataset.from_list(_rows()),
        processing_class=tokenizer,
    )
    before = _first_batch_loss(trainer)
    trainer.train()
    after = _first_batch_loss(trainer)
    assert after < before - 0.1, (before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    ids = torch.tensor([reloaded_tok("The assert statement checks a condition.")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(ids).logits.log_softmax(-1)
        got = reloaded(ids).logits.log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_resume_from_checkpoint_matches_uninterrupted_run(tokenizer, tiny_model, tmp_path):
    class Interrupt(TrainerCallback):
        """Stops the run after step 2 (and its checkpoint), like a crash between two saves."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(output_dir, max_steps, resume=None, interrupt=False):
        trainer = LongPOTrainer(
            model=clone(tiny_model),
            args=longpo_args(
                tmp_path,
                output_dir=str(output_dir),
                learning_rate=1e-3,
                max_steps=max_steps,
                per_device_train_batch_size=2,
                save_strategy="steps",
                save_steps=2,
                num_train_epochs=2,
            ),
            train_dataset=Dataset.from_list(_rows()),
            processing_class=tokenizer,
            callbacks=[Interrupt()] if interrupt else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    full = run(tmp_path / "full", 6)
    run(tmp_path / "part", 6, interrupt=True)  # stops after step 2, leaves checkpoint-2
    assert not (tmp_path / "part" / "checkpoint-4").exists()
    resumed = run(tmp_path / "part", 6, resume=str(tmp_path / "part" / "checkpoint-2"))
    moved = max((full[n] - tiny_model.state_dict()[n]).abs().max().item() for n in full)
    assert moved > 1e-4  # the runs really trained
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=0, msg=name)


def test_peft_reference_is_the_base_model_on_the_short_prompt(tokenizer, tiny_model, tmp_path):
    from peft import LoraConfig

    rows = make_rows(3)
    full = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    lora = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(tmp_path, learning_rate=1e-2, max_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert lora.ref_model is None  # the reference is the base model with the adapter disabled
    batch = full.data_collator([full.train_dataset[i] for i in range(3)])
    expected = full._reference_logps(full.ref_model, batch)
    lora.train()  # the adapter moves away from zero
    got = lora._reference_logps(lora.model, batch)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():  # negative control: with the adapter enabled the same inputs score differently
        adapted = lora.model(input_ids=batch["ref_input_ids"]).logits
        base = full.ref_model(input_ids=batch["ref_input_ids"]).logits
    assert (adapted - base).abs().max() > 1e-4


def test_evaluate_reports_longpo_metrics(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4)
    trainer = LongPOTrainer(
        model=tiny_model,
        args=longpo_args(tmp_path, eval_strategy="no", per_device_eval_batch_size=2),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:2]),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_longpo_loss", "eval_nll_loss", "eval_logps/ref_chosen", "eval_rewards/margins"):
        assert key in metrics, metrics
