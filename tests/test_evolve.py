"""`trl-longpo evolve`: two rounds on the tiny CPU config. Round 2 generates with (and trains from) round 1's trained
weights, checked by hashing the weights each engine and trainer actually loaded; its reference is round 1's model;
a SIGKILL during round 2's training is resumed from its checkpoint without redoing round 1; a finished round whose
settings changed is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_longpo import evolve
from trl_longpo.data import SettingsMismatchError

TINY_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "evolve_tiny_cpu.yaml"


def weights_digest(model) -> str:
    """A hash of the parameters (not the RoPE buffers, which policy_rope_theta changes on purpose)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def saved_digest(path) -> str:
    from transformers import AutoModelForCausalLM

    return weights_digest(AutoModelForCausalLM.from_pretrained(path))


def small_config(base_model: str, output: Path) -> dict:
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw.update(base_model=base_model, output=str(output))
    raw["generation"].update(max_documents=3)
    return raw


class Spies:
    """Records what each generation engine and each trainer really loaded."""

    def __init__(self, monkeypatch):
        import trl_longpo.data.pipeline as pipeline

        self.engines: list[tuple[str, str]] = []  # (config.model, digest of the engine's weights)
        self.trainers: list[dict[str, str]] = []
        make_backend, build_trainer = pipeline.make_backend, evolve.build_trainer

        def spy_backend(config, tokenizer):
            backend = make_backend(config, tokenizer)
            self.engines.append((config.model, weights_digest(backend.model)))
            return backend

        def spy_trainer(spec, dataset, callbacks=None):
            trainer = build_trainer(spec, dataset, callbacks)
            self.trainers.append(
                {"policy": weights_digest(trainer.model), "reference": weights_digest(trainer.ref_model)}
            )
            return trainer

        monkeypatch.setattr(pipeline, "make_backend", spy_backend)
        monkeypatch.setattr(evolve, "build_trainer", spy_trainer)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from trl_longpo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("evolve") / "base")


@pytest.fixture(scope="module")
def two_rounds(base_model, tmp_path_factory):
    """One evolve run of the tiny config (two rounds), with what every engine and trainer loaded."""
    monkeypatch = pytest.MonkeyPatch()
    spies = Spies(monkeypatch)
    output = tmp_path_factory.mktemp("evolve") / "run"
    lines: list[str] = []
    try:
        summaries = evolve.run_evolve(evolve.evolve_config_from_dict(small_config(base_model, output)), log=lines.append)
    finally:
        monkeypatch.undo()
    return {"output": output, "summaries": summaries, "spies": spies, "lines": lines}


def test_two_rounds_each_generates_with_and_trains_from_the_previous_model(two_rounds, base_model):
    output, spies = two_rounds["output"], two_rounds["spies"]
    base, round1 = saved_digest(base_model), saved_digest(output / "round-1" / "model")
    round2 = saved_digest(output / "round-2" / "model")
    assert len({base, round1, round2}) == 3  # both rounds trained
    # round 1 generated with the base; round 2 with round 1's TRAINED weights (what the engine held, not its path)
    assert spies.engines == [(base_model, base), (str(output / "round-1" / "model"), round1)]
    assert [t["policy"] for t in spies.trainers] == [base, round1]
    # the default reference of round r is round r-1's model
    assert [t["reference"] for t in spies.trainers] == [base, round1]
    assert [s["steps"] for s in two_rounds["summaries"]] == [4, 4]
    settings = json.loads((output / "round-2" / "settings.json").read_text())["settings"]
    assert settings["generation.long_rope_theta"] == 40000.0 and settings["training.policy_rope_theta"] == 40000.0
    assert settings["model"] == settings["reference"] == "round-1/model"
    lines = two_rounds["lines"]
    assert [line.split(":")[0] for line in lines] == [
        "[evolve] round 1/2 plan", "[evolve] round 1/2 generate", "[evolve] round 1/2 train",
        "[evolve] round 2/2 plan", "[evolve] round 2/2 generate", "[evolve] round 2/2 train",
    ]
    assert lines[0].startswith("[evolve] round 1/2 plan: Plan: 3 of ")  # the dry run's plan, before the model loads


def test_rerun_skips_finished_rounds(two_rounds, base_model, monkeypatch):
    spies, lines = Spies(monkeypatch), []
    evolve.run_evolve(evolve.evolve_config_from_dict(small_config(base_model, two_rounds["output"])), log=lines.append)
    assert spies.engines == [] and spies.trainers == []
    assert all("finished earlier, skipped" in line for line in lines) and len(lines) == 2


def test_changed_setting_of_a_finished_round_is_refused(two_rounds, base_model):
    raw = small_config(base_model, two_rounds["output"])
    raw["rounds"][0]["chunk_tokens"] = 200
    with pytest.raises(SettingsMismatchError, match=r"Round 1/2 .* finished with different settings:\n  generation.chunk_tokens: 256 \(stored\) != 200"):
        evolve.run_evolve(evolve.evolve_config_from_dict(raw), log=lambda _: None)
    raw = small_config(base_model, two_rounds["output"])
    raw["rounds"][0]["training"] = {"learning_rate": 1e-3}
    with pytest.raises(SettingsMismatchError, match="learning_rate"):
        evolve.run_evolve(evolve.evolve_config_from_dict(raw), log=lambda _: None)
    # an operational setting (logging) may change: nothing is refused or redone
    raw = small_config(base_model, two_rounds["output"])
    raw["training"]["logging_steps"] = 2
    evolve.run_evolve(evolve.evolve_config_from_dict(raw), log=lambda _: None)


