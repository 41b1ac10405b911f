"""`trl-longpo plot`: a saved trainer state becomes a PNG with the curves that were logged."""

import json

import pytest

pytest.importorskip("matplotlib")

from trl_longpo.cli import main as cli_main  # noqa: E402
from trl_longpo.plotting import curves, find_trainer_state, plot_training  # noqa: E402

LOG_HISTORY = [
    {"step": 0, "eval_long/acc@256": 0.5, "eval_long/acc@1024": 0.25, "eval_short/acc@256": 0.5, "eval_short/kl": 0.0},
    {"step": 1, "loss": 2.0, "nll_loss": 1.9, "longpo_loss": 0.69, "rewards/chosen": 0.01, "learning_rate": 1e-4},
    {"step": 2, "loss": 1.5, "nll_loss": 1.4, "longpo_loss": 0.60, "rewards/chosen": 0.05, "learning_rate": 1e-4},
    {"step": 2, "eval_long/acc@256": 0.75, "eval_long/acc@1024": 0.5, "eval_short/acc@256": 0.75, "eval_short/kl": 0.02},
    {"step": 2, "train_runtime": 3.0, "train_loss": 1.75},
]


def save_state(directory, log_history=LOG_HISTORY):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": log_history}))
    return directory


def test_curves_follow_the_log_history():
    data = curves(LOG_HISTORY)
    assert data["loss"]["loss"] == ([1, 2], [2.0, 1.5])
    assert data["long-context probe accuracy"] == {"eval_long/acc@256": ([0, 2], [0.5, 0.75]), "eval_long/acc@1024": ([0, 2], [0.25, 0.5])}
    assert data["short-context retention"]["eval_short/kl"] == ([0, 2], [0.0, 0.02])
    assert "learning_rate" not in str(data) and "train_loss" not in data["loss"]  # summary entries are not curves
    assert "rewards" in data and set(curves(LOG_HISTORY[1:3])) == {"loss", "rewards"}  # panels without data are left out


def test_plot_writes_a_png(tmp_path):
    run = save_state(tmp_path / "run")
    assert cli_main(["plot", str(run)]) == 0
    png = run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # a run that only saved checkpoints: the newest checkpoint's state is used
    save_state(tmp_path / "ckpt-run" / "checkpoint-1", LOG_HISTORY[:2])
    save_state(tmp_path / "ckpt-run" / "checkpoint-10", LOG_HISTORY)
    assert find_trainer_state(tmp_path / "ckpt-run").parent.name == "checkpoint-10"
    assert plot_training(tmp_path / "ckpt-run", tmp_path / "out.png") == tmp_path / "out.png"


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err
    save_state(tmp_path / "empty", [{"step": 1, "learning_rate": 1e-4}])
    assert cli_main(["plot", str(tmp_path / "empty")]) == 2
    assert "no logged loss, reward or retention metrics" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is not valid JSON"),  # empty (killed before writing)
        ('{"global_step": 2, "log_history": [{"step": 1, "lo', "is not valid JSON"),  # truncated
        ("[1, 2]", "is not a Trainer state: expected an object with a `log_history` list"),
        ('{"log_history": {"step": 1}}', "is not a Trainer state"),
    ],
)
def test_plot_names_a_damaged_state_file(tmp_path, capsys, content, message):
    """Issue 19: a raw JSON error or a traceback, without the file's name."""
    (tmp_path / "run").mkdir()
    state = tmp_path / "run" / "trainer_state.json"
    state.write_text(content)
    assert cli_main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{state} {message}" in err


def test_plot_ignores_a_checkpoint_best_folder(tmp_path):
    """Issue 19: `checkpoint-best/` (a name that is not a step) crashed the search for the newest checkpoint."""
    save_state(tmp_path / "run" / "checkpoint-best", LOG_HISTORY[:2])
    save_state(tmp_path / "run" / "checkpoint-4", LOG_HISTORY)
    assert find_trainer_state(tmp_path / "run").parent.name == "checkpoint-4"
