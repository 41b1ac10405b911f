"""The self-evolution experiment (examples/self_evolution_experiment.py) runs end to end in a tiny setting: every arm
and both `evolve` rounds train and every metric (retrieval at every length, the list skill, drift, KL) is computed.
The outcome (which arm wins) is never checked here; see the README."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "self_evolution_experiment.py"


def _load():
    spec = importlib.util.spec_from_file_location("self_evolution_experiment", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_arm_trains_and_every_metric_is_computed(tmp_path):
    experiment = _load()
    out = tmp_path / "evo"
    result = experiment.main(
        ["--quick", "--output_dir", str(out), "--base_steps", "60", "--base_curriculum_steps", "40",
         "--base_check_samples", "8", "--num_documents", "12", "--num_documents_round2", "16", "--probes_per_length", "2",
         "--retention_samples", "2", "--epochs", "1", "--batch_size", "4", "--answer_temperature", "1.0"]
    )
    lengths = result["lengths"]
    assert lengths == [64, 128, 256, 512, 1024, 2048]
    assert set(result["runs"]) == {"base", *experiment.ALL_ARMS}
    expected = {f"acc@{n}" for n in lengths} | {"list_skill", "logp_drift", "kl"}
    for arm, runs in result["runs"].items():
        assert len(runs) == (1 if arm == "base" else len(result["settings"]["seeds"]))
        for metrics in runs:
            assert set(metrics) == expected, arm
            assert all(math.isfinite(v) for v in metrics.values()), (arm, metrics)
            assert all(0.0 <= metrics[f"acc@{n}"] <= 1.0 for n in lengths)
    for name, info in result["training"].items():
        assert info["steps"] > 0 and math.isfinite(info["train_loss"]), name
    # round 2 is evolve's second round: generated with, and trained from, round 1's model
    summary = result["rounds"]["seed0"]
    assert summary[1]["input_model"] == summary[0]["model"] and summary[1]["reference"] == summary[0]["model"]
    assert result["train_rows"] > 0 and result["held_out_rows"] > 0
    for name in ("results.json", "results.md", "self_evolution.png"):
        assert (out / name).stat().st_size > 0


def test_documents_file_follows_the_settings(tmp_path):
    """A documents file left by a run with other settings is rewritten, never reused (it was: a stale 120-document
    file replaced the 80 documents asked for)."""
    experiment = _load()
    world = experiment.SecretWorld()
    for count in (3, 2):
        args = experiment.parse_args(["--num_documents", "4", "--num_documents_round2", str(count)])
        config = experiment.evolve_config(world, args, tmp_path, "base", [4, 16], seed=0)
    assert len((tmp_path / "documents-16S.jsonl").read_text().splitlines()) == 2
    assert config["rounds"][1]["documents"] == str(tmp_path / "documents-16S.jsonl")
