"""Does LongPO extend a model's context? A CPU-scale self-evolution experiment (issue 10).

    python examples/self_evolution_experiment.py --quick              # ~1 minute on 2 CPU cores (1 seed, small)
    python examples/self_evolution_experiment.py                      # the full run (3 seeds), see the README table
    python examples/self_evolution_experiment.py --output_dir out/evo --seeds 0 1 2 --base_steps 1500

Steps (everything offline, one CPU thread):
1. A base model with a real short-vs-long gap. A 2-layer, width-128 Llama is trained from scratch at context S on a
   synthetic single-needle retrieval task ("The secret number of the vault is 47." hidden in filler sentences, then
   "What is the secret number of the vault? Answer with the number only."), with a length curriculum (32 -> S),
   language-model loss on every token plus a loss on the answer token, and "none" as the answer when the context
   holds no needle. RoPE models trained at S do not generalise to longer inputs, so it answers well at S and worse at
   2S and 4S: the gap self-evolution should close.
2. Self-evolution data with the project's own pipeline (`trl_longpo.data.generate_dataset`): documents of 4S tokens
   made of paragraphs of ~S tokens, one of which holds the needle; every paragraph is a chunk (short prompt), the
   instruction comes from a task list (the base model cannot write questions), the chosen answer is the base model's
   greedy answer on the chunk, the rejected one its answer on the whole document. Turns whose chunk holds no needle
   (chosen answer "none") are dropped after generation and counted; pairs with identical answers are dropped by the
   pipeline (`drop_identical`).
3. Arms, from the same base, rows, seeds and number of optimizer steps: LongPO (trainer defaults: NLL on the whole
   chosen long sequence + 0.01 * LongPO), LongPO without NLL (nll_weight=0, dpo_weight=1), SFT on the chosen long rows
   (NLL only) and TRL's DPOTrainer on the same pairs (reference on the long prompt).
4. Evaluation with `trl_longpo.evaluation` only (no evaluator of its own): retrieval probes at S, 2S and 4S built from
   held-out filler documents, and short-context retention (answer log-prob drift and KL to the base on held-out
   short prompts), before and after; mean and spread over seeds; a JSON file, a markdown table and a plot.

Why this base (findings measured on this machine): a from-scratch model trained with loss on the queried values only
(multi-query associative recall) stayed at chance after 2,400 steps; SmolLM2-135M-Instruct has no gap inside its
8K window and costs ~13 s per 4K-token sample on 2 cores. A single needle with a dedicated value vocabulary is learnt
in ~400 steps (2-3 CPU minutes) and shows the RoPE length-generalisation gap: at S=64, 92 / 87 / 65 % at 64 / 128 /
256 tokens (26 % at 512) after 800 steps; at S=128, 100 / 98 / 79 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

NEEDLE_TEMPLATE = "The secret number of {key} is {value}."
QUESTION_TEMPLATE = "What is the secret number of {key}? Answer with the number only."
KEY = "the vault"
NO_NEEDLE = "none"  # the base model's answer when the context holds no needle
# The second short-context skill, never exercised by the preference data: the last number of a short list
LIST_TEMPLATE = "The list is {items} ."
LIST_QUESTION = "What is the last number of the list? Answer with the number only."
VALUES = tuple(str(v) for v in range(10, 100))  # one token each: chance is ~1%
ARMS = ("longpo", "longpo_no_nll", "sft", "dpo")  # trained on round 1's rows (4·S), from the base
ALL_ARMS = (*ARMS, "round2", "direct")  # + LongPO round 2 (16·S, from round 1) and one round on 16·S from the base
ARM_LABELS = {
    "base": "base",
    "longpo": "LongPO (defaults)",
    "longpo_no_nll": "LongPO w/o NLL",
    "sft": "SFT (NLL only)",
    "dpo": "DPO (TRL DPOTrainer)",
    "round2": "LongPO round 2 (16·S data by round 1)",
    "direct": "LongPO one round on 16·S from base",
}


# ------------------------------------------------------------------------------------------------------------ world
class SecretWorld:
    """The synthetic world: a word-level vocabulary, its tokenizer (with the tiny chat template) and filler text."""

    def __init__(self, num_filler_words: int = 200):
        import re

        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        from trl_longpo.data.documents import corpus_texts
        from trl_longpo.tiny import SPECIAL_TOKENS, TINY_CHAT_TEMPLATE

        fixed = " ".join([NEEDLE_TEMPLATE, QUESTION_TEMPLATE, KEY, NO_NEEDLE, LIST_TEMPLATE, LIST_QUESTION])
        template_words = sorted(set(re.findall(r"\w+|[^\w\s]", re.sub(r"\{\w+\}", "", fixed))))
        counts = Counter(w for t in corpus_texts() for w in re.findall(r"\b[a-z]{3,8}\b", t))
        taken = {w.lower() for w in template_words}
        self.filler_words = [w for w, _ in counts.most_common() if w not in taken][:num_filler_words]
        vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *template_words, *VALUES, *self.filler_words])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.add_special_tokens(SPECIAL_TOKENS)  # "[INST]" is one token, not "[", "INST", "]"
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
        self.tokenizer.chat_template = TINY_CHAT_TEMPLATE
        self.vocab = vocab

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sentences(self, rng: random.Random, num_tokens: int) -> list[str]:
        """Filler sentences of 5-11 words (each word and each '.' one token), about `num_tokens` tokens in all."""
        out, n = [], 0
        while n < num_tokens:
            k = min(rng.randint(5, 11), max(1, num_tokens - n - 1))
            out.append(" ".join(rng.choice(self.filler_words) for _ in range(k)) + " .")
            n += k + 1
        return out

    def filler_documents(self, rng: random.Random, count: int, num_tokens: int) -> list[str]:
        return [" ".join(self.sentences(rng, num_tokens)) for _ in range(count)]

    def needle(self, value: str) -> str:
        return NEEDLE_TEMPLATE.format(key=KEY, value=value)

    def question(self) -> str:
        return QUESTION_TEMPLATE.format(key=KEY)

    def value(self, rng: random.Random) -> str:
        return rng.choice(VALUES)

    def list_task(self, rng: random.Random) -> tuple[str, str]:
        """(prompt text, answer) of the list skill: 3-6 numbers, the answer is the last one."""
        items = [self.value(rng) for _ in range(rng.randint(3, 6))]
        return LIST_TEMPLATE.format(items=" ".join(items)) + "\n\n" + LIST_QUESTION, items[-1]

    def list_example(self, rng: random.Random) -> tuple[list[int], list[int]]:
        text, answer = self.list_task(rng)
        prompt = [{"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        return list(ids), self.ids(answer) + [self.tokenizer.eos_token_id]

    def training_example(self, rng: random.Random, length: int, p_no_needle: float) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of about `length` tokens, rendered exactly as the chat template renders
        [{"role": "user", "content": haystack + "\\n\\n" + question}], as the probes and the pipeline do."""
        has_needle = rng.random() >= p_no_needle
        value = self.value(rng)
        needle = self.needle(value) if has_needle else ""
        overhead = 3 + len(self.ids(self.question())) + len(self.ids(needle))
        sentences = self.sentences(rng, max(1, length - overhead))
        if has_needle:
            sentences.insert(rng.randint(0, len(sentences)), needle)
        prompt = [{"role": "user", "content": " ".join(sentences) + "\n\n" + self.question()}]
        ids = self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        answer = self.ids(value if has_needle else NO_NEEDLE) + [self.tokenizer.eos_token_id]
        return list(ids), answer


