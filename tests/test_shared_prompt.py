"""share_prompt=True (one tree per pair) against share_prompt=False (DPOTrainer's two sequences) on the same rows:
loss, every logged metric and every parameter gradient; negative controls that must break that parity."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import longpo_args, make_rows, make_two_turn_row, wide_tiny_model
from datasets import Dataset

import trl_longpo.attention.tree as tree_module
import trl_longpo.scoring as scoring_module
from trl_longpo import LongPOTrainer
from trl_longpo.attention.tree import Block
from trl_longpo.packing import pack_shared_prompts, pair_groups
from trl_longpo.tiny import build_tiny_model

FP64_REL = 1e-6


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _run(tokenizer, rows, tmp_path, share_prompt, dtype=torch.float64, peft=False, **config):
    """Loss, logged metrics and parameter gradients of one step on all rows."""
    from peft import LoraConfig

    base = wide_tiny_model(dtype=dtype)
    kwargs = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])} if peft else {}
    if not peft and not config.get("precompute_ref_log_probs"):
        kwargs["ref_model"] = copy.deepcopy(base)  # the policy moves away from the reference: non-trivial rewards
    trainer = LongPOTrainer(
        model=_perturb(copy.deepcopy(base)) if not peft else base,
        args=longpo_args(
            tmp_path / str(share_prompt), share_prompt=share_prompt, per_device_train_batch_size=len(rows), **config
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        **kwargs,
    )
    if peft:
        with torch.no_grad():  # a LoRA adapter starts at zero; move it so that policy and reference differ
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(0))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trainer.model.zero_grad()
    with trainer.scorer.step_attention(trainer.model, trainer.ref_model):
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _compare(shared, unshared) -> dict[str, float]:
    """Relative error of every compared quantity (loss, each metric, each gradient)."""
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = shared, unshared
    assert metrics_a.keys() == metrics_b.keys() and grads_a.keys() == grads_b.keys() and grads_a
    errors = {"loss": _rel(loss_a, loss_b)}
    errors.update({f"metric {k}": _rel(metrics_a[k], metrics_b[k]) for k in metrics_b})
    errors.update({f"grad {k}": _rel(grads_a[k], grads_b[k]) for k in grads_b})
    return errors


def _rows(kind: str) -> list[dict]:
    if kind == "multi_turn":
        return [make_two_turn_row(seed=0), make_two_turn_row(seed=5)]
    return make_rows(3, conversational=kind == "conversational")


CASES = {
    "conversational": ("conversational", {}),
    "standard": ("standard", {}),
    "multi_turn": ("multi_turn", {}),
    "rope_theta": ("conversational", {"policy_rope_theta": 1e6}),
    "completion_nll": ("standard", {"nll_scope": "completion"}),
    "precompute": ("multi_turn", {"precompute_ref_log_probs": True}),
    "peft": ("conversational", {"peft": True}),
    "peft_precompute_rope": ("multi_turn", {"peft": True, "precompute_ref_log_probs": True, "policy_rope_theta": 1e5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_equals_unshared_fp64(tokenizer, tmp_path, case):
    kind, config = CASES[case]
    rows = _rows(kind)
    config = {"dpo_weight": 1.0, "beta": 0.5, **config}
    errors = _compare(
        _run(tokenizer, rows, tmp_path, True, **config), _run(tokenizer, rows, tmp_path, False, **config)
    )
    worst = max(errors, key=errors.get)
    assert errors[worst] <= FP64_REL, (worst, errors[worst])


def test_shared_bf16_error_within_twice_the_unshared_bf16_error(tokenizer, tmp_path):
    """bf16 has no exact parity; both paths are judged against the fp64 result."""
    rows = _rows("conversational")
    exact = _run(tokenizer, rows, tmp_path, False)
    shared = _compare(_run(tokenizer, rows, tmp_path, True, dtype=torch.bfloat16), exact)
    unshared = _compare(_run(tokenizer, rows, tmp_path, False, dtype=torch.bfloat16), exact)
    for key in ("loss", "metric logps/chosen", "metric logps/rejected", "metric nll_loss"):
        assert shared[key] <= 2 * unshared[key] + 1e-3, (key, shared[key], unshared[key])
    grad_keys = [k for k in shared if k.startswith("grad")]
    assert max(shared[k] for k in grad_keys) <= 2 * max(unshared[k] for k in grad_keys)


def _rejected_sees_chosen(trees):
    """Broken tree: every tree attended as one causal sequence (the rejected branch sees the chosen one)."""
    blocks, offset = [], 0
    for t in trees:
        blocks.append(Block(offset, t.length, offset, t.length, causal=True))
        offset += t.length
    return blocks


def _positions_after_chosen(*args, **kwargs):
    """Broken packing: the rejected branch's positions continue after the chosen answer, not after the prompt."""
    packed = pack_shared_prompts(*args, **kwargs)
    positions, offset = packed.position_ids.clone(), 0
    for t in packed.trees:
        start = offset + t.trunk + t.branches[0]
        positions[start : start + t.branches[1]] += t.branches[0] - 1
        offset += t.length
    return dataclasses.replace(packed, position_ids=positions)


