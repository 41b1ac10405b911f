"""Resuming (issue 9, case 7): `True`/"True"/"latest" mean the newest complete checkpoint, a checkpoint a kill left
without `trainer_state.json` is skipped with a warning, and corrupt files are an error naming the file and the
previous checkpoint."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import pytest
from conftest import longpo_args, make_rows
from datasets import Dataset
from transformers.utils import logging as hf_logging

from trl_longpo import LongPOTrainer
from trl_longpo.checkpoints import CheckpointError, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_secretTOKENnotOnDisk123"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tokenizer):
    """A 2-step run that saved checkpoint-1 and checkpoint-2 (model, optimizer, scheduler, RNG, trainer state)."""
    from trl_longpo.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("run")
    trainer = LongPOTrainer(
        model=build_tiny_model(seed=0),
        args=longpo_args(
            tmp, max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=1, hub_token=SECRET
        ),
        train_dataset=Dataset.from_list(make_rows(4)),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    assert trainer.args.hub_token == SECRET  # the live config keeps it (push_to_hub needs it)
    out = tmp / "out"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    return out


@pytest.fixture
def run(saved_run, tmp_path):
    return Path(shutil.copytree(saved_run, tmp_path / "out"))


@pytest.mark.parametrize("value", [True, "True", "true", "latest"])
def test_true_and_latest_mean_the_newest_checkpoint(run, value):
    assert resolve_checkpoint(value, str(run)) == str(run / "checkpoint-2")


@pytest.mark.parametrize("value", [None, False, "false", ""])
def test_no_resume(run, value):
    assert resolve_checkpoint(value, str(run)) is None


def test_incomplete_checkpoint_is_skipped_with_a_warning(run, caplog):
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # killed while saving
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("latest", str(run)) == str(run / "checkpoint-1")
    assert "Skipping" in caplog.text and "checkpoint-2" in caplog.text
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is incomplete.*--resume_from_checkpoint .*checkpoint-1"):
        resolve_checkpoint(str(run / "checkpoint-2"), str(run))  # named explicitly: an error, not a silent skip


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (lambda p: _truncate(p, 0.5), "model.safetensors", "it is truncated"),
        (lambda p: _truncate(p, 0.0001), "model.safetensors", "its header is truncated"),
        (lambda p: p.write_bytes(b""), "optimizer.pt", "it is empty"),
        (lambda p: _truncate(p, 0.9), "optimizer.pt", "it is not a complete torch.save archive"),
        (lambda p: _truncate(p, 0.5), "trainer_state.json", "it is not valid JSON"),
    ],
)
def test_corrupt_file_is_named_and_the_previous_checkpoint_suggested(run, damage, file, reason):
    damage(run / "checkpoint-2" / file)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(True, str(run))
    message = str(info.value)
    assert f"checkpoint-2/{file} is corrupt: {reason}" in message
    assert f"--resume_from_checkpoint {run / 'checkpoint-1'}" in message


def test_intact_checkpoints_pass(run):
    """Negative control: the checks do not refuse what the Trainer wrote."""
    for name in ("checkpoint-1", "checkpoint-2"):
        assert resolve_checkpoint(str(run / name), str(run)) == str(run / name)


def test_nothing_to_resume(tmp_path):
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint("True", str(tmp_path))


def _script(tmp_path, *extra):
    spec = importlib.util.spec_from_file_location("train_mistral", ROOT / "examples" / "train_mistral.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses resolve annotations through the module
    spec.loader.exec_module(script)
    from trl import ModelConfig, TrlParser

    from trl_longpo import LongPOConfig

    parser = TrlParser((script.LongPOScriptArguments, LongPOConfig, ModelConfig))
    argv = ["--config", str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")]
    argv += ["--model_name_or_path", str(tmp_path / "tiny"), "--dataset_name", str(tmp_path / "toy.jsonl")]
    argv += ["--output_dir", str(tmp_path / "run"), "--build_toy_dataset", "8", "--per_device_train_batch_size", "2"]
    argv += ["--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "1", *extra]
    script.main(*parser.parse_args_and_config(args=argv))


@pytest.mark.slow
def test_example_script_trains_saves_and_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    """`examples/train_mistral.py` on `tiny_cpu.yaml` (its one single-process run in the suite): YAML config, local
    tiny model loaded by path, train, saved model; then a resume from the newest complete checkpoint."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    _script(tmp_path, "--max_steps", "2")
    out = tmp_path / "run"
    assert (tmp_path / "toy.jsonl").exists() and (tmp_path / "tiny" / "config.json").exists()
    model, initial = (AutoModelForCausalLM.from_pretrained(path) for path in (out, tmp_path / "tiny"))
    assert model.config.rope_parameters["rope_theta"] == 1e6  # policy_rope_theta from the config is saved
    assert initial.config.rope_parameters["rope_theta"] != 1e6
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))
    assert "longpo" in (out / "README.md").read_text().lower()  # model card cites LongPO

    (out / "checkpoint-2" / "trainer_state.json").unlink()  # a kill while saving step 2
    hf_logging.enable_propagation()
    with caplog.at_level(logging.INFO):
        _script(tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "True")
    assert f"Resuming from {out / 'checkpoint-1'}" in caplog.text
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_hub_token_is_never_written_to_disk(saved_run):
    """training_args.bin of the run and of every checkpoint is a pickled config: it must not hold the hub token
    (issue 19: it did, in plain text, and push_to_hub uploads it)."""
    import copy

    import torch

    files = [p for p in saved_run.rglob("*") if p.is_file()]
    assert sum(p.name == "training_args.bin" for p in files) == 3  # the run, checkpoint-1, checkpoint-2
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    stored = torch.load(saved_run / "training_args.bin", weights_only=False)
    assert stored.hub_token is None and stored.max_steps == 2  # the rest of the config is kept
    args = longpo_args(saved_run.parent, hub_token=SECRET)
    assert copy.deepcopy(args).hub_token == SECRET and copy.copy(args).hub_token == SECRET  # copies keep it


def _resume(run, tokenizer, rows, **overrides):
    from trl_longpo.tiny import build_tiny_model

    args = longpo_args(run.parent, max_steps=2, per_device_train_batch_size=2, save_strategy="no", **overrides)
    args.output_dir = str(run)
    trainer = LongPOTrainer(
        model=build_tiny_model(seed=0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    return trainer.train(resume_from_checkpoint=str(run / "checkpoint-1"))


def test_resume_refuses_other_data_or_data_settings(run, tokenizer):
    """A checkpoint records the data it was trained on; resuming on other rows or with other data settings would
    make the skipped-batch bookkeeping point at other rows (issue 19: it continued silently)."""
    assert (run / "checkpoint-1" / "longpo_data.json").is_file()
    with pytest.raises(CheckpointError, match=r"train_dataset: '[0-9a-f]+' at the checkpoint, '[0-9a-f]+' now"):
        _resume(run, tokenizer, make_rows(4, seed=1))
    with pytest.raises(CheckpointError, match="max_length: None at the checkpoint, 4096 now"):
        _resume(run, tokenizer, make_rows(4), max_length=4096)
    assert _resume(run, tokenizer, make_rows(4)).global_step == 2  # negative control: same data resumes