# --------------------------------------------------------------------------------------------------------- base model
def build_model(world: SecretWorld, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = world.tokenizer
    config = LlamaConfig(
        vocab_size=len(world.vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def short_accuracy(model, world: SecretWorld, length: int, n: int = 64, seed: int = 0, task: str = "needle") -> float:
    """Greedy answer accuracy on `n` fresh training-distribution prompts of `length` tokens (needle always present;
    `task="list"`: the list skill): the base model's own stopping check, not the experiment's evaluation (that is
    `trl_longpo.evaluation`)."""
    rng = random.Random(f"check-{seed}-{length}-{task}")
    if task == "list":
        examples = [world.list_example(rng) for _ in range(n)]
    else:
        examples = [world.training_example(rng, length, p_no_needle=0.0) for _ in range(n)]
    width = max(len(p) for p, _ in examples)
    pad = world.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in examples])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in examples])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        predicted = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
    model.train(was_training)
    return sum(int(t) == a[0] for t, (_, a) in zip(predicted.tolist(), examples)) / n


def train_base(world: SecretWorld, args, log) -> torch.nn.Module:
    """From scratch at context S: length curriculum 32 -> S over `base_curriculum_steps`, warmup, cosine decay over
    `base_steps`; loss = LM loss on every token + loss on the answer token (the dense signal plus the task signal).
    Stops as soon as the model masters the short task (`short_accuracy` at S >= `base_target_accuracy`, checked every
    `base_check_every` steps after the curriculum): a short-context model, trained no further than it needs."""
    model = build_model(world, args.hidden_size, args.num_layers, seed=1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.base_lr, weight_decay=0.0)
    rng = random.Random(1234)
    warmup = max(1, args.base_steps // 10)
    start = time.time()
    for step in range(args.base_steps):
        longest = int(32 + min(1.0, step / max(1, args.base_curriculum_steps)) * (args.short_length - 32))
        length = rng.randint(min(32, longest), longest)
        lr = args.base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.base_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        examples = [
            world.list_example(rng) if rng.random() < args.base_list_share
            else world.training_example(rng, length, p_no_needle=1 / 3)
            for _ in range(args.base_batch_size)
        ]
        width = max(len(p) + len(a) for p, a in examples)
        pad = world.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), width), pad)
        lm_labels = torch.full((len(examples), width), -100)
        answer_labels = torch.full((len(examples), width), -100)
        for i, (p, a) in enumerate(examples):
            n = len(p) + len(a)
            input_ids[i, :n] = torch.tensor(p + a)
            lm_labels[i, 1:n] = input_ids[i, 1:n]
            answer_labels[i, len(p) : n] = torch.tensor(a)
        logits = model(input_ids=input_ids).logits[:, :-1].flatten(0, 1)
        ce = torch.nn.functional.cross_entropy
        loss = ce(logits, lm_labels[:, 1:].flatten()) + ce(logits, answer_labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done >= args.base_curriculum_steps and done % args.base_check_every == 0:
            accuracy = short_accuracy(model, world, args.short_length)
            list_accuracy = short_accuracy(model, world, args.short_length, task="list")
            log(f"base step {done}/{args.base_steps} loss {loss.item():.3f} check acc@S {accuracy:.2f} "
                f"list skill {list_accuracy:.2f} ({time.time() - start:.0f}s)")
            if min(accuracy, list_accuracy) >= args.base_target_accuracy:
                break
        elif done % 50 == 0:
            log(f"base step {done}/{args.base_steps} len {length} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return model.eval()


# ----------------------------------------------------------------------------------------------- self-evolution data
def evolution_documents(world: SecretWorld, args, rng: random.Random, factor: int, count: int) -> tuple[list[str], int, int]:
    """`count` documents of about factor·S tokens: paragraphs (blank-line separated) that each fit a short prompt of S
    tokens, one of them holding the needle. Returns (documents, chunk_tokens, paragraphs per document)."""
    prompt_overhead = 3 + len(world.ids(world.question()))  # template + question
    needle_tokens = len(world.ids(world.needle(VALUES[0])))
    chunk_tokens = args.short_length - prompt_overhead
    paragraph = chunk_tokens - needle_tokens
    per_doc = max(2, (factor * args.short_length - prompt_overhead - needle_tokens) // paragraph)
    docs = []
    for _ in range(count):
        paragraphs = [world.sentences(rng, paragraph - 1) for _ in range(per_doc)]
        target = paragraphs[rng.randrange(per_doc)]
        target.insert(rng.randint(0, len(target)), world.needle(world.value(rng)))
        docs.append("\n\n".join(" ".join(p) for p in paragraphs))
    return docs, chunk_tokens, per_doc


def evolve_round(world: SecretWorld, args, out: Path, factor: int, count: int) -> dict:
    """One `trl-longpo evolve` round on documents of factor·S tokens (written once to a .jsonl file): the base
    (or the previous round's model) answers every chunk (chosen) and the whole document (rejected)."""
    docs_file = out / f"documents-{factor}S.jsonl"
    docs, chunk_tokens, per_doc = evolution_documents(world, args, random.Random(f"docs-{factor}"), factor, count)
    if not docs_file.exists():
        docs_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {
        "name": f"{factor}S",
        "documents": str(docs_file),
        "context_length": factor * args.short_length + args.answer_tokens,
        "chunk_tokens": chunk_tokens,
        "generation": {"turns_per_doc": per_doc},
    }


def evolve_config(world: SecretWorld, args, out: Path, base_dir: str, factors: list[int], seed: int) -> dict:
    """The `trl-longpo evolve` config of the experiment's rounds: every generation and training setting the arms
    share is here, so the LongPO rounds run through exactly the code path of `trl-longpo evolve`."""
    count = {args.long_factor: args.num_documents}
    rounds = [evolve_round(world, args, out, f, count.get(f, args.num_documents_round2)) for f in factors]
    return {
        "base_model": base_dir,
        "output": str(out / f"evolve-{'-'.join(f'{f}S' for f in factors)}-seed{seed}"),
        "reference": "previous",
        "generation": dict(
            seed=0,
            model_context_length=args.short_length + args.answer_tokens,
            max_short_prompt_tokens=args.short_length,
            chunk_selection="first",
            instruction_source="list",
            fallback_instructions=[world.question()],
            use_lead_in=False,
            max_new_tokens=args.answer_tokens,
            temperature=args.answer_temperature,
            group_turns=False,
            long_turn_context="independent",
            min_answer_words=0,
            refusal_phrases=[],
            drop_truncated=False,  # a long answer that runs on without EOS is a wrong answer: the rejected side
            batch_size=256,
            generation_batch_size=32,
        ),
        "training": training_settings(args, seed),
        "rounds": rounds,
    }


def training_settings(args, seed: int) -> dict:
    """LongPOConfig / DPOConfig fields every arm shares (output_dir aside)."""
    return dict(
        report_to="none",
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        beta=args.beta,
        bf16=False,
        max_length=None,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
    )


def keep_needle_rows(dataset, log=None, label=""):
    """Drop turns whose chunk holds no needle (chosen answer "none": nothing to learn about retrieval), counted."""
    kept = dataset.filter(lambda row: row["chosen"][0]["content"].strip() != NO_NEEDLE)
    if log:
        log(f"{label}: {len(dataset)} pairs, {len(dataset) - len(kept)} needle-less chunk answers dropped -> "
            f"{len(kept)} rows")
    return kept


def split_rows(dataset, args):
    """(train, held-out) rows; the held-out short prompts measure short-context drift/KL. Deterministic."""
    if len(dataset) < 4:
        raise RuntimeError(
            f"Only {len(dataset)} preference rows were generated; raise --num_documents, or the model already answers "
            "at this length (no gap to close)."
        )
    split = dataset.train_test_split(test_size=min(args.retention_samples, len(dataset) // 4), seed=0)
    return split["train"], split["test"]


# ---------------------------------------------------------------------------------------------------------- arms
def curve_steps(total: int) -> list[int]:
    """1, 2, 4, ... and the last step: where the learning curves are measured."""
    steps, k = [], 1
    while k < total:
        steps.append(k)
        k *= 2
    return [*steps, total]


def probe_curve_callback(measure, curve: dict[int, dict[str, float]]):
    """A callback that records `measure(model, final)` after optimizer steps 1, 2, 4, ... and the last (both
    trainers); `final` is True at the last step (the complete evaluation; earlier steps measure the curve's length)."""
    from transformers import TrainerCallback

    class ProbeCurve(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = set(curve_steps(state.max_steps))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in self.steps:
                curve[state.global_step] = measure(model, state.global_step == state.max_steps)

    return ProbeCurve()


def train_arm(arm: str, base_dir: str, world: SecretWorld, rows, args, seed: int, out: Path, measure):
    from transformers import AutoModelForCausalLM

    common = dict(output_dir=str(out / f"{arm}-seed{seed}"), **training_settings(args, seed))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    reference = AutoModelForCausalLM.from_pretrained(base_dir)
    curve: dict[int, dict[str, float]] = {}
    callbacks = [probe_curve_callback(measure, curve)]
    if arm == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo_rows = rows.remove_columns("short_prompt")
        trainer = DPOTrainer(
            model=model, ref_model=reference, args=DPOConfig(**common), train_dataset=dpo_rows,
            processing_class=world.tokenizer, callbacks=callbacks,
        )
    else:
        from trl_longpo import LongPOConfig, LongPOTrainer

        weights = {"longpo": {}, "longpo_no_nll": dict(nll_weight=0.0, dpo_weight=1.0), "sft": dict(dpo_weight=0.0)}
        trainer = LongPOTrainer(
            model=model, ref_model=reference, args=LongPOConfig(**common, **weights[arm]), train_dataset=rows,
            processing_class=world.tokenizer, callbacks=callbacks,
        )
    result = trainer.train()
    if result.global_step not in curve:
        curve[result.global_step] = measure(trainer.model, True)
    info = {"train_loss": result.training_loss, "steps": result.global_step, "curve": curve}
    return trainer.model.eval(), info


# ---------------------------------------------------------------------------------------------------- evaluation
def list_skill_probes(world: SecretWorld, count: int) -> list:
    """Probes of the second skill (the last number of a short list), as `RetrievalProbe`s so that the project's
    `evaluate_retrieval` scores them like every other probe (bucket `length=0`)."""
    from trl_longpo.evaluation import RetrievalProbe

    rng = random.Random("list-skill-eval")
    probes = []
    for _ in range(count):
        text, answer = world.list_task(rng)
        probes.append(RetrievalProbe([{"role": "user", "content": text}], answer, 0, 1.0, 0))
    return probes


def evaluate(model, base, world: SecretWorld, probes, list_probes, retention_rows, args,
             only_length: int | None = None) -> dict[str, float]:
    """Every metric; with `only_length`, just the retrieval accuracy at that length (a learning-curve point)."""
    from trl_longpo.evaluation import evaluate_retrieval, short_retention_metrics

    if only_length is not None:
        probes = [p for p in probes if p.length == only_length]
    acc = evaluate_retrieval(model, world.tokenizer, probes, max_new_tokens=2, batch_size=args.eval_batch_size)
    metrics = {f"acc@{length}": value for length, value in sorted(acc.items())}
    if only_length is not None:
        return metrics
    skill = evaluate_retrieval(model, world.tokenizer, list_probes, max_new_tokens=2, batch_size=args.eval_batch_size)
    metrics["list_skill"] = skill[0]
    metrics.update(short_retention_metrics(model, base, world.tokenizer, retention_rows))
    return metrics


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """mean and spread (half the max - min range over seeds) of every metric of every arm."""
    table = {}
    for arm, per_seed in runs.items():
        table[arm] = {
            key: (statistics.fmean(r[key] for r in per_seed), (max(r[key] for r in per_seed) - min(r[key] for r in per_seed)) / 2)
            for key in per_seed[0]
        }
    return table


def markdown_table(summary, lengths: list[int], seeds: int) -> str:
    head = [f"acc@{n}" for n in lengths] + ["list_skill", "logp_drift", "kl"]
    lines = [
        "| arm | " + " | ".join(f"acc@{n} ({n // lengths[0]}·S)" if n != lengths[0] else f"acc@{n} (S)" for n in lengths)
        + " | list skill (short) | short logp drift | short KL |",
        "|---" * (len(head) + 1) + "|",
    ]
    for arm, metrics in summary.items():
        cells = []
        for key in head:
            mean, spread = metrics[key]
            cells.append(f"{100 * mean:.1f} ± {100 * spread:.1f}" if key.startswith(("acc", "list")) else f"{mean:+.3f} ± {spread:.3f}")
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    lines.append(f"\nAccuracy in % (mean ± half-range over {seeds} seed(s)); drift and KL on held-out short prompts vs the base.")
    return "\n".join(lines)


def summarise_curves(training, base_metrics, arms, seeds) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """Per arm and optimizer step (0 = the arm's starting model): mean and spread over seeds of every metric."""
    curves = {}
    for arm in arms:
        per_seed = [training[f"{arm}/seed{seed}"]["curve"] for seed in seeds]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        start = base_metrics[arm] if isinstance(base_metrics.get(arm), dict) else base_metrics["base"]
        curves[arm] = {0: {k: (v, 0.0) for k, v in start.items()}}
        for step in steps:
            curves[arm][step] = summarise({"x": [c[step] for c in per_seed]})["x"]
    return curves


def curve_table(curves, lengths_by_arm: dict[str, int]) -> str:
    steps = sorted(set.union(*(set(c) for c in curves.values())))
    lines = [
        "Accuracy at the arm's training length (4·S, or 16·S for the 16·S rounds) after N optimizer steps:",
        "",
        "| arm | length | " + " | ".join(f"{n}" for n in steps) + " |",
        "|---" * (len(steps) + 2) + "|",
    ]
    for arm, curve in curves.items():
        key = f"acc@{lengths_by_arm[arm]}"
        cells = [f"{100 * curve[n][key][0]:.1f}" if n in curve else "" for n in steps]
        lines.append(f"| {ARM_LABELS[arm]} | {lengths_by_arm[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, curves, lengths: list[int], lengths_by_arm: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {arm: f"C{i}" for i, arm in enumerate(["base", *ALL_ARMS])}  # one colour per arm in both panels
    for arm, metrics in summary.items():
        means = [100 * metrics[f"acc@{n}"][0] for n in lengths]
        spreads = [100 * metrics[f"acc@{n}"][1] for n in lengths]
        left.errorbar(lengths, means, yerr=spreads, marker="o", capsize=3, label=ARM_LABELS[arm],
                      linestyle="--" if arm == "base" else "-", color=colors[arm])
    left.set_xscale("log", base=2)
    left.set_xticks(lengths, [f"{n}\n({n // lengths[0]}·S)" for n in lengths])
    left.set_xlabel("prompt length (tokens)")
    left.set_ylabel("retrieval accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title("after training")
    left.legend(fontsize=7)
    for arm, curve in curves.items():
        steps = sorted(curve)
        key = f"acc@{lengths_by_arm[arm]}"
        right.errorbar([max(n, 0.5) for n in steps], [100 * curve[n][key][0] for n in steps],
                       yerr=[100 * curve[n][key][1] for n in steps], marker="o", capsize=3,
                       label=f"{ARM_LABELS[arm]} @{lengths_by_arm[arm]}", color=colors[arm],
                       linestyle=":" if lengths_by_arm[arm] != lengths_by_arm.get("longpo") else "-")
    right.set_xscale("log", base=2)
    right.set_xlabel("optimizer steps (0 = the arm's starting model, plotted at 0.5)")
    right.set_ylabel("accuracy at the arm's training length (%)")
    right.set_ylim(0, 105)
    right.set_title("learning curves (solid: 4·S, dotted: 16·S)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- main
@dataclass
class Settings:
    output_dir: str = "outputs/self_evolution"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    short_length: int = 64
    long_factor: int = 4  # round 1's documents have long_factor·S tokens
    round2_factor: int = 16  # round 2's (and the direct arm's) documents have round2_factor·S tokens
    eval_factors: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # probes at these multiples of S
    hidden_size: int = 128
    num_layers: int = 2
    base_steps: int = 1500  # at most; training stops once both short skills are mastered
    base_curriculum_steps: int = 200
    base_check_every: int = 25
    base_target_accuracy: float = 0.95
    base_batch_size: int = 32
    base_lr: float = 2e-3
    base_list_share: float = 0.25  # share of the base's training examples that are the list skill
    num_documents: int = 600
    num_documents_round2: int = 150
    answer_tokens: int = 3
    answer_temperature: float = 0.0  # greedy answers; the CI test samples (an untrained base answers identically)
    batch_size: int = 8
    epochs: float = 2.0
    learning_rate: float = 3e-4
    beta: float = 0.1
    probes_per_length: int = 64
    retention_samples: int = 64
    eval_batch_size: int = 16
    arms: list[str] = field(default_factory=lambda: list(ALL_ARMS))


QUICK = dict(seeds=[0], num_documents=300, num_documents_round2=80, probes_per_length=32, retention_samples=16,
             epochs=1.0)


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a few-minute run (1 seed)")
    for f in Settings.__dataclass_fields__.values():
        kind = type(getattr(Settings(), f.name))
        if kind is list:
            item = str if f.name == "arms" else int
            parser.add_argument(f"--{f.name}", nargs="+", type=item, default=None)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    ns = parser.parse_args(argv)
    settings = Settings(**(QUICK if ns.quick else {}))
    for name in Settings.__dataclass_fields__:
        if getattr(ns, name) is not None:
            setattr(settings, name, getattr(ns, name))
    unknown = set(settings.arms) - set(ALL_ARMS)
    if unknown:
        parser.error(f"--arms: unknown {sorted(unknown)}; choose from {list(ALL_ARMS)}")
    if "longpo" not in settings.arms:
        parser.error("--arms: longpo (evolve round 1) generates the rows every arm trains on; keep it")
    return settings


def run_rounds(world, args, out: Path, base_dir: str, factors: list[int], seed: int, measures: dict, share_from: Path | None,
               retention: dict, log) -> tuple[list[dict], dict[int, dict], dict[int, tuple], Path]:
    """Rounds of `trl-longpo evolve` (`run_evolve`) from the base: returns the round summaries, each round's
    learning curve (`measures[r]`), each round's (train, held-out) rows and the run's folder. `share_from`: an earlier seed's run
    whose finished round-1 generation is reused through the generation store (same base, documents and settings:
    the same rows). The first round-1 rows seen fill `retention["rows"]` (held-out short prompts for drift/KL)."""
    from trl_longpo.evaluation import short_retention_rows
    from trl_longpo.evolve import evolve_config_from_dict, run_evolve

    config = evolve_config_from_dict(evolve_config(world, args, out, base_dir, factors, seed), "experiment")
    run_dir = Path(config.output)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time (the experiment's settings may have changed)
    if share_from is not None and (share_from / "round-1" / "data" / "stats.json").exists():
        shutil.copytree(share_from / "round-1" / "data", run_dir / "round-1" / "data")
    curves: dict[int, dict] = {}
    rows: dict[int, tuple] = {}

    def prepare(round_index: int, dataset):
        train, held_out = split_rows(keep_needle_rows(dataset, log, f"{run_dir.name} round {round_index}"), args)
        rows[round_index] = (train, held_out)
        if "rows" not in retention:
            retention["rows"] = short_retention_rows(held_out, n=len(held_out))
        return train

    summaries = run_evolve(
        config,
        callbacks=lambda r: [probe_curve_callback(measures[r], curves.setdefault(r, {}))],
        prepare_rows=prepare,
        log=log,
    )
    return summaries, curves, rows, run_dir


def main(argv=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from trl_longpo.evaluation import build_retrieval_probes

    world = SecretWorld()
    base = train_base(world, args, log)
    base_dir = str(out / "base")
    base.save_pretrained(base_dir)
    world.tokenizer.save_pretrained(base_dir)

    lengths = sorted({args.short_length * k for k in args.eval_factors})
    held_out = world.filler_documents(random.Random(99), 32, 4 * max(lengths))  # never seen in training
    probes = build_retrieval_probes(
        world.tokenizer, lengths, args.probes_per_length, documents=held_out, seed=7, keys=[KEY],
        needle_template=NEEDLE_TEMPLATE, question_template=QUESTION_TEMPLATE, value_fn=world.value,
    )
    list_probes = list_skill_probes(world, args.probes_per_length)
    retention: dict[str, list] = {}

    def measure(model, final: bool = True, length: int | None = None) -> dict[str, float]:
        only = None if final else length
        return evaluate(model, base, world, probes, list_probes, retention["rows"], args, only_length=only)

    def curve_measure(length: int):
        return lambda model, final: measure(model, final, length)

    long_length, round2_length = args.long_factor * args.short_length, args.round2_factor * args.short_length
    runs: dict[str, list[dict[str, float]]] = {}
    training: dict[str, dict] = {}
    start_metrics: dict[str, dict] = {}
    rounds_by_seed: dict[str, list[dict]] = {}

    def record(arm: str, seed: int, curve: dict, summary: dict) -> None:
        steps = max(curve) if curve else 0
        metrics = curve[steps]
        runs.setdefault(arm, []).append(metrics)
        training[f"{arm}/seed{seed}"] = {"train_loss": summary.get("train_loss"), "steps": summary.get("steps"),
                                         "curve": curve}
        log(f"{arm} seed {seed}: {summary.get('steps')} steps, {metrics}")

    # LongPO round 1 (4·S) and round 2 (16·S, data from round 1's model): one `evolve` run per seed
    factors = [args.long_factor] + ([args.round2_factor] if "round2" in args.arms else [])
    share = None
    for seed in args.seeds:
        measures = {1: curve_measure(long_length), 2: curve_measure(round2_length)}
        summaries, curves, rows, run_dir = run_rounds(world, args, out, base_dir, factors, seed, measures, share,
                                                      retention, log)
        if share is None:
            share, rows_round1 = run_dir, rows[1]
            runs["base"] = [measure(base)]
            log(f"base: {runs['base'][0]}")
        rounds_by_seed[f"seed{seed}"] = summaries
        record("longpo", seed, curves[1], summaries[0])
        if "round2" in args.arms:
            record("round2", seed, curves[2], summaries[1])
    if "round2" in args.arms:
        start_metrics["round2"] = summarise({"x": runs["longpo"]})["x"]  # round 2 starts from round 1's models
        start_metrics["round2"] = {k: v for k, (v, _) in start_metrics["round2"].items()}
    train_rows = rows_round1[0]

    # Other arms on round 1's rows, from the base
    for arm in [a for a in ARMS if a != "longpo" and a in args.arms]:
        for seed in args.seeds:
            _, info = train_arm(arm, base_dir, world, train_rows, args, seed, out, curve_measure(long_length))
            record(arm, seed, info["curve"], info)

    # One round trained directly on round2_factor·S documents generated by the base (what round 2 is compared with)
    if "direct" in args.arms:
        share = None
        for seed in args.seeds:
            summaries, curves, _, run_dir = run_rounds(world, args, out, base_dir, [args.round2_factor], seed,
                                                       {1: curve_measure(round2_length)}, share, retention, log)
            share = share or run_dir
            record("direct", seed, curves[1], summaries[0])

    arms = [a for a in ALL_ARMS if a in runs]
    summary = summarise({"base": runs["base"], **{a: runs[a] for a in arms}})
    lengths_by_arm = {a: round2_length if a in ("round2", "direct") else long_length for a in arms}
    start_metrics["base"] = runs["base"][0]
    curves = summarise_curves(training, start_metrics, arms, args.seeds)
    table = markdown_table(summary, lengths, len(args.seeds)) + "\n\n" + curve_table(curves, lengths_by_arm)
    plot(summary, curves, lengths, lengths_by_arm, out / "self_evolution.png")
    result = {
        "settings": asdict(args),
        "lengths": lengths,
        "train_rows": len(train_rows),
        "held_out_rows": len(rows_round1[1]),
        "runs": runs,
        "rounds": rounds_by_seed,
        "training": training,
        "summary": summary,
        "curves": curves,
        "wall_seconds": time.time() - started,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    log(f"done: {out / 'results.json'}, {out / 'results.md'}, {out / 'self_evolution.png'}")
    return result


if __name__ == "__main__":
    main()
