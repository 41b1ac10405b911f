"""The embedded default: the whole LongPO loop offline on a CPU in a few minutes.

1. A tiny Mistral-architecture model and tokenizer are built locally and saved to OUTPUT/model, then loaded back by
   path, exactly as a hub model would be.
2. `generate_dataset` runs on CPython's help topics (`builtin:pydoc`, grouped into documents of ~2K tokens, chunked
   into ~256-token contexts) through the same code path as a 7B run on vLLM.
3. LongPOTrainer trains on the rows for a few steps and saves the model to OUTPUT/trained.

The tiny model is randomly initialised, so its "questions" and "answers" are gibberish. The demo therefore sets, as
explicit settings rather than special cases: `on_parse_failure="fallback"` (no question can be parsed from its
output, so generic instructions are used and counted as `fallback_used`) and `drop_truncated=False` (it almost never
emits EOS, so every answer stops at max_new_tokens). It was not pre-trained on the corpus: a few hundred CPU steps
would make the gibberish look more like text but would not make it write parsable questions, so the code path and
what the demo shows would be the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GenerationConfig
from .pipeline import generate_dataset


@dataclass
class DemoConfig:
    output: str = field(default="outputs/demo", metadata={"help": "Directory for the model, data and trained model."})
    num_documents: int = field(default=16, metadata={"help": "Documents to generate from."})
    doc_chars: int = field(default=6000, metadata={"help": "Characters per built-in document (~2K tokens)."})
    chunk_tokens: int = field(default=256, metadata={"help": "Tokens per short chunk."})
    turns_per_doc: int = field(default=2, metadata={"help": "Turns (chunks) per document."})
    max_new_tokens: int = field(default=16, metadata={"help": "Answer tokens (kept small for CPU)."})
    train_steps: int = field(default=8, metadata={"help": "LongPOTrainer optimisation steps (0 skips training)."})
    seed: int = field(default=0, metadata={"help": "Seed for generation and training."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    overwrite: bool = field(
        default=False, metadata={"help": "Delete an earlier demo run's data (OUTPUT/data) made with other settings."}
    )


def demo_generation_config(demo: DemoConfig, model_dir: str) -> GenerationConfig:
    """The demo's generation settings; every deviation from the defaults is explicit here."""
    return GenerationConfig(
        model=model_dir,
        documents="builtin:pydoc",
        output=str(Path(demo.output) / "data"),
        pydoc_doc_chars=demo.doc_chars,
        min_doc_tokens=2 * demo.chunk_tokens,
        max_doc_tokens=4096,
        max_documents=demo.num_documents,
        chunk_tokens=demo.chunk_tokens,
        turns_per_doc=demo.turns_per_doc,
        instruction_max_new_tokens=24,
        max_new_tokens=demo.max_new_tokens,
        on_parse_failure="fallback",  # a random model writes no parsable questions
        drop_truncated=False,  # a random model almost never emits EOS
        batch_size=8,
        generation_batch_size=8,
        seed=demo.seed,
        progress=demo.progress,
        overwrite=demo.overwrite,
    )


def train_on(
    dataset, model_dir: str, output_dir: str, steps: int, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """A few LongPOTrainer steps on the generated rows; returns the last logged metrics."""
    from transformers import AutoTokenizer

    from trl_longpo import LongPOConfig, LongPOTrainer

    args = LongPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        max_length=None,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )
    trainer = LongPOTrainer(
        model=model_dir, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir)
    )
    trainer.train()
    trainer.save_model(output_dir)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs[-1] if logs else {}


def run_demo(demo: DemoConfig | None = None) -> dict[str, Any]:
    """Build the tiny model, generate LongPO data with it and train on the data; returns paths and timings."""
    from trl_longpo.tiny import save_tiny_model

    demo = demo or DemoConfig()
    out = Path(demo.output)
    model_dir = out / "model"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not (model_dir / "config.json").exists():
        save_tiny_model(model_dir)
    timings["build_model_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = generate_dataset(demo_generation_config(demo, str(model_dir)))
    timings["generate_s"] = time.perf_counter() - start
    summary: dict[str, Any] = {
        "model": str(model_dir),
        "data": str(result.output_dir / "dataset"),
        "rows": len(result.dataset),
    }
    summary["report"] = str(result.output_dir / "stats.md")

    if demo.train_steps > 0:
        if len(result.dataset) == 0:
            raise RuntimeError(f"The demo generated no rows; see {summary['report']}.")
        start = time.perf_counter()
        summary["last_log"] = train_on(
            result.dataset, str(model_dir), str(out / "trained"), demo.train_steps, demo.seed, demo.progress
        )
        timings["train_s"] = time.perf_counter() - start
        summary["trained_model"] = str(out / "trained")
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    return summary
