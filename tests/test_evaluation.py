"""Retention monitoring (issue 7, part 2): probes, scoring, greedy retrieval, short drift/KL and the callback."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import clone, longpo_args, make_rows, perturbed, wide_tiny_model
from datasets import Dataset

from trl_longpo import LongPOConfig, LongPOTrainer, RetentionCallback
from trl_longpo.evaluation import (
    RetrievalProbe,
    build_retrieval_probes,
    evaluate_retrieval,
    score_retrieval,
    short_retention_metrics,
    short_retention_rows,
)
from trl_longpo.evaluation.retention import greedy_decode
from trl_longpo.tokenization import tokenize_prompt

KEYS = ("eval_long/acc@64", "eval_long/acc@128", "eval_short/acc@64", "eval_short/logp_drift", "eval_short/kl")


def _needle_token_position(tokenizer, probe: RetrievalProbe, needle: str) -> int:
    """Index of the needle's first token in the tokenized prompt, found through character offsets."""
    rendered = tokenizer.apply_chat_template(probe.prompt, tokenize=False, add_generation_prompt=True)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == tokenize_prompt(tokenizer, probe.prompt)
    start = rendered.index(needle)
    return sum(1 for s, _ in encoding["offset_mapping"] if s < start)


# ---------------------------------------------------------------------------------------------------- probes
def test_probes_fit_the_length_and_hold_the_needle_at_its_depth(tokenizer):
    probes = build_retrieval_probes(tokenizer, [256, 1024], 5, seed=3)
    assert [p.length for p in probes] == [256] * 5 + [1024] * 5
    assert [p.depth for p in probes[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for probe in probes:
        n = len(tokenize_prompt(tokenizer, probe.prompt))
        assert probe.length - max(4, probe.length // 100) <= n <= probe.length, (probe.length, n)
        content = probe.prompt[0]["content"]
        match = re.search(r"The secret number of (.+?) is (\d+)\.", content)
        assert match and match.group(2) == probe.answer and content.count(probe.answer) == 1
        assert content.endswith(f"What is the secret number of {match.group(1)}? Answer with the number only.")
        # Depth is a fraction of the haystack (the prompt less template, needle and question)
        haystack = content[: content.rindex("\n\n")].replace(match.group(0), "")
        haystack_tokens = len(tokenizer(haystack, add_special_tokens=False)["input_ids"])
        assert haystack_tokens >= probe.length - 64
        expected = probe.depth * haystack_tokens
        assert abs(probe.needle_token_start - expected) <= 0.02 * haystack_tokens + 3, (probe, haystack_tokens)
        # ... and the needle really starts there in the tokenized prompt (after the template's 2-token prefix)
        position = _needle_token_position(tokenizer, probe, match.group(0))
        assert 0 <= position - probe.needle_token_start <= 3, (position, probe.needle_token_start)


def test_probes_plain_text_and_user_documents(tokenizer):
    documents = [f"Paragraph {i} talks about apples and pears. It has two sentences." for i in range(200)]
    probes = build_retrieval_probes(tokenizer, [300], 3, documents=documents, chat=False, depths=[0.5])
    for probe in probes:
        assert isinstance(probe.prompt, str) and "apples and pears" in probe.prompt
        assert 300 - 4 <= len(tokenize_prompt(tokenizer, probe.prompt)) <= 300
        assert probe.depth == 0.5 and f"is {probe.answer}." in probe.prompt


def test_probes_are_deterministic_in_the_seed(tokenizer):
    a = build_retrieval_probes(tokenizer, [128, 256], 3, seed=1)
    assert a == build_retrieval_probes(tokenizer, [128, 256], 3, seed=1)
    b = build_retrieval_probes(tokenizer, [128, 256], 3, seed=2)
    assert all(x.prompt != y.prompt and x.length == y.length for x, y in zip(a, b))
    # A length's probes do not depend on which other lengths are asked for
    assert build_retrieval_probes(tokenizer, [256], 3, seed=1) == a[3:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lengths": [512], "documents": ["One short document. " * 10]}, "documents hold only"),
        ({"lengths": [12]}, "too short"),
        ({"lengths": []}, "`lengths` is empty"),
        ({"lengths": [128], "depths": [1.5]}, "`depths`"),
        ({"lengths": [128], "documents": ["", "  "]}, "no non-empty text"),
        ({"lengths": [128], "needle_template": "no value here about {key}"}, "`needle_template`"),
    ],
)
def test_probe_errors_name_the_option(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_retrieval_probes(tokenizer, probes_per_length=2, **kwargs)


# ---------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize(
    "generated, expected, hit",
    [
        ("48213", "48213", True),
        (" 48213.</s>", "48213", True),
        ("The secret number is 48213, I think", "48213", True),
        ("4821", "48213", False),
        ("482130", "48213", False),
        ("48,213", "48213", False),
        ("12345 48213", "48213", False),
        ("", "48213", False),
        ("no number at all", "48213", False),
        ("Paris is the capital", "Paris", True),
        ("The capital is Paris", "Paris", False),
        ("Parisian", "Paris", False),
    ],
)
def test_score_retrieval_is_exact(generated, expected, hit):
    assert score_retrieval(generated, expected) is hit


def _manual_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Independent greedy loop: the full sequence through the model at every step, argmax of the last logits."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
    return out


def test_evaluate_retrieval_matches_an_independent_greedy_loop(tokenizer):
    model = wide_tiny_model()
    probes = build_retrieval_probes(tokenizer, [96, 128], 1, seed=5)
    prompts = [tokenize_prompt(tokenizer, p.prompt) for p in probes]
    expected = [_manual_greedy(model, ids, 6) for ids in prompts]
    # The KV-cache decoder, one probe at a time and left-padded in one batch, gives the same tokens
    with torch.no_grad():
        assert greedy_decode(model, prompts[:1], 6, tokenizer.pad_token_id).tolist() == expected[:1]
        assert greedy_decode(model, prompts, 6, tokenizer.pad_token_id).tolist() == expected
    text = tokenizer.decode(expected[0], skip_special_tokens=True)
    words = re.findall(r"\w+", text)
    assert words, f"the tiny model's continuation has no word to score: {text!r}"
    # A probe whose answer is what the model says scores 1, a different answer 0 (both lengths, batched or not)
    right = RetrievalProbe(probes[0].prompt, words[0], 96, 0.0, 0)
    wrong = RetrievalProbe(probes[0].prompt, words[0] + "x", 128, 0.0, 0)
    model.train()
    for batch_size in (1, 2):
        got = evaluate_retrieval(model, tokenizer, [right, wrong], max_new_tokens=6, batch_size=batch_size)
        assert got == {96: 1.0, 128: 0.0}
    assert model.training  # restored


# ---------------------------------------------------------------------------------------------------- short drift
def _manual_short_metrics(policy, reference, tokenizer, rows) -> dict[str, float]:
    """By hand: chat-template the short prompt, score the answer tokens with log_softmax, KL summed over the vocab."""
    drifts, kl, tokens = [], 0.0, 0
    for row in rows:
        if isinstance(row["short_prompt"], list):
            prompt = tokenizer.apply_chat_template(row["short_prompt"], tokenize=True, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(row["short_prompt"] + row["chosen"], tokenize=True)
        else:
            prompt = tokenizer(row["short_prompt"])["input_ids"]
            full = tokenizer(row["short_prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
        prompt, full = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt), list(
            full["input_ids"] if hasattr(full, "keys") else full
        )
        assert full[: len(prompt)] == prompt
        answer = full[len(prompt) :]
        with torch.no_grad():
            lp = F.log_softmax(policy(input_ids=torch.tensor([full])).logits[0], dim=-1)
            lr = F.log_softmax(reference(input_ids=torch.tensor([full])).logits[0], dim=-1)
        positions = range(len(prompt) - 1, len(full) - 1)
        drift = sum(lp[t, full[t + 1]] - lr[t, full[t + 1]] for t in positions)
        drifts.append(float(drift) / len(answer))
        kl += sum(float((lp[t].exp() * (lp[t] - lr[t])).sum()) for t in positions)
        tokens += len(answer)
    return {"logp_drift": sum(drifts) / len(drifts), "kl": kl / tokens}


@pytest.mark.parametrize("conversational", [True, False], ids=["chat", "plain"])
def test_short_retention_metrics_match_a_manual_computation(tokenizer, conversational):
    reference = wide_tiny_model()
    policy = perturbed(reference, scale=0.05)
    rows = short_retention_rows(Dataset.from_list(make_rows(5, conversational=conversational)), n=3, seed=1)
    assert len(rows) == 3 and set(rows[0]) == {"short_prompt", "chosen"}
    got = short_retention_metrics(policy, reference, tokenizer, rows)
    want = _manual_short_metrics(policy, reference, tokenizer, rows)
    assert got["logp_drift"] == pytest.approx(want["logp_drift"], rel=1e-9, abs=1e-12)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-9, abs=1e-12)
    # Negative control: perturbing the policy moves both; the policy against itself gives exactly zero
    assert abs(got["logp_drift"]) > 1e-3 and got["kl"] > 1e-3
    same = short_retention_metrics(reference, clone(reference), tokenizer, rows)
    assert same == {"logp_drift": 0.0, "kl": 0.0}


def test_short_retention_rows_take_first_turns(tokenizer):
    from conftest import make_two_turn_row

    rows = short_retention_rows([make_two_turn_row()], n=4)
    assert len(rows) == 1
    assert rows[0]["short_prompt"] == make_two_turn_row()["short_prompt"][0]
    assert rows[0]["chosen"] == make_two_turn_row()["chosen"][:1]
    with pytest.raises(ValueError, match="`n`"):
        short_retention_rows([make_two_turn_row()], n=0)


# ---------------------------------------------------------------------------------------------------- callback
def _retention_args(tmp_path, **overrides):
    settings = dict(
        retention_eval_steps=2,
        retention_probe_lengths=[128, 64],
        retention_probes_per_length=2,
        retention_short_samples=2,
        retention_max_new_tokens=3,
        max_steps=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=2,
    )
    settings.update(overrides)
    return longpo_args(tmp_path, **settings)


def _retention_logs(trainer) -> dict[int, dict]:
    logs = {}
    for entry in trainer.state.log_history:
        if any(k.startswith("eval_long/") for k in entry):
            assert entry["step"] not in logs, f"step {entry['step']} logged twice"
            logs[entry["step"]] = entry
    return logs


def test_callback_logs_every_metric_at_start_every_n_steps_and_at_the_end(tokenizer, tmp_path):
    model = wide_tiny_model()
    initial = clone(model)
    rows = make_rows(4)
    trainer = LongPOTrainer(
        model=model,
        args=_retention_args(tmp_path),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(make_rows(3, seed=2)),
        processing_class=tokenizer,
    )
    assert sum(isinstance(c, RetentionCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    logs = _retention_logs(trainer)
    assert sorted(logs) == [0, 2, 3]
    for entry in logs.values():
        assert set(KEYS) <= set(entry) and entry["eval_short/acc@64"] == entry["eval_long/acc@64"]
        assert all(math.isfinite(entry[k]) for k in KEYS)
    # Step 0 is the untrained policy: the reference itself (drift and KL exactly 0), probes as computed by hand
    probes = build_retrieval_probes(tokenizer, [64, 128], 2, seed=0)
    accuracy = evaluate_retrieval(initial, tokenizer, probes, max_new_tokens=3)
    assert logs[0]["eval_long/acc@64"] == accuracy[64] and logs[0]["eval_long/acc@128"] == accuracy[128]
    assert logs[0]["eval_short/logp_drift"] == 0.0 and logs[0]["eval_short/kl"] == 0.0
    # The end: values of the trained policy against the initial model on the held-out rows (eval_dataset)
    held_out = short_retention_rows(trainer.eval_dataset, 2, seed=0)
    want = short_retention_metrics(trainer.model, initial, tokenizer, held_out)
    assert logs[3]["eval_short/kl"] == pytest.approx(want["kl"], rel=1e-9) and want["kl"] > 0
    assert logs[3]["eval_short/logp_drift"] == pytest.approx(want["logp_drift"], rel=1e-9, abs=1e-12)
    # The training logs keep their own metrics (the callback must not absorb them into its entries)
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 3 and all("rewards/chosen" in e and "nll_loss" in e for e in train_logs)
    assert not any("rewards/chosen" in e for e in logs.values())


def test_callback_with_precomputed_reference_scores_the_true_reference(tokenizer, tmp_path):
    """`precompute_ref_log_probs=True` frees the reference before training; short KL and drift must still be measured
    against the initial model, never the policy against itself (issue 19: they read exactly 0 at every step)."""
    model = wide_tiny_model()
    initial = clone(model)
    trainer = LongPOTrainer(
        model=model,
        args=_retention_args(tmp_path, max_steps=2, precompute_ref_log_probs=True),
        train_dataset=Dataset.from_list(make_rows(4)),
        eval_dataset=Dataset.from_list(make_rows(3, seed=2)),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = _retention_logs(trainer)
    assert sorted(logs) == [0, 2]
    assert logs[0]["eval_short/kl"] == 0.0 and logs[0]["eval_short/logp_drift"] == 0.0  # untrained: the reference
    held_out = short_retention_rows(trainer.eval_dataset, 2, seed=0)
    want = short_retention_metrics(trainer.model, initial, tokenizer, held_out)
    assert want["kl"] > 0
    assert logs[2]["eval_short/kl"] == pytest.approx(want["kl"], rel=1e-9)
    assert logs[2]["eval_short/logp_drift"] == pytest.approx(want["logp_drift"], rel=1e-9, abs=1e-12)


def test_callback_is_off_by_default_and_warns_without_eval_dataset(tokenizer, tmp_path, caplog):
    dataset = Dataset.from_list(make_rows(4))
    off = LongPOTrainer(
        model=wide_tiny_model(), args=longpo_args(tmp_path), train_dataset=dataset, processing_class=tokenizer
    )
    assert not any(isinstance(c, RetentionCallback) for c in off.callback_handler.callbacks)
    import logging

    with caplog.at_level(logging.WARNING):
        LongPOTrainer(
            model=wide_tiny_model(), args=_retention_args(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )
    assert "not held out" in caplog.text


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"retention_eval_steps": -1}, "retention_eval_steps"),
        ({"retention_probe_lengths": []}, "retention_probe_lengths"),
        ({"retention_probe_lengths": [0, 128]}, "retention_probe_lengths"),
        ({"retention_probe_lengths": [128, 128]}, "retention_probe_lengths"),
        ({"retention_probes_per_length": 0}, "retention_probes_per_length"),
        ({"retention_short_samples": 0}, "retention_short_samples"),
        ({"retention_max_new_tokens": 0}, "retention_max_new_tokens"),
    ],
)
def test_config_rejects_bad_retention_settings(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_probe_lengths_above_the_model_window_are_refused(tokenizer, tmp_path):
    args = _retention_args(tmp_path, retention_probe_lengths=[64, 512])
    with pytest.raises(ValueError, match=r"`retention_probe_lengths` \[512\].*max_position_embeddings \(256\)"):
        LongPOTrainer(
            model=wide_tiny_model(max_position_embeddings=256),
            args=args,
            train_dataset=Dataset.from_list(make_rows(4)),
            processing_class=tokenizer,
        )


def test_callback_with_peft_and_policy_rope_theta_scores_the_trainers_reference(tokenizer, tmp_path):
    """PEFT without a ref model: the reference is the base model with adapters disabled and the ORIGINAL RoPE θ, the
    policy runs with `policy_rope_theta`. At step 0 (adapter still zero) the metrics equal those of a plain copy of
    the model with the new θ against the untouched model; the adapter trains, so the drift moves after."""
    from peft import LoraConfig

    from trl_longpo.modeling import set_rope_theta

    base = wide_tiny_model()
    initial = clone(base)
    trainer = LongPOTrainer(
        model=base,
        args=_retention_args(tmp_path, retention_eval_steps=1, max_steps=2, policy_rope_theta=1e3),
        train_dataset=Dataset.from_list(make_rows(4)),
        eval_dataset=Dataset.from_list(make_rows(3, seed=2)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.ref_model is None
    trainer.train()
    logs = _retention_logs(trainer)
    assert sorted(logs) == [0, 1, 2]
    stretched = clone(initial)
    set_rope_theta(stretched, 1e3)
    held_out = short_retention_rows(trainer.eval_dataset, 2, seed=0)
    want = short_retention_metrics(stretched, initial, tokenizer, held_out)
    assert want["kl"] > 1e-4  # the θ change alone moves the policy away from the reference
    assert logs[0]["eval_short/kl"] == pytest.approx(want["kl"], rel=1e-9)
    assert logs[0]["eval_short/logp_drift"] == pytest.approx(want["logp_drift"], rel=1e-9)
    probes = build_retrieval_probes(tokenizer, [64, 128], 2, seed=0)
    assert logs[0]["eval_long/acc@128"] == evaluate_retrieval(stretched, tokenizer, probes, max_new_tokens=3)[128]
    # At the end the reference is still the untouched base model (adapters disabled, original θ)
    end = short_retention_metrics(trainer.model, initial, tokenizer, held_out)
    assert logs[2]["eval_short/kl"] == pytest.approx(end["kl"], rel=1e-9)
    assert logs[2]["eval_short/logp_drift"] == pytest.approx(end["logp_drift"], rel=1e-9)
    assert end["kl"] != pytest.approx(want["kl"], rel=1e-6)  # the adapter trained


# ---------------------------------------------------------------------------------------------------- SP parity
def _sp_trainer(model, tokenizer, train, held_out, outdir, **overrides):
    args = _retention_args(
        outdir, retention_eval_steps=1, max_steps=1, use_cpu=True, dpo_weight=1.0, **overrides
    )
    return LongPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )


def _sp_worker(rank: int, world_size: int, port: int, outdir: str, tokenizer_dir: str, data_dir: str) -> None:
    import traceback
    from pathlib import Path

    from datasets import load_from_disk
    from distributed import init_rank, write_result
    from transformers import AutoTokenizer

    init_rank(rank, world_size, port)
    import torch.distributed as dist

    try:
        trainer = _sp_trainer(
            wide_tiny_model(),
            AutoTokenizer.from_pretrained(tokenizer_dir),
            load_from_disk(str(Path(data_dir) / "train")),
            load_from_disk(str(Path(data_dir) / "eval")),
            Path(outdir) / "sp",
            sequence_parallel_size=world_size,
            ring_attn_impl="llama3",
        )
        trainer.train()
        result = {
            "logs": {str(step): entry for step, entry in _retention_logs(trainer).items()},
            "attn": trainer.model.config._attn_implementation,
            "split_attn": trainer.scorer.attention_name,
        }
    except Exception:
        result = {"error": traceback.format_exc()}
    write_result(outdir, rank, result)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_probes_under_sequence_parallelism_equal_the_unsplit_run(tokenizer, tmp_path):
    """sp=2 (gloo): every rank runs the probes unsplit with plain attention and logs the unsplit trainer's numbers,
    before and after a training step that itself runs with ring attention."""
    from distributed import launch

    train, held_out = Dataset.from_list(make_rows(2)), Dataset.from_list(make_rows(2, seed=2))
    tokenizer.save_pretrained(tmp_path / "tok")
    train.save_to_disk(tmp_path / "data" / "train")
    held_out.save_to_disk(tmp_path / "data" / "eval")
    per_rank = launch(_sp_worker, 2, tmp_path, args=(str(tmp_path / "tok"), str(tmp_path / "data")), timeout=300)
    unsplit = _sp_trainer(wide_tiny_model(), tokenizer, train, held_out, tmp_path / "unsplit")
    unsplit.train()
    want = _retention_logs(unsplit)
    assert sorted(want) == [0, 1]
    for rank, result in enumerate(per_rank):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        assert result["attn"] == result["split_attn"] == "tree_attention"  # switched back after the probes
        logs = {int(step): entry for step, entry in result["logs"].items()}
        assert sorted(logs) == [0, 1]
        # Step 0: the same model, so the same numbers; step 1: after a ring-attention step, whose gradients match the
        # unsplit ones to 1e-5 (fp32 log-prob accumulation in TRL's fused LM head, see test_trainer_sequence_parallel)
        for step, tolerance in ((0, 1e-9), (1, 1e-5)):
            for key in KEYS:
                assert logs[step][key] == pytest.approx(want[step][key], rel=tolerance, abs=1e-9), (rank, step, key)
        assert logs[1]["eval_short/kl"] > 0  # the step moved the policy: the comparison is not of zeros
