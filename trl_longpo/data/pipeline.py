"""The self-evolution pipeline's entry point: documents + a short-context model -> LongPOTrainer rows + report.

    documents -> chunks -> instructions -> short (chosen) and long (rejected) answers -> filters -> rows

Stages that need the long-context engine run after all short-context stages, so a vLLM run with a RoPE override
switches engines once. See `stages.py` for resuming and `rows.py` for the output format.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .backends import GenerationBackend, make_backend
from .config import DataConfigError, GenerationConfig
from .documents import load_documents_table
from .plan import GenerationPlan, plan_turns
from .rows import build_rows, shard_name, write_outputs
from .stages import LazyBackend, load_documents, make_turns, run_instructions, run_long_answers, run_short_answers
from .stats import RunStats, summary_table, write_report
from .store import lock_settings, locked_output, prepare_output

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    dataset: datasets.Dataset
    stats: dict[str, Any]
    output_dir: Path
    summary: str = field(default="", repr=False)


def _fingerprint_model(model: str) -> str | None:
    """Identify a local checkpoint by its config and weight-file sizes, so retraining in place is noticed."""
    path = Path(model) if model else None
    if path is None or not path.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json":
            digest.update(f.read_bytes())
        elif f.suffix in {".safetensors", ".bin"}:
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if not name:
        raise DataConfigError("No model given (--model).")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"Cannot load a tokenizer from {name!r}: {exc}") from exc


def _check_tokenizer(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataConfigError(
            f"The tokenizer of {name!r} has no chat template. LongPO rows are conversations rendered with the chat "
            "template (as LongPOTrainer renders them); use an instruct model's tokenizer (--tokenizer) or set "
            "`tokenizer.chat_template`."
        )


def _native_context(config: GenerationConfig, backend: GenerationBackend | None) -> int | None:
    if config.model_context_length:
        return config.model_context_length
    if backend is not None:
        return backend.context_length
    if not config.model:
        return None
    from transformers import AutoConfig

    from .backends import _model_max_positions

    try:
        return _model_max_positions(AutoConfig.from_pretrained(config.model))
    except (OSError, ValueError) as exc:
        raise DataConfigError(f"Cannot load the model config of {config.model!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------- entry
@dataclass
class _Inputs:
    """Everything both the dry run and the real run derive before any model is loaded."""

    out: Path
    tokenizer: Any
    native_ctx: int | None
    long_ctx: int | None
    docs: list
    per_doc: list
    stats: RunStats


def _prepare(config: GenerationConfig, documents, backend: GenerationBackend | None, tokenizer) -> _Inputs:
    """Read, filter and chunk the documents with the tokenizer and the model config only (no weights)."""
    config.validate()
    out = Path(config.output or ".")
    if config.world_size > 1:
        out = out / "shards" / shard_name(config.rank, config.world_size)
    source = documents if documents is not None else config.documents
    inside = [out.resolve(), *out.resolve().parents]  # --output itself and every folder above it
    if isinstance(source, str) and Path(source).is_dir() and Path(source).resolve() in inside:
        raise DataConfigError(
            f"--output {config.output} is inside --documents {source}: a rerun would read this run's own files "
            "(settings, work files, the dataset) as documents. Choose an --output outside the documents folder."
        )
    table, column = load_documents_table(source, config.text_column, config.pydoc_doc_chars)  # fail fast on inputs
    if tokenizer is None:
        tokenizer = _load_tokenizer(config.tokenizer or config.model)
    _check_tokenizer(tokenizer, config.tokenizer or config.model)
    native_ctx = _native_context(config, backend)
    if native_ctx is not None and config.chunk_tokens > native_ctx:
        raise DataConfigError(
            f"chunk_tokens={config.chunk_tokens} is larger than the model's context ({native_ctx} tokens): the short "
            "prompts would not fit. Lower --chunk_tokens (leave room for the instruction and max_new_tokens), or set "
            "--model_context_length if the config understates it."
        )
    long_ctx = config.context_length or native_ctx
    if config.backend == "vllm" and config.max_model_len and long_ctx and config.max_model_len < long_ctx:
        raise DataConfigError(
            f"--max_model_len {config.max_model_len} is below the long context ({long_ctx} tokens, --context_length "
            "or the model's): vLLM would refuse long prompts that the filter keeps. Raise --max_model_len or set "
            f"--context_length {config.max_model_len}."
        )
    stats = RunStats()
    docs = load_documents(config, table, column, tokenizer, stats)
    per_doc = make_turns(docs, config, tokenizer, stats)
    return _Inputs(out, tokenizer, native_ctx, long_ctx, docs, per_doc, stats)


def plan_generation(
    config: GenerationConfig,
    *,
    documents: str | list[str] | datasets.Dataset | None = None,
    backend: GenerationBackend | None = None,
    tokenizer: Any = None,
) -> GenerationPlan:
    """The dry run's plan (see `plan.py`): loads the tokenizer and the model config, never the weights or an engine.
    Arguments as for `generate_dataset`; a plan with no rows has `max_rows == 0` and `problem` set (`plan.check()`
    raises)."""
    i = _prepare(config, documents, backend, tokenizer)
    return plan_turns(i.docs, i.per_doc, config, i.tokenizer, i.native_ctx, i.long_ctx, i.stats)


def generate_dataset(
    config: GenerationConfig,
    *,
    documents: str | list[str] | datasets.Dataset | None = None,
    backend: GenerationBackend | None = None,
    tokenizer: Any = None,
    dry_run: bool | None = None,
    on_plan: Callable[[GenerationPlan], None] | None = None,
) -> GenerationResult | GenerationPlan:
    """Build (or resume building) a LongPO dataset in `config.output`; see the module docstring.

    `documents`, `backend` and `tokenizer` override `config.documents`, the engine named by `config.backend` and the
    tokenizer loaded from `config.tokenizer or config.model` (useful in notebooks and tests). Before any model is
    loaded the run's plan (`plan_generation`) is printed; a plan with no rows raises `EmptyPlanError` (naming the
    limiting option and a value that works). With `dry_run` (default: `config.dry_run`) the plan is returned and
    nothing else happens: no weights, no engine, no output directory. `on_plan(plan)` is called with the plan
    before it is checked (`trl-longpo evolve` logs it as the round's first line).
    """
    dry_run = config.dry_run if dry_run is None else dry_run
    if not dry_run and not config.output:
        config.validate()
        raise DataConfigError("No output directory given (--output).")
    inputs = _prepare(config, documents, backend, tokenizer)
    out, tokenizer, docs, per_doc, stats = inputs.out, inputs.tokenizer, inputs.docs, inputs.per_doc, inputs.stats
    native_ctx, long_ctx = inputs.native_ctx, inputs.long_ctx
    plan = plan_turns(docs, per_doc, config, tokenizer, native_ctx, long_ctx, stats)
    if config.progress or dry_run:
        print(plan.format(), flush=True)
    if on_plan is not None:
        on_plan(plan)
    plan.check()
    if dry_run:
        return plan
    settings = {
        **config.hashed_settings(),
        "documents_fingerprint": hashlib.sha256("\n".join(d.id for d in docs).encode()).hexdigest()[:16],
        "model_fingerprint": _fingerprint_model(config.model),
        "chat_template_sha": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16],
        "rank": config.rank,
        "world_size": config.world_size,
    }
    # Inputs are valid: only now is the output directory taken (and, with --overwrite, an old run deleted)
    with locked_output(out):
        prepare_output(out, config.overwrite)
        digest = lock_settings(out, settings)
        work_dir = out / "work"
        engine = LazyBackend(lambda: make_backend(config, tokenizer), backend)
        try:
            run_instructions(per_doc, config, tokenizer, engine, work_dir, native_ctx, stats)
            run_short_answers(per_doc, config, tokenizer, engine, work_dir, native_ctx, stats)
            run_long_answers(per_doc, config, tokenizer, engine, work_dir, long_ctx, stats)
        finally:
            engine.close()
        rows = build_rows(per_doc, config, stats)
        dataset = write_outputs(out, rows, config)
        report = {
            "run": {
                "output": str(out),
                "settings_hash": digest,
                "model": config.model,
                "backend": config.backend,
                "native_context": native_ctx,
                "long_context": long_ctx,
                "rows": len(rows),
            },
            **stats.to_dict(),
        }
        write_report(out, report)
        summary = summary_table(report)
        if config.progress:
            print(f"\n{summary}\n\n{len(rows)} rows -> {out / 'dataset'} (report: {out / 'stats.md'})")
        if not rows:
            logger.warning("No rows survived generation and filtering; see %s for the counts.", out / "stats.md")
        return GenerationResult(dataset, report, out, summary)
