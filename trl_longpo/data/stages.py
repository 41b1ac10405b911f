"""The generation stages: documents -> turns (chunks) -> instructions -> short answers -> long answers.

Each stage is a list of keyed requests run through `run_stage`, which stores finished batches with `StageStore` and
skips stored keys, so a killed run resumes where it stopped. What happens after generation (parsing, picking,
filtering) is recomputed from the stored records on every run, so a resumed run ends exactly like an uninterrupted
one. Every request that does not make it is counted under the reason why.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from .backends import Completion, GenerationBackend, Sampling
from .chunking import Chunk, chunk_document, token_counter
from .config import GenerationConfig, derive_seed
from .documents import Document, document_id
from .filters import check_answer, same_answer
from .instructions import parse_instructions, pick_instruction, render_instruction_prompt
from .stats import RunStats
from .store import StageStore


@dataclass
class Turn:
    """One chunk of one document and everything generated for it."""

    doc: Document
    index: int
    chunk: Chunk
    instruction: str | None = None
    short: dict[str, Any] | None = None
    long: dict[str, Any] | None = None
    failure: str | None = None  # why the turn is unusable ("stage:reason")

    @property
    def key(self) -> str:
        return f"{self.doc.id}/t{self.index}"


# ------------------------------------------------------------------------------------------------------- helpers
def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt exactly as LongPOTrainer (and TRL's DPOTrainer) tokenizes it."""
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )


def join_context(context: str, instruction: str, config: GenerationConfig) -> str:
    context = context.strip()
    if config.instruction_position == "before":
        return instruction + config.joiner + context
    return context + config.joiner + instruction


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def answer_text(record: dict[str, Any]) -> str:
    return record["text"].strip()


class LazyBackend:
    """Loads the engine only when a stage has work, so re-running a finished run costs no model load."""

    def __init__(self, factory: Callable[[], GenerationBackend], given: GenerationBackend | None):
        self._factory, self._backend, self.owned = factory, given, given is None

    def get(self) -> GenerationBackend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def close(self) -> None:
        if self.owned and self._backend is not None:
            self._backend.close()


# ------------------------------------------------------------------------------------------------------- stages
def load_documents(
    config: GenerationConfig, table: datasets.Dataset, column: str, tokenizer, stats: RunStats
) -> list[Document]:
    """This rank's documents whose token count lies in [min_doc_tokens, max_doc_tokens], in source order; stops
    reading once `max_documents` are kept."""
    stats.set("documents", "in_source", len(table))
    indices = list(range(config.rank, len(table), config.world_size))
    if config.world_size > 1:
        stats.set("documents", f"in_shard_{config.rank}_of_{config.world_size}", len(indices))
    count = token_counter(tokenizer)
    docs: list[Document] = []
    step, examined = 64, 0
    with tqdm(total=len(indices), desc="documents", unit="doc", disable=not config.progress) as bar:
        for start in range(0, len(indices), step):
            if config.max_documents is not None and len(docs) >= config.max_documents:
                break
            batch = indices[start : start + step]
            texts = table.select(batch)[column] if config.world_size > 1 else table[batch[0] : batch[-1] + 1][column]
            valid = [(i, t) for i, t in zip(batch, texts, strict=True) if isinstance(t, str) and t.strip()]
            stats.count("documents", "empty", len(batch) - len(valid))
            for (index, text), n in zip(valid, count([t for _, t in valid]), strict=True):
                stats.add_length("document_tokens (examined)", n)
                if n < config.min_doc_tokens:
                    stats.count("documents", "too_short")
                elif config.max_doc_tokens is not None and n > config.max_doc_tokens:
                    stats.count("documents", "too_long")
                else:
                    docs.append(Document(document_id(index, text), index, text, n))
            examined += len(batch)
            bar.update(len(batch))
    if config.max_documents is not None and len(docs) > config.max_documents:
        stats.set("documents", "over_max_documents", len(docs) - config.max_documents)
        docs = docs[: config.max_documents]
    if examined < len(indices):
        stats.set("documents", "not_read_after_max_documents", len(indices) - examined)
    stats.set("documents", "kept", len(docs))
    return docs


def _select(chunks: list[Chunk], k: int, policy: str, rng: random.Random) -> list[int]:
    n = len(chunks)
    if n <= k:
        return list(range(n))
    if policy == "first":
        return list(range(k))
    if policy == "spread":
        return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]
    return sorted(rng.sample(range(n), k))


