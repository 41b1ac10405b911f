"""The self-evolution experiment (examples/self_evolution_experiment.py) runs end to end in a tiny setting: every arm
trains and every metric is computed. The outcome (which arm wins) is never checked here; see the README."""

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
        ["--quick", "--output_dir", str(out), "--base_steps", "20", "--num_documents", "24",
         "--probes_per_length", "2", "--retention_samples", "2", "--epochs", "1", "--batch_size", "4",
         "--answer_temperature", "1.0"]
    )
    lengths = result["lengths"]
    assert lengths == [64, 128, 256, 512]
    assert set(result["runs"]) == {"base", *experiment.ARMS}
    expected = {f"acc@{n}" for n in lengths} | {"logp_drift", "kl"}
    for arm, runs in result["runs"].items():
        assert len(runs) == (1 if arm == "base" else len(result["settings"]["seeds"]))
        for metrics in runs:
            assert set(metrics) == expected, arm
            assert all(math.isfinite(v) for v in metrics.values()), (arm, metrics)
            assert all(0.0 <= metrics[f"acc@{n}"] <= 1.0 for n in lengths)
    for name, info in result["training"].items():
        assert info["steps"] > 0 and math.isfinite(info["train_loss"]), name
    assert result["train_rows"] > 0 and result["held_out_rows"] > 0
    for name in ("results.json", "results.md", "self_evolution.png"):
        assert (out / name).stat().st_size > 0