KILLER = """
import os, signal, sys
from transformers import TrainerCallback
from trl_longpo import evolve

class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # right after round 2's first checkpoint

config = evolve.load_evolve_config(sys.argv[1])
evolve.run_evolve(config, callbacks=lambda r: [Kill()] if r == 2 else [])
"""


@pytest.mark.slow
def test_kill_during_round_two_then_rerun_resumes_round_two(two_rounds, base_model, tmp_path, monkeypatch):
    output = tmp_path / "run"
    shutil.copytree(two_rounds["output"] / "round-1", output / "round-1")  # a finished round 1
    config_file = tmp_path / "evolve.yaml"
    config_file.write_text(yaml.safe_dump(small_config(base_model, output)))
    round1_files = {p: p.stat().st_mtime_ns for p in (output / "round-1").rglob("*") if p.is_file()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, str(config_file)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "round 1/2: finished earlier, skipped" in killed.stdout
    assert (output / "round-2" / "model" / "checkpoint-2").is_dir()
    assert not (output / "round-2" / "done.json").exists()

    spies, lines = Spies(monkeypatch), []
    summaries = evolve.run_evolve(evolve.load_evolve_config(config_file), log=lines.append)
    assert spies.engines == []  # round 2's generation had finished: nothing regenerated, no engine loaded
    assert len(spies.trainers) == 1  # round 2 only
    assert summaries[1]["resumed_from"].endswith("checkpoint-2") and summaries[1]["steps"] == 4
    assert "resumed from checkpoint-2" in lines[-1]
    assert round1_files == {p: p.stat().st_mtime_ns for p in (output / "round-1").rglob("*") if p.is_file()}
    # resuming gives the model an uninterrupted round 2 gives
    assert saved_digest(output / "round-2" / "model") == saved_digest(two_rounds["output"] / "round-2" / "model")


def test_config_errors_name_the_field(tmp_path):
    raw = {"base_model": "m", "output": str(tmp_path), "documents": "d", "rounds": [{"chunk_tokns": 5}]}
    with pytest.raises(evolve.EvolveConfigError, match=r"rounds\[1\]: unknown field\(s\) \['chunk_tokns'\]"):
        evolve.evolve_config_from_dict(raw)
    raw["rounds"] = [{"reference": "initial"}]
    with pytest.raises(evolve.EvolveConfigError, match=r"rounds\[1\]: reference must be one of"):
        evolve.evolve_config_from_dict(raw)
    raw["rounds"] = [{"training": {"learning_rat": 1}}]
    with pytest.raises(evolve.EvolveConfigError, match=r"rounds\[1\].training: unknown field"):
        evolve.evolve_config_from_dict(raw)


def test_shipped_configs_resolve_every_round():
    """The shipped YAMLs parse, and every round resolves (training YAMLs read, GenerationConfig built)."""
    configs = TINY_CONFIG.parent
    mistral = evolve.load_evolve_config(configs / "evolve_mistral_512k.yaml")
    rounds = [evolve.resolve_round(mistral, r) for r in (1, 2, 3)]
    assert [r.training["max_length"] for r in rounds] == [131072, 262144, 524288]
    assert [r.generation.context_length for r in rounds] == [131072, 262144, 524288]
    assert rounds[0].training["policy_rope_theta"] == 1e7 and rounds[0].generation.long_rope_theta == 1e7
    assert rounds[2].model == "outputs/evolve-mistral-512k/round-2/model" and rounds[2].reference == rounds[2].model
    assert rounds[0].training["model_init_kwargs"]["dtype"] == "bfloat16"
    assert rounds[1].launch.startswith("srun") and "model_name_or_path" not in rounds[1].training
    tiny = evolve.load_evolve_config(TINY_CONFIG)
    assert len(tiny.rounds) == 2 and evolve.resolve_round(tiny, 2).launch == evolve.IN_PROCESS


def _round_two_only(two_rounds, base_model, tmp_path, **round2) -> Path:
    """A run whose round 1 is the fixture's finished round 1, with round 2 changed by `round2`."""
    output = tmp_path / "run"
    shutil.copytree(two_rounds["output"] / "round-1", output / "round-1")
    raw = small_config(base_model, output)
    raw["rounds"][1].update(round2)
    config_file = tmp_path / "evolve.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    return config_file


def test_reference_base_option(two_rounds, base_model, tmp_path, monkeypatch):
    config_file = _round_two_only(two_rounds, base_model, tmp_path, reference="base")
    spies = Spies(monkeypatch)
    evolve.run_evolve(evolve.load_evolve_config(config_file), log=lambda _: None)
    round1 = saved_digest(two_rounds["output"] / "round-1" / "model")
    assert spies.trainers == [{"policy": round1, "reference": saved_digest(base_model)}]


@pytest.mark.slow
def test_launch_command_trains_the_round_in_another_process(two_rounds, base_model, tmp_path, monkeypatch, capsys):
    """`trl-longpo evolve` runs here (its round-2 generation in this process); the launch command it runs trains the
    round in another process."""
    from trl_longpo.cli import main

    config_file = _round_two_only(two_rounds, base_model, tmp_path, launch=shlex.quote(sys.executable))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the launched process
    assert main(["evolve", str(config_file)]) == 0
    assert f"-m trl_longpo.evolve --train_round {tmp_path / 'run' / 'round-2'}" in capsys.readouterr().out
    done = json.loads((tmp_path / "run" / "round-2" / "done.json").read_text())
    assert done["steps"] == 4
    # the launched process trained the same round as the in-process run
    assert saved_digest(tmp_path / "run" / "round-2" / "model") == saved_digest(
        two_rounds["output"] / "round-2" / "model"
    )