def make_turns(docs: list[Document], config: GenerationConfig, tokenizer, stats: RunStats) -> list[list[Turn]]:
    count = token_counter(tokenizer)
    per_doc: list[list[Turn]] = []
    for doc in tqdm(docs, desc="chunking", unit="doc", disable=not config.progress):
        chunks = chunk_document(doc.text, tokenizer, config.chunk_tokens, count)
        stats.count("chunks", "chunks", len(chunks))
        for c in chunks:
            stats.add_length("chunk_tokens", c.num_tokens)
        if len(chunks) < 2:  # the "short" context would be the whole document: no short/long gap to learn from
            stats.count("chunks", "documents_fitting_one_chunk")
            continue
        usable = [c for c in chunks if c.text.strip() and c.num_tokens >= config.min_chunk_tokens]
        if not usable:
            stats.count("chunks", "documents_without_usable_chunk")
            continue
        rng = random.Random(derive_seed(config.seed, "chunks", doc.id))
        picked = _select(usable, config.turns_per_doc, config.chunk_selection, rng)
        per_doc.append([Turn(doc, i, usable[j]) for i, j in enumerate(picked)])
        stats.count("chunks", "turns_selected", len(picked))
    stats.set("chunks", "documents_with_turns", len(per_doc))
    return per_doc


def run_stage(
    name: str,
    turns: list[Turn],
    build: Callable[[Turn], list[int]],
    fits: Callable[[int], bool],
    skip_reason: str,
    sampling: Sampling,
    backend: LazyBackend,
    work_dir: Path,
    config: GenerationConfig,
    long_context: bool = False,
) -> dict[str, dict[str, Any]]:
    """Generate for every turn not yet stored; returns the stored record of every turn, keyed by `Turn.key`."""
    store = StageStore(work_dir / f"{name}.jsonl")
    done = store.load()
    pending = [t for t in turns if t.key not in done]
    with tqdm(
        total=len(turns), initial=len(turns) - len(pending), desc=name, unit="req", disable=not config.progress
    ) as bar:
        for start in range(0, len(pending), config.batch_size):
            batch = pending[start : start + config.batch_size]
            records, todo = [], []
            for turn in batch:
                ids = build(turn)
                if fits(len(ids)):
                    todo.append((turn.key, ids))
                else:
                    records.append({"key": turn.key, "skipped": skip_reason, "prompt_tokens": len(ids)})
            if todo:
                seeds = [derive_seed(config.seed, name, key) for key, _ in todo]
                outs: list[Completion] = backend.get().generate(
                    [ids for _, ids in todo], sampling, seeds, long_context
                )
                records += [
                    {
                        "key": key,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": len(ids),
                        "completion_tokens": len(out.token_ids),
                    }
                    for (key, ids), out in zip(todo, outs)
                ]
            store.append(records)
            done.update((r["key"], r) for r in records)
            bar.update(len(batch))
    return {t.key: done[t.key] for t in turns}


def short_prompt_limit(config: GenerationConfig, native_ctx: int | None) -> int | None:
    """The most prompt tokens a short (chosen) prompt may have: the native context minus the answer budget."""
    return config.max_short_prompt_tokens or (native_ctx - config.max_new_tokens if native_ctx else None)


def _answer_failure(record: dict[str, Any], config: GenerationConfig, rejected: bool = False) -> str | None:
    if "skipped" in record:
        return record["skipped"]
    threshold = config.max_repetition_ratio
    if rejected and config.max_repetition_ratio_rejected is not None:
        threshold = config.max_repetition_ratio_rejected
    return check_answer(
        record["text"],
        record["finish_reason"],
        min_words=config.min_answer_words,
        max_repetition_ratio=threshold,
        refusal_phrases=config.refusal_phrases,
        drop_truncated=config.drop_truncated,
    )


def run_instructions(
    per_doc: list[list[Turn]],
    config: GenerationConfig,
    tokenizer,
    backend: LazyBackend,
    work_dir: Path,
    native_ctx: int | None,
    stats: RunStats,
) -> None:
    turns = [t for ts in per_doc for t in ts]
    stats.set("instructions", "requested", len(turns))
    records: dict[str, dict[str, Any]] = {}
    if config.instruction_source == "model":
        records = run_stage(
            "instructions",
            turns,
            lambda t: chat_prompt_ids(
                tokenizer,
                [
                    user(
                        render_instruction_prompt(
                            config.instruction_template, t.chunk.text.strip(), config.num_instructions
                        )
                    )
                ],
            ),
            lambda n: native_ctx is None or n + config.instruction_max_new_tokens <= native_ctx,
            "prompt_over_context",
            Sampling(config.instruction_max_new_tokens, config.instruction_temperature, config.instruction_top_p),
            backend,
            work_dir,
            config,
        )
    for turn in turns:
        rng = random.Random(derive_seed(config.seed, "instruction", turn.key))
        questions: list[str] = []
        if config.instruction_source == "model":
            record = records[turn.key]
            if "skipped" in record:
                stats.count("instructions", record["skipped"])
                turn.failure = f"instructions:{record['skipped']}"
                continue
            questions = parse_instructions(record["text"])
            stats.add_length("questions_parsed_per_chunk", len(questions))
            if config.require_exact_count and len(questions) != config.num_instructions:
                questions = []
            if questions:
                stats.count("instructions", "parsed")
            elif config.on_parse_failure == "fallback":
                stats.count("instructions", "fallback_used")
            else:
                stats.count("instructions", "dropped_unparsable")
                turn.failure = "instructions:unparsable"
                continue
        else:
            stats.count("instructions", "from_list")
        pool = questions or [s.strip() for s in config.fallback_instructions if s.strip()]
        turn.instruction = pick_instruction(
            pool, config.instruction_pick, rng, config.use_lead_in, config.lead_in_phrases
        )