@pytest.mark.parametrize("broken", ["rejected_sees_chosen", "positions_after_chosen"])
def test_negative_controls_break_parity(tokenizer, tmp_path, monkeypatch, broken):
    rows = _rows("conversational")
    config = {"dpo_weight": 1.0, "beta": 0.5}
    unshared = _run(tokenizer, rows, tmp_path, False, **config)
    if broken == "rejected_sees_chosen":
        monkeypatch.setattr(tree_module, "tree_blocks", _rejected_sees_chosen)
    else:
        monkeypatch.setattr(scoring_module, "pack_shared_prompts", _positions_after_chosen)
    errors = _compare(_run(tokenizer, rows, tmp_path, True, **config), unshared)
    assert errors["metric logps/rejected"] > 1e-3, errors["metric logps/rejected"]
    assert errors["metric logps/chosen"] <= FP64_REL  # only the rejected branch is broken


def test_packing_layout_and_fork():
    """Prompt [5 6 7], chosen [8 9], rejected [10]: trunk [5 6], each branch starts with the last prompt token 7."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 10, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    answers = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    packed = pack_shared_prompts(ids, attention, [answers], pair_groups([3]))
    assert packed.input_ids.tolist() == [5, 6, 7, 8, 9, 7, 10]
    assert packed.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert packed.targets.tolist() == [6, 7, 8, 9, -100, 10, -100]  # the fork: position 2 predicts 8, its copy 10
    assert packed.row_index.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert packed.masks[0].tolist() == [False, False, True, True, False, True, False]
    assert [(t.trunk, t.branches) for t in packed.trees] == [(2, (3, 2))]


def test_packing_refuses_what_it_cannot_share():
    ids = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 10]])
    attention = torch.ones_like(ids)
    with pytest.raises(ValueError, match="same 3 prompt tokens"):
        pack_shared_prompts(ids, attention, [], pair_groups([3]))
    same = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 10]])
    with pytest.raises(ValueError, match="scored token inside the prompt"):
        pack_shared_prompts(same, attention, [torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])], pair_groups([3]))
    with pytest.raises(ValueError, match="right-padded"):
        pack_shared_prompts(same, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), [], pair_groups([3]))


def test_share_prompt_refuses_models_it_cannot_pack(tokenizer, tmp_path):
    rows = make_rows(2)
    with pytest.raises(ValueError, match="share_prompt.*sliding"):
        LongPOTrainer(
            model=build_tiny_model(sliding_window=16),
            args=longpo_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    # the unshared path takes the same model
    LongPOTrainer(
        model=build_tiny_model(sliding_window=16),
        args=longpo_args(tmp_path, share_prompt=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def test_model_keeps_its_attention_outside_training_steps(tokenizer, tmp_path):
    trainer = LongPOTrainer(
        model=build_tiny_model(attn_implementation="sdpa"),
        args=longpo_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(make_rows(4)),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.model.config._attn_implementation == "sdpa"
    assert trainer.model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 1024)


def test_gradient_checkpointing_needs_the_packed_attention_through_backward(tokenizer, tmp_path):
    """With checkpointing, layers are recomputed in backward: a loss computed outside `training_step` would recompute
    them with the model's own (causal) attention, so it is refused; inside the packed attention it runs."""
    trainer = LongPOTrainer(
        model=build_tiny_model(attn_implementation="sdpa"),
        args=longpo_args(tmp_path, gradient_checkpointing=True),
        train_dataset=Dataset.from_list(make_rows(2)),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.activation_checkpointing_enable()  # what Trainer.train does with gradient_checkpointing=True
    trainer.model.train()
    with pytest.raises(RuntimeError, match="inside `training_step`"):
        trainer.compute_loss(trainer.model, batch)
    with trainer.scorer.step_attention(trainer.model):  # what `training_step` wraps around forward and backward
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    assert torch.isfinite(loss) and trainer.model.model.embed_tokens.weight.grad is not None
