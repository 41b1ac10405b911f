"""Reference on the short prompt, multi-turn sums and RoPE θ (issue 2, tests 2 and 5)."""

from __future__ import annotations

import pytest
import torch
from conftest import clone, longpo_args, make_rows, make_two_turn_row
from datasets import Dataset

from trl_longpo import LongPOTrainer
from trl_longpo.tiny import build_tiny_model


def answer_logp(model, tokenizer, prompt: list[dict], answer: dict) -> float:
    """log p(answer | prompt) from the plain forward of `model`, tokenized with the chat template only."""
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(prompt + [answer], tokenize=True, return_dict=True)["input_ids"]
    prefix = prefix["input_ids"]
    assert full[: len(prefix)] == prefix
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prefix) - 1 :].sum().item()


def _batch(trainer, rows=None):
    dataset = (
        trainer.train_dataset
        if rows is None
        else trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, "test")
    )
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def _policy_logps(trainer, batch) -> torch.Tensor:
    trainer.compute_loss(trainer.model, batch)
    return torch.tensor(trainer._metrics["train"]["logps/chosen"][-1])


def test_reference_scores_short_prompt_and_ignores_long_prompt(tokenizer, tiny_model, tmp_path):
    rows = make_rows(3)
    initial = clone(tiny_model)  # the reference is the frozen initial model
    trainer = LongPOTrainer(
        model=tiny_model, args=longpo_args(tmp_path), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = _batch(trainer)
    ref_chosen, ref_rejected = trainer._reference_logps(trainer.ref_model, batch)
    expected_chosen = [answer_logp(initial, tokenizer, r["short_prompt"], r["chosen"][0]) for r in rows]
    expected_rejected = [answer_logp(initial, tokenizer, r["short_prompt"], r["rejected"][0]) for r in rows]
    torch.testing.assert_close(
        ref_chosen.double(), torch.tensor(expected_chosen, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        ref_rejected.double(), torch.tensor(expected_rejected, dtype=torch.float64), atol=1e-4, rtol=0
    )
    # Scored on the long prompt the same answers get other log-probs: the test can tell the prompts apart
    long_chosen = [answer_logp(initial, tokenizer, r["prompt"], r["chosen"][0]) for r in rows]
    assert max(abs(a - b) for a, b in zip(long_chosen, expected_chosen)) > 1e-2

    # Change only the long prompt: the reference is unchanged, the policy is not
    changed = [
        dict(r, prompt=[{"role": "user", "content": "A different document entirely.\n\n" + r["prompt"][0]["content"]}])
        for r in rows
    ]
    batch2 = _batch(trainer, changed)
    ref_chosen2, ref_rejected2 = trainer._reference_logps(trainer.ref_model, batch2)
    torch.testing.assert_close(ref_chosen2, ref_chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref_rejected2, ref_rejected, atol=1e-6, rtol=0)
    assert abs(_policy_logps(trainer, batch2) - _policy_logps(trainer, batch)) > 1e-3


def test_multi_turn_logps_are_sums_of_single_turn_pieces(tokenizer, tiny_model, tmp_path):
    row = make_two_turn_row()
    initial = clone(tiny_model)
    policy = clone(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    frozen_policy = clone(policy)
    trainer = LongPOTrainer(
        model=policy,
        ref_model=clone(initial),
        args=longpo_args(tmp_path),
        train_dataset=Dataset.from_list([row]),
        processing_class=tokenizer,
    )
    batch = _batch(trainer)
    assert batch["ref_input_ids"].shape[0] == 4  # 2 turns × (chosen, rejected)

    for side in ("chosen", "rejected"):
        conversation = row["prompt"] + row[side]
        # Policy: answer 1 after the long prompt, answer 2 after the long conversation so far
        policy_expected = answer_logp(frozen_policy, tokenizer, row["prompt"], row[side][0]) + answer_logp(
            frozen_policy, tokenizer, conversation[:3], row[side][2]
        )
        ref_expected = answer_logp(initial, tokenizer, row["short_prompt"][0], row[side][0]) + answer_logp(
            initial, tokenizer, row["short_prompt"][1], row[side][2]
        )
        trainer.compute_loss(trainer.model, batch)
        got_policy = trainer._metrics["train"][f"logps/{side}"][-1]
        got_ref = trainer._metrics["train"][f"logps/ref_{side}"][-1]
        assert got_policy == pytest.approx(policy_expected, abs=1e-4)
        assert got_ref == pytest.approx(ref_expected, abs=1e-4)
        # The follow-up user turn is context, not answer: counting it would change the sum
        with_user_turn = policy_expected + answer_logp(frozen_policy, tokenizer, conversation[:2], conversation[2])
        assert abs(got_policy - with_user_turn) > 1e-2


def test_policy_rope_theta_applies_to_policy_only(tokenizer, tmp_path):
    rows = make_rows(2)
    base = build_tiny_model(seed=3)
    theta = 1e7
    trainer = LongPOTrainer(
        model=clone(base),
        args=longpo_args(tmp_path, policy_rope_theta=theta),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # An independently built model with θ = 1e7 in its config and the same weights
    rescaled = build_tiny_model(seed=3, rope_parameters={"rope_type": "default", "rope_theta": theta})
    rescaled.load_state_dict(base.state_dict())
    assert trainer.model.config.rope_parameters["rope_theta"] == theta
    assert trainer.ref_model.config.rope_parameters["rope_theta"] == base.config.rope_parameters["rope_theta"]
    batch = _batch(trainer)
    trainer.compute_loss(trainer.model, batch)
    logps = trainer._metrics["train"]["logps/chosen"][-1]
    expected = sum(answer_logp(rescaled, tokenizer, r["prompt"], r["chosen"][0]) for r in rows) / len(rows)
    original = sum(answer_logp(base, tokenizer, r["prompt"], r["chosen"][0]) for r in rows) / len(rows)
    assert logps == pytest.approx(expected, abs=1e-4)
    assert abs(expected - original) > 1e-3
    ref = trainer._metrics["train"]["logps/ref_chosen"][-1]
    expected_ref = sum(answer_logp(base, tokenizer, r["short_prompt"], r["chosen"][0]) for r in rows) / len(rows)
    assert ref == pytest.approx(expected_ref, abs=1e-4)


def _precomputed(model, tokenizer, dataset, tmp_path) -> list[float]:
    args = longpo_args(tmp_path, precompute_ref_log_probs=True, per_device_train_batch_size=2)
    trainer = LongPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer.train_dataset["ref_chosen_logps"]


def test_precomputed_reference_cache_is_keyed_on_the_reference_config(tokenizer, tmp_path):
    """Same reference weights, another RoPE config: the cached log-probs of the first must not be reused (issue 19:
    DPOTrainer keys the cache on the dataset and the weights only). A damaged cache file is named, with the fix."""
    from datasets import load_from_disk

    from trl_longpo.modeling import set_rope_theta
    from trl_longpo.tokenization import LongPODataError

    Dataset.from_list(make_rows(4)).save_to_disk(str(tmp_path / "data"))  # on disk: DPOTrainer caches next to it
    model = build_tiny_model(seed=0)
    stretched = clone(model)
    set_rope_theta(stretched, 1e3)
    first = _precomputed(model, tokenizer, load_from_disk(str(tmp_path / "data")), tmp_path)
    assert _precomputed(clone(model), tokenizer, load_from_disk(str(tmp_path / "data")), tmp_path) == first  # reused
    cached = _precomputed(stretched, tokenizer, load_from_disk(str(tmp_path / "data")), tmp_path)
    fresh = _precomputed(clone(stretched), tokenizer, Dataset.from_list(make_rows(4)), tmp_path)  # no cache in memory
    assert cached == pytest.approx(fresh, abs=1e-5) and cached != pytest.approx(first, abs=1e-3)

    cache_files = [p for p in (tmp_path / "data").glob("cache-*.arrow") if "ref_chosen_logps" in Dataset.from_file(str(p)).column_names]
    assert len(cache_files) == 2
    for path in cache_files:
        path.write_bytes(path.read_bytes()[:100])  # a kill while writing it
    with pytest.raises(LongPODataError, match=r"cached reference log-probs .*cache-.*\.arrow cannot be used.*Delete"):
        _precomputed(clone(model), tokenizer, load_from_disk(str(tmp_path / "data")), tmp_path)
