"""The dry run: what a `generate` run will do, from the tokenizer and the model config alone (no weights, no engine).

The plan runs the pipeline's own stages (`stages.py`) on the real documents and chunks, with `PlanningBackend` in
place of the engine: it answers every request with a placeholder of the stage's full token budget (a numbered list of
questions for the instruction stage, distinct filler words for answers), so every prompt is built and measured
exactly as the real run builds it, and the context limits are the real run's `fits` checks. What the plan cannot know
is which generated answers the filters will drop, so its row count is an upper bound ("before the answer filters").
Where a prompt depends on a generation (the chosen question; in conversation mode the earlier long answers), the
placeholder stands in for it: questions of representative length, answers of the full `max_new_tokens`.

A plan that yields no rows names the option that limits it and a value that works (`GenerationPlan.problem`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rounding import round_up
from .backends import Completion, GenerationBackend, Sampling
from .config import DataConfigError, GenerationConfig
from .documents import Document
from .instructions import DEFAULT_FALLBACK_INSTRUCTIONS
from .rows import build_rows
from .stages import (
    LazyBackend,
    Turn,
    run_instructions,
    run_long_answers,
    run_short_answers,
    short_prompt_limit,
)
from .stats import RunStats
from .store import StageStore


class EmptyPlanError(DataConfigError):
    """The settings yield no rows; the message names the limiting option and a value that works."""


def _word(i: int, width: int) -> str:
    letters = []
    for _ in range(width):
        i, d = divmod(i, 26)
        letters.append(chr(ord("a") + d))
    return "".join(reversed(letters))


class PlanningBackend(GenerationBackend):
    """An engine stand-in that generates nothing: each request gets a placeholder of its full token budget."""

    def __init__(self, tokenizer: Any, config: GenerationConfig, context_length: int | None):
        self.tokenizer, self.config, self._context_length = tokenizer, config, context_length
        self.instruction_sampling = Sampling(
            config.instruction_max_new_tokens, config.instruction_temperature, config.instruction_top_p
        )
        self._cache: dict[tuple[int, bool, bool], Completion] = {}

    @property
    def context_length(self) -> int | None:
        return self._context_length

    def _questions(self) -> str:
        pool = [s.strip() for s in self.config.fallback_instructions if s.strip()] or list(
            DEFAULT_FALLBACK_INSTRUCTIONS
        )
        # The whole fallback pool unless exactly num_instructions must parse: a run that falls back (a model that
        # writes no parsable list) then picks the very question the plan picks, with the same seeded draw.
        n = max(1, self.config.num_instructions) if self.config.require_exact_count else len(pool)
        items = [pool[k % len(pool)] + (f" (part {k // len(pool) + 1})" if k >= len(pool) else "") for k in range(n)]
        return "\n".join(f"{k + 1}: {q}" for k, q in enumerate(items)) + "\n\n"

    def _placeholder(self, budget: int, questions: bool, long_context: bool) -> Completion:
        key = (budget, questions, long_context)
        if key not in self._cache:
            head = self._questions() if questions else ("Long" if long_context else "Short") + " answer: "
            width = max(3, math.ceil(math.log(budget + 1, 26)))
            words = [_word(i, width) for i in range(budget)]

            def n_tokens(k: int) -> int:
                return len(self.tokenizer(head + " ".join(words[:k]), add_special_tokens=False)["input_ids"])

            lo, hi = 0, budget
            while lo < hi:  # the most filler words that keep the text within the budget
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if n_tokens(mid) <= budget else (lo, mid - 1)
            text = head + " ".join(words[:lo])
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[key] = Completion(text, list(ids), "stop")
        return self._cache[key]

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], long_context: bool = False
    ) -> list[Completion]:
        questions = sampling == self.instruction_sampling
        return [self._placeholder(sampling.max_new_tokens, questions, long_context) for _ in prompts]


@dataclass
class StagePlan:
    """One generation stage: prompts that fit its context limit, prompts skipped (by reason), tokens."""

    name: str
    context: str  # "short" or "long"
    prompt_limit: int | None  # the most prompt tokens that fit (context minus the stage's new tokens)
    new_tokens_per_prompt: int
    fit: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # to prefill, over the prompts that fit
    longest_prompt: int = 0  # over all prompts, fitting or not
    records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def requested(self) -> int:
        return self.fit + sum(self.skipped.values())

    @property
    def max_new_tokens(self) -> int:
        return self.fit * self.new_tokens_per_prompt


@dataclass
class GenerationPlan:
    """What a `generate` run with these settings will do; `format()` is the one-paragraph text both runs print."""

    native_context: int | None
    long_context: int | None
    documents: dict[str, int]
    chunks: dict[str, int]
    stages: list[StagePlan]
    max_rows: int
    stats: dict[str, Any] = field(repr=False)
    problem: str | None = None

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def format(self) -> str:
        docs = self.documents
        dropped = {k: v for k, v in docs.items() if k not in {"in_source", "kept"} and v}
        parts = [
            f"Plan: {docs.get('kept', 0)} of {docs.get('in_source', 0)} documents kept"
            + (f" ({', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else "")
            + f", {self.chunks.get('turns_selected', 0)} turns from {self.chunks.get('documents_with_turns', 0)} "
            f"documents; short context {_fmt(self.native_context)}, long context {_fmt(self.long_context)} tokens"
        ]
        for s in self.stages:
            if not s.requested:
                continue
            skipped = ", ".join(f"{v} {k}" for k, v in s.skipped.items())
            limit = f" (prompt <= {_fmt(s.prompt_limit)} tokens)" if s.prompt_limit is not None else ""
            parts.append(
                f"{s.name}: {s.fit} of {s.requested} prompts fit the {s.context} context{limit}"
                + (f", skipped {skipped}" if skipped else "")
                + f"; {_fmt(s.prompt_tokens)} prompt tokens to prefill (longest {_fmt(s.longest_prompt)}), "
                f"at most {_fmt(s.max_new_tokens)} new tokens"
            )
        parts.append(f"at most {self.max_rows} rows (before the answer filters, which need the generations)")
        text = "; ".join(parts) + "."
        return text + (f" No rows: {self.problem}" if self.problem else "")

    def check(self) -> None:
        """Raise `EmptyPlanError` (naming the limiting option and a value that works) if the plan yields no rows."""
        if self.max_rows == 0:
            error = EmptyPlanError(f"The settings yield no rows: {self.problem or 'see the plan'}")
            error.plan = self
            raise error


def _fmt(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def _stage_files(config: GenerationConfig) -> list[tuple[str, str, str]]:
    """(store file, plan name, context) of every stage the run will execute, in order."""
    files = [("instructions", "instructions", "short")] if config.instruction_source == "model" else []
    files.append(("short_answers", "short answers (chosen)", "short"))
    if config.long_turn_context == "independent":
        files.append(("long_answers", "long answers (rejected)", "long"))
    else:
        files += [
            (f"long_answers_turn{i + 1}", f"long answers (rejected), turn {i + 1}", "long")
            for i in range(config.turns_per_doc)
        ]
    return files


def plan_turns(
    docs: list[Document],
    per_doc: list[list[Turn]],
    config: GenerationConfig,
    tokenizer: Any,
    native_ctx: int | None,
    long_ctx: int | None,
    stats: RunStats,
) -> GenerationPlan:
    """Run the generation stages on copies of `per_doc` (the turns of the kept `docs`) with `PlanningBackend`;
    `stats` holds the document and chunking counts of the real run (copied, not changed)."""
    config = copy.copy(config)
    config.progress = False
    stats = copy.deepcopy(stats)
    turns = [[dataclasses.replace(t) for t in ts] for ts in per_doc]
    engine = LazyBackend(lambda: None, PlanningBackend(tokenizer, config, native_ctx))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="trl-longpo-plan-") as tmp:
        work_dir = Path(tmp)
        run_instructions(turns, config, tokenizer, engine, work_dir, native_ctx, stats)
        run_short_answers(turns, config, tokenizer, engine, work_dir, native_ctx, stats)
        run_long_answers(turns, config, tokenizer, engine, work_dir, long_ctx, stats)
        rows = build_rows(turns, config, stats)
        limits = {
            "instructions": (native_ctx - config.instruction_max_new_tokens) if native_ctx else None,
            "short": short_prompt_limit(config, native_ctx),
            "long": (long_ctx - config.max_new_tokens) if long_ctx else None,
        }
        stages = []
        for file, name, context in _stage_files(config):
            budget = config.instruction_max_new_tokens if file == "instructions" else config.max_new_tokens
            limit = limits["instructions" if file == "instructions" else context]
            stage = StagePlan(name, context, limit, budget, records=StageStore(work_dir / f"{file}.jsonl").load())
            for record in stage.records.values():
                stage.longest_prompt = max(stage.longest_prompt, record["prompt_tokens"])
                if "skipped" in record:
                    stage.skipped[record["skipped"]] = stage.skipped.get(record["skipped"], 0) + 1
                else:
                    stage.fit += 1
                    stage.prompt_tokens += record["prompt_tokens"]
            stages.append(stage)
    report = stats.to_dict()
    plan = GenerationPlan(
        native_ctx,
        long_ctx,
        dict(report["stages"].get("documents", {})),
        dict(report["stages"].get("chunks", {})),
        stages,
        len(rows),
        report,
    )
    if not rows:
        plan.problem = diagnose(plan, config, docs, turns, stats)
    return plan


def diagnose(
    plan: GenerationPlan, config: GenerationConfig, docs: list[Document], turns: list[list[Turn]], stats: RunStats
) -> str:
    """The option that limits the first stage that skips prompts, and a value under which all of them fit."""
    counts, chunks = plan.documents, plan.chunks
    lengths = stats.lengths.get("document_tokens (examined)", [])
    if not counts.get("kept"):
        if not lengths:
            return "no non-empty documents were read from --documents."
        if counts.get("too_short") and not counts.get("too_long"):
            return (
                f"--min_doc_tokens {config.min_doc_tokens} drops every document (the longest has {max(lengths):,} "
                f"tokens); set --min_doc_tokens {max(lengths)} or lower."
            )
        if counts.get("too_long") and not counts.get("too_short"):
            return (
                f"--max_doc_tokens {config.max_doc_tokens} drops every document (the shortest has {min(lengths):,} "
                f"tokens); set --max_doc_tokens {round_up(min(lengths), 1024)} or higher (and --context_length to "
                "match)."
            )
        return (
            f"--min_doc_tokens {config.min_doc_tokens} / --max_doc_tokens {config.max_doc_tokens} drop every "
            f"document (lengths {min(lengths):,}-{max(lengths):,} tokens); widen the range, e.g. --min_doc_tokens "
            f"{min(lengths)} --max_doc_tokens {round_up(max(lengths), 1024)}."
        )
    if not chunks.get("turns_selected"):
        longest = max(d.num_tokens for d in docs)
        if chunks.get("documents_fitting_one_chunk") == counts.get("kept"):
            return (
                f"--chunk_tokens {config.chunk_tokens} holds every whole document (the longest has {longest:,} "
                f"tokens), so there is no short context to contrast with the long one; set --chunk_tokens "
                f"{max(1, longest // 2)} or lower (or select longer documents with --min_doc_tokens)."
            )
        longest_chunk = max(stats.lengths.get("chunk_tokens", [0]))
        return (
            f"--min_chunk_tokens {config.min_chunk_tokens} discards every chunk (the longest has {longest_chunk:,} "
            f"tokens); set --min_chunk_tokens {longest_chunk} or lower, or raise --chunk_tokens."
        )
    chunk_tokens = {t.key: t.chunk.num_tokens for ts in turns for t in ts}
    for stage in plan.stages:
        if stage.fit == stage.requested:  # the first stage that skips prompts limits the run
            continue
        overhead = max(r["prompt_tokens"] - chunk_tokens[k] for k, r in stage.records.items())
        if stage.context == "long":
            need = stage.longest_prompt + config.max_new_tokens
            current = (
                f"--context_length {config.context_length}"
                if config.context_length
                else f"--context_length (unset: the model's native {_fmt(plan.native_context)})"
            )
            return (
                f"{stage.name}: {current} is shorter than long prompts plus --max_new_tokens "
                f"{config.max_new_tokens} (the longest needs {need:,}); set --context_length "
                f"{round_up(need, 1024)}, or lower --max_doc_tokens."
            )
        if stage.name == "instructions":
            works = (plan.native_context or 0) - config.instruction_max_new_tokens - overhead
            what = f"the question prompt adds {overhead:,} tokens and --instruction_max_new_tokens "
            what += f"{config.instruction_max_new_tokens} more"
        elif config.max_short_prompt_tokens:
            return (
                f"{stage.name}: --max_short_prompt_tokens {config.max_short_prompt_tokens} is below short "
                f"prompts (the shortest has {min(r['prompt_tokens'] for r in stage.records.values()):,} tokens); set "
                f"--max_short_prompt_tokens {stage.longest_prompt} or unset it."
            )
        else:
            works = (stage.prompt_limit or 0) - overhead
            what = (
                f"the template and question add {overhead:,} tokens and --max_new_tokens {config.max_new_tokens} more"
            )
        if works <= 0:
            return (
                f"{stage.name}: the model's context ({_fmt(plan.native_context)} tokens) leaves no room for a chunk: "
                f"{what}; lower the new-token budget or set --model_context_length if the config understates it."
            )
        return (
            f"{stage.name}: --chunk_tokens {config.chunk_tokens} is too long for the model's "
            f"{_fmt(plan.native_context)}-token context ({what}); set --chunk_tokens {works} or lower."
        )
    if config.group_turns and config.min_turns > 1:
        return f"--min_turns {config.min_turns}: no document keeps that many turns; set --min_turns 1."
    return "no turn survives the stages; see the counts above."
