"""The global batch is visible: the trainer logs it once at start, and every shipped training config states it on
the hardware it names (the Mistral recipes: the paper's 8 pairs)."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import longpo_args, make_rows
from datasets import Dataset

from trl_longpo import LongPOTrainer

# Training configs (for examples/train_mistral.py: they set TrainingArguments' output_dir); `trl-longpo evolve`
# configs in the same folder name training configs per round instead.
CONFIGS = [
    path
    for path in sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
    if "output_dir" in yaml.safe_load(path.read_text())
]
STATED = re.compile(
    r"^# Global batch on (\d+) (?:GPUs|processes|process): per-device (\d+) × accumulation (\d+) × dp (\d+) = (\d+) "
    r"pairs",
    re.MULTILINE,
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_each_config_states_its_global_batch(path):
    text = path.read_text()
    match = STATED.search(text)
    assert match, f"{path.name}: add '# Global batch on N GPUs: per-device B × accumulation G × dp D = T pairs'"
    gpus, per_device, accumulation, dp, total = map(int, match.groups())
    config = yaml.safe_load(text)
    assert per_device == config["per_device_train_batch_size"]
    assert accumulation == config.get("gradient_accumulation_steps", 1)
    assert dp == gpus // config.get("sequence_parallel_size", 1)
    assert total == per_device * accumulation * dp
    if path.name.startswith("mistral_"):
        assert total == 8, f"{path.name}: the paper's global batch is 8 pairs"


def test_trainer_logs_the_global_batch_once(tokenizer, tiny_model, tmp_path, caplog):
    args = longpo_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=1)
    trainer = LongPOTrainer(
        model=tiny_model, args=args, train_dataset=Dataset.from_list(make_rows(6)), processing_class=tokenizer
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Global batch:")]
    expected = "Global batch: 6 pairs per optimizer step = per-device 2 × accumulation 3 × data-parallel 1"
    assert said == [expected + "; the paper trains with 8."]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_each_config_names_only_real_fields(path):
    """A misspelt key (e.g. `optimizer: rmsprop`) would make the recipe silently differ from what it states."""
    import dataclasses
    import importlib.util

    from trl import ModelConfig

    from trl_longpo import LongPOConfig

    spec = importlib.util.spec_from_file_location("train_mistral", path.parents[1] / "train_mistral.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the file executes
    spec.loader.exec_module(script)
    known = {
        f.name for cls in (LongPOConfig, ModelConfig, script.LongPOScriptArguments) for f in dataclasses.fields(cls)
    }
    assert set(yaml.safe_load(path.read_text())) <= known
