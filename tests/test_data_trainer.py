"""Acceptance: `trl-longpo generate` on the bundled corpus with the tiny model yields rows LongPOTrainer trains on,
and `trl-longpo demo` runs end to end."""

from __future__ import annotations

import json

import datasets
import pytest

from trl_longpo.cli import main
from trl_longpo.tiny import save_tiny_model

trl_longpo = pytest.importorskip("trl_longpo")
if not hasattr(trl_longpo, "LongPOTrainer"):
    pytest.skip("LongPOTrainer is not available", allow_module_level=True)


@pytest.mark.slow
def test_generated_rows_train_one_step(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "data"
    code = main(
        [
            "generate",
            "--model",
            model_dir,
            "--documents",
            "builtin:pydoc",
            "--output",
            str(out),
            "--pydoc_doc_chars",
            "3000",
            "--min_doc_tokens",
            "300",
            "--max_documents",
            "3",
            "--chunk_tokens",
            "160",
            "--turns_per_doc",
            "2",
            "--max_new_tokens",
            "6",
            "--instruction_max_new_tokens",
            "8",
            "--on_parse_failure",
            "fallback",
            "--drop_truncated",
            "false",
            "--save_jsonl",
            "--save_parquet",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "rows" in printed and "short_answers (chosen)" in printed  # the summary table
    dataset = datasets.load_from_disk(str(out / "dataset"))
    assert (out / "data.jsonl").exists() and (out / "data.parquet").exists()
    stats = json.loads((out / "stats.json").read_text())
    assert len(dataset) == stats["stages"]["rows"]["rows"] >= 2  # random-model answers may fail the filters
    assert (
        stats["token_lengths"]["long_prompt_tokens"]["min"] > 3 * stats["token_lengths"]["short_prompt_tokens"]["max"]
    )
    assert stats["stages"]["instructions"]["fallback_used"] == 6

    from transformers import AutoTokenizer

    from trl_longpo import LongPOConfig, LongPOTrainer

    args = LongPOConfig(
        output_dir=str(tmp_path / "trained"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        bf16=False,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    trainer = LongPOTrainer(
        model=model_dir, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_dir)
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 1 and losses[0] == losses[0]  # one finite step


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--model",
            "tiny",
            "--output",
            str(tmp_path / "demo"),
            "--num_documents",
            "2",
            "--train_steps",
            "1",
            "--progress",
            "false",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") :])
    timings = summary["timings"]
    assert summary["rows"] >= 1 and set(timings) == {"build_model_s", "generate_s", "train_s", "total_s", "cpu_s"}
    assert timings["total_s"] >= timings["generate_s"] + timings["train_s"] and timings["cpu_s"] > 0
    assert (tmp_path / "demo" / "trained" / "config.json").exists()
    assert (tmp_path / "demo" / "data" / "stats.md").exists()
    assert len(datasets.load_from_disk(str(tmp_path / "demo" / "data" / "dataset"))) == summary["rows"]
    # retention metrics before and after training, and the plot of the curves
    assert {"eval_long/acc@256", "eval_long/acc@512", "eval_short/acc@256", "eval_short/kl"} <= set(summary["retention"])
    assert summary["retention"]["eval_short/kl"][0] == 0.0  # the policy starts as the reference
    assert "[demo] a generated row:" in printed and "retention metrics" in printed
    assert open(summary["plot"], "rb").read(4) == b"\x89PNG"