def run_short_answers(
    per_doc: list[list[Turn]],
    config: GenerationConfig,
    tokenizer,
    backend: LazyBackend,
    work_dir: Path,
    native_ctx: int | None,
    stats: RunStats,
) -> None:
    turns = [t for ts in per_doc for t in ts if t.failure is None]
    stats.set("short_answers (chosen)", "requested", len(turns))
    max_short = short_prompt_limit(config, native_ctx)
    records = run_stage(
        "short_answers",
        turns,
        lambda t: chat_prompt_ids(tokenizer, [user(join_context(t.chunk.text, t.instruction, config))]),
        lambda n: max_short is None or n <= max_short,
        "prompt_over_limit",
        Sampling(config.max_new_tokens, config.temperature, config.top_p, config.top_k),
        backend,
        work_dir,
        config,
    )
    for turn in turns:
        turn.short = records[turn.key]
        reason = _answer_failure(turn.short, config)
        stats.count("short_answers (chosen)", reason or "passed")
        if reason:
            turn.failure = f"chosen:{reason}"


def _long_messages(turns: list[Turn], upto: int, config: GenerationConfig) -> list[dict[str, str]]:
    """The long prompt for turn `upto`: document + instruction 1, then each earlier long answer and the next
    instruction (paper Eq. 13); with long_turn_context=independent, document + this turn's instruction only."""
    doc = turns[0].doc.text
    if config.long_turn_context == "independent":
        return [user(join_context(doc, turns[upto].instruction, config))]
    messages = [user(join_context(doc, turns[0].instruction, config))]
    for k in range(1, upto + 1):
        messages += [assistant(answer_text(turns[k - 1].long)), user(turns[k].instruction)]
    return messages


def run_long_answers(
    per_doc: list[list[Turn]],
    config: GenerationConfig,
    tokenizer,
    backend: LazyBackend,
    work_dir: Path,
    long_ctx: int | None,
    stats: RunStats,
) -> None:
    stage = "long_answers (rejected)"
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, config.top_k)

    def fits(n: int) -> bool:
        return long_ctx is None or n + config.max_new_tokens <= long_ctx

    def finish(turn: Turn, record: dict[str, Any]) -> None:
        turn.long = record
        reason = _answer_failure(record, config, rejected=True)
        if reason is None and config.drop_identical and same_answer(turn.short["text"], record["text"]):
            reason = "identical_to_chosen"
        stats.count(stage, reason or "passed")
        if reason:
            turn.failure = f"rejected:{reason}"

    by_doc = {ts[0].doc.id: ts for ts in per_doc}

    def build(turn: Turn) -> list[int]:
        return chat_prompt_ids(tokenizer, _long_messages(by_doc[turn.doc.id], turn.index, config))

    if config.long_turn_context == "independent":
        turns = [t for ts in per_doc for t in ts if t.failure is None]
        stats.count(stage, "requested", len(turns))
        records = run_stage(
            "long_answers", turns, build, fits, "prompt_over_context", sampling, backend, work_dir, config, True
        )
        for turn in turns:
            finish(turn, records[turn.key])
        return

    for index in range(config.turns_per_doc):
        alive = []
        for ts in per_doc:
            if index >= len(ts) or ts[index].failure is not None:
                continue
            if any(prev.failure is not None for prev in ts[:index]):
                stats.count(stage, "skipped_after_failed_turn")
                continue
            alive.append(ts[index])
        stats.count(stage, "requested", len(alive))
        records = run_stage(
            f"long_answers_turn{index + 1}",
            alive,
            build,
            fits,
            "prompt_over_context",
            sampling,
            backend,
            work_dir,
            config,
            True,
        )
        for turn in alive:
            finish(turn, records[turn.key])
