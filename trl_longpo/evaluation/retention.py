"""Retention metrics: long-context retrieval accuracy (greedy answers to probes) and short-context drift.

LongPO should raise the first and keep the second near zero (paper: short-context skills retained). Both are cheap:
retrieval decodes a few tokens per probe; short drift scores held-out short prompts teacher-forced (no generation),
tokenized exactly as the trainer tokenizes the reference side of a row.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from transformers.utils import logging

from trl_longpo.evaluation.probes import RetrievalProbe
from trl_longpo.tokenization import tokenize_prompt, tokenize_row

logger = logging.get_logger(__name__)
_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"\w+")


def score_retrieval(generated: str, expected: str) -> bool:
    """Exact match of the first number (for a numeric answer) or first word of `generated` with `expected`.

    "The secret number is 48213." and "48213" match "48213"; "4821", "482130" and "48,213" do not."""
    expected = expected.strip()
    if not expected:
        raise ValueError("`expected` is empty: a retrieval probe needs an exact answer.")
    pattern = _NUMBER if expected.isdigit() else _WORD
    match = pattern.search(generated)
    return match is not None and match.group(0) == expected


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module) -> None:
    modes = [(m, m.training) for m in models]
    for m, _ in modes:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.train(training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def greedy_decode(model, prompts: Sequence[list[int]], max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """Greedy continuation of left-padded prompts with a KV cache for exactly `max_new_tokens` steps (no early stop:
    every rank of FSDP / ZeRO-3 runs the same number of forwards). Returns (B, max_new_tokens) token ids."""
    device = _device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    # recent transformers 5.x name the KV cache `cache` (outputs and inputs); earlier ones `past_key_values`
    cache_name = "cache" if "cache" in out else "past_key_values"
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens[-1][:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: out[cache_name]},
        )
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def decode_answer(tokenizer, token_ids: Sequence[int]) -> str:
    """The generated text up to the first EOS (what follows an EOS is not part of the answer)."""
    ids = list(token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def evaluate_retrieval(
    model, tokenizer, probes: Sequence[RetrievalProbe], *, max_new_tokens: int = 12, batch_size: int = 1
) -> dict[int, float]:
    """Accuracy per probe length of `model`'s greedy answers (`score_retrieval`); eval mode and no grad inside, the
    training mode is restored after."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"`max_new_tokens` ({max_new_tokens}) and `batch_size` ({batch_size}) must be >= 1.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct: dict[int, list[bool]] = {}
    with _eval_mode(model):
        for start in range(0, len(probes), batch_size):
            batch = probes[start : start + batch_size]
            prompts = [tokenize_prompt(tokenizer, p.prompt) for p in batch]
            generated = greedy_decode(model, prompts, max_new_tokens, pad)
            for probe, ids in zip(batch, generated.tolist()):
                hit = score_retrieval(decode_answer(tokenizer, ids), probe.answer)
                correct.setdefault(probe.length, []).append(hit)
    return {length: sum(hits) / len(hits) for length, hits in correct.items()}


def _first_turn(row: dict, index: int) -> dict:
    """{"short_prompt", "chosen"} of a LongPO row's first answer (multi-turn rows: the first short prompt and turn)."""
    short, chosen = row["short_prompt"], row["chosen"]
    if isinstance(short, list) and short and isinstance(short[0], list):
        short = short[0]
    if isinstance(chosen, list):
        turns = [m for m in chosen if m.get("role") == "assistant"]
        if not turns:
            raise ValueError(f"Row {index}: `chosen` holds no assistant message to score.")
        chosen = turns[:1]
    return {"short_prompt": short, "chosen": chosen}


def short_retention_rows(dataset, n: int, seed: int = 0) -> list[dict]:
    """`n` rows (chosen by `seed`) of a LongPO dataset as {"short_prompt", "chosen"} for `short_retention_metrics`."""
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    if hasattr(dataset, "__len__"):
        indices = sorted(random.Random(seed).sample(range(len(dataset)), min(n, len(dataset))))
        rows = [_first_turn(dataset[i], i) for i in indices]
    else:  # a streamed dataset: its first n rows
        rows = []
        for i, row in enumerate(dataset):
            if i == n:
                break
            rows.append(_first_turn(row, i))
    if len(rows) < n:
        logger.warning(f"Short-retention metrics use {len(rows)} rows: the dataset has fewer than the {n} asked for.")
    return rows


