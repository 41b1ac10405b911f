"""LongPO against TRL's own DPOTrainer and closed forms (issue 2, tests 1, 3 and 4)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import clone, longpo_args, make_rows, perturbed
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trl_longpo import LongPOTrainer


def _dpo_trainer(model, tokenizer, rows, tmp_path, ref_model=None, **config):
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        per_device_train_batch_size=len(rows),
        disable_tqdm=True,
        **config,
    )
    dpo_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    # DPOTrainer would reload the reference from `config._name_or_path`, which a model built in memory lacks
    return DPOTrainer(
        model=model,
        ref_model=clone(model) if ref_model is None else ref_model,
        args=args,
        train_dataset=Dataset.from_list(dpo_rows),
        processing_class=tokenizer,
    )


def _loss_and_grads(trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(loss_a, grads_a, loss_b, grads_b, tol=1e-6):
    assert abs(loss_a.item() - loss_b.item()) <= tol, (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=0, msg=name)


@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
def test_reduces_to_dpo_sigmoid(tokenizer, tiny_model, tmp_path, conversational):
    rows = make_rows(4, conversational=conversational, short_equals_long=True)
    dpo = _dpo_trainer(clone(tiny_model), tokenizer, rows, tmp_path)
    longpo = LongPOTrainer(
        model=clone(tiny_model),
        args=longpo_args(tmp_path, nll_weight=0.0, dpo_weight=1.0, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    dpo_loss, dpo_grads = _loss_and_grads(dpo)
    loss, grads = _assert_inputs_and_run(longpo, dpo)
    _assert_same(loss, grads, dpo_loss, dpo_grads)
    # Take a real step away from the reference so that the comparison is not only at log 2
    assert dpo_loss.item() == pytest.approx(math.log(2), abs=1e-6)


def _assert_inputs_and_run(longpo, dpo):
    # The policy inputs are DPOTrainer's, token for token
    for i in range(len(dpo.train_dataset)):
        a, b = longpo.train_dataset[i], dpo.train_dataset[i]
        assert a["prompt_ids"] == b["prompt_ids"] and a["chosen_ids"] == b["chosen_ids"]
        assert a["rejected_ids"] == b["rejected_ids"]
    return _loss_and_grads(longpo)


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("conversational", [True, False], ids=["conversational", "standard"])
def test_reduces_to_dpo_away_from_reference(tokenizer, tiny_model, tmp_path, conversational, share_prompt):
    """Same check with a policy that differs from the reference, so the loss is not the trivial log 2. LongPO sums
    each row's fp32 token log-probs in fp64 (DPOTrainer in fp32) and, shared, runs other fp32 attention kernels (CPU
    flash vs SDPA): rounding differences only, 1e-5 here; exact parity is asserted in fp64 in test_shared_prompt.py."""
    rows = make_rows(3, conversational=conversational, short_equals_long=True, seed=1)
    policy = perturbed(tiny_model)  # not the reference, so losses are not the trivial log 2
    dpo = _dpo_trainer(
        clone(policy),
        tokenizer,
        rows,
        tmp_path,
        ref_model=clone(tiny_model),
        beta=0.5,
    )
    longpo = LongPOTrainer(
        model=clone(policy),
        ref_model=clone(tiny_model),
        args=longpo_args(tmp_path, nll_weight=0.0, dpo_weight=1.0, beta=0.5, share_prompt=share_prompt),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    dpo_loss, dpo_grads = _loss_and_grads(dpo)
    loss, grads = _loss_and_grads(longpo)
    assert abs(dpo_loss.item() - math.log(2)) > 1e-3
    _assert_same(loss, grads, dpo_loss, dpo_grads, tol=1e-5)


def test_step0_longpo_term_is_log2(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4, short_equals_long=True)
    trainer = LongPOTrainer(
        model=tiny_model,
        args=longpo_args(tmp_path, nll_weight=0.0, dpo_weight=1.0),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    loss, _ = _loss_and_grads(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert trainer._metrics["train"]["longpo_loss"][-1] == pytest.approx(math.log(2), abs=1e-6)


def test_short_prompt_moves_step0_loss_away_from_log2(tokenizer, tiny_model, tmp_path):
    """Negative control for the test above: a real short prompt changes the reference, so the loss is not log 2."""
    trainer = LongPOTrainer(
        model=tiny_model,
        args=longpo_args(tmp_path, nll_weight=0.0, dpo_weight=1.0, beta=1.0),
        train_dataset=Dataset.from_list(make_rows(4)),
        processing_class=tokenizer,
    )
    loss, _ = _loss_and_grads(trainer)
    assert abs(loss.item() - math.log(2)) > 1e-3


def _independent_nll(model, tokenizer, row, scope: str) -> tuple[float, int]:
    """Sum of token NLL and token count of the chosen long sequence, from the plain model forward."""
    prompt_ids = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    if scope == "completion":
        logp = logp[len(prompt_ids) - 1 :]
    return -logp.sum().item(), logp.numel()


@pytest.mark.parametrize("scope", ["sequence", "completion"])
def test_nll_scopes_match_definition(tokenizer, tiny_model, tmp_path, scope):
    rows = make_rows(3)
    reference = clone(tiny_model)
    trainer = LongPOTrainer(
        model=tiny_model,
        args=longpo_args(tmp_path, nll_weight=1.0, dpo_weight=0.0, nll_scope=scope),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    loss, _ = _loss_and_grads(trainer)
    sums = [_independent_nll(reference, tokenizer, r, scope) for r in rows]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)  # token mean over the batch, pads excluded
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    other = "completion" if scope == "sequence" else "sequence"
    other_sums = [_independent_nll(reference, tokenizer, r, other) for r in rows]
    assert abs(loss.item() - sum(s for s, _ in other_sums) / sum(n for _, n in other_sums)) > 1e-3


def test_completion_nll_equals_dpo_sigmoid_plus_sft(tokenizer, tiny_model, tmp_path):
    rows = make_rows(4, short_equals_long=True, seed=2)
    policy = perturbed(tiny_model)  # not the reference, so losses are not the trivial log 2
    dpo_weight, nll_weight = 0.3, 0.7
    dpo = _dpo_trainer(
        clone(policy),
        tokenizer,
        rows,
        tmp_path,
        ref_model=clone(tiny_model),
        loss_type=["sigmoid", "sft"],
        loss_weights=[dpo_weight, nll_weight],
    )
    longpo = LongPOTrainer(
        model=clone(policy),
        ref_model=clone(tiny_model),
        args=longpo_args(tmp_path, nll_weight=nll_weight, dpo_weight=dpo_weight, nll_scope="completion"),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    _assert_same(*_loss_and_grads(longpo), *_loss_and_grads(dpo))