def _answer_log_probs(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """(answer tokens, vocab) next-token log-probs at the positions that predict the answer."""
    ids = torch.tensor([prompt_ids + answer_ids], device=_device(model))
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(answer_ids) + 1).logits
    logits = logits[0, :-1]
    return F.log_softmax(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), dim=-1)


def _short_row_ids(tokenizer, row: dict, index: int) -> tuple[list[int], list[int]]:
    """(short prompt ids, answer ids) of a retention row, tokenized as the trainer tokenizes the reference side."""
    example = {"prompt": row["short_prompt"], "short_prompt": row["short_prompt"]}
    example.update(chosen=row["chosen"], rejected=row["chosen"])
    tokenized = tokenize_row(example, index, tokenizer, tokenizer.eos_token)
    return tokenized["short_prompt_ids"][0], tokenized["short_chosen_ids"][0]


def reference_answer_log_probs(
    reference, tokenizer, rows: Sequence[dict], *, reference_context: Callable[[], AbstractContextManager] | None = None
) -> list[torch.Tensor]:
    """The reference's (answer tokens, vocab) log-probs of each row, on the CPU: computed once while the reference is
    at hand, for runs that do not keep it (`precompute_ref_log_probs=True` frees it before training)."""
    reference_context = reference_context or contextlib.nullcontext
    result = []
    with _eval_mode(reference):
        for i, row in enumerate(rows):
            prompt_ids, answer_ids = _short_row_ids(tokenizer, row, i)
            with reference_context():
                result.append(_answer_log_probs(reference, prompt_ids, answer_ids).cpu())
    return result


def short_retention_metrics(
    policy,
    reference,
    tokenizer,
    rows: Sequence[dict],
    *,
    reference_context: Callable[[], AbstractContextManager] | None = None,
    reference_log_probs: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Answer log-prob drift and KL(policy || reference) of the chosen answers teacher-forced on the SHORT prompts.

    `logp_drift`: mean over rows of (Σ answer log p_policy − Σ answer log p_reference) / answer tokens.
    `kl`: mean over all answer tokens of KL(policy || reference) over the full vocabulary.
    `reference=None` means the PEFT `policy` with its adapters disabled; `reference_context` (a factory of context
    managers) wraps each reference forward otherwise (the trainer's `reference_context`, which also restores the
    original RoPE θ when `policy_rope_theta` changed the policy's). `reference_log_probs` (from
    `reference_answer_log_probs`) replaces the reference forwards; `reference` is then ignored.
    """
    if not rows:
        raise ValueError("`rows` is empty: short-retention metrics need at least one short prompt and answer.")
    if reference_log_probs is not None:
        if len(reference_log_probs) != len(rows):
            raise ValueError(f"{len(reference_log_probs)} cached reference log-probs for {len(rows)} rows.")
        reference = None
    elif reference is None:
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("`reference=None` needs a PEFT policy (the reference is the policy without adapters).")
        reference, reference_context = policy, policy.disable_adapter
    reference_context = reference_context or contextlib.nullcontext
    drifts, kl_sum, tokens = [], 0.0, 0
    with _eval_mode(*(m for m in (policy, reference) if m is not None)):
        for i, row in enumerate(rows):
            prompt_ids, answer_ids = _short_row_ids(tokenizer, row, i)
            policy_lp = _answer_log_probs(policy, prompt_ids, answer_ids)
            if reference_log_probs is not None:
                reference_lp = reference_log_probs[i]
            else:
                with reference_context():
                    reference_lp = _answer_log_probs(reference, prompt_ids, answer_ids)
            target = torch.tensor(answer_ids, device=policy_lp.device)[:, None]
            drift = policy_lp.gather(-1, target).sum() - reference_lp.to(policy_lp.device).gather(-1, target).sum()
            drifts.append(drift.item() / len(answer_ids))
            kl = (policy_lp.exp() * (policy_lp - reference_lp.to(policy_lp.device))).sum()
            kl_sum += kl.item()
            tokens += len(answer_ids)
    return {"logp_drift": sum(drifts) / len(drifts), "kl": kl_sum / tokens}
