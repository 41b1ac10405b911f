"""`trl-longpo plot OUTPUT_DIR`: the training curves of a run, from its `trainer_state.json`, into one PNG.

Panels: loss terms, rewards, long-context probe accuracy per length (`eval_long/acc@L`) and short-context retention
(`eval_short/*`), the last two logged by the retention callback. Panels without data are left out, so a run without
retention monitoring still plots. matplotlib is an optional extra (`pip install trl-longpo[demo]`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "longpo_loss", "nll_loss"),
    "rewards": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
    "long-context probe accuracy": (r"eval_long/acc@\d+",),
    "short-context retention": ("eval_short/logp_drift", "eval_short/kl", r"eval_short/acc@\d+"),
}


def find_trainer_state(path: str | Path) -> Path:
    """`path` itself, `path/trainer_state.json`, or the one in the newest `checkpoint-N` below it."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    from trl_longpo.checkpoints import STATE_FILE, checkpoints

    # checkpoint-N folders only, newest first (a `checkpoint-best/` copy or other names are not steps)
    states = [c / STATE_FILE for c in checkpoints(path) if (c / STATE_FILE).is_file()]
    if states:
        return states[0]
    raise FileNotFoundError(
        f"no trainer_state.json in {path} or its checkpoint-* folders; pass a training output_dir "
        "(the trainer writes trainer_state.json on save and at the end of `train()`)"
    )


def read_log_history(state_file: Path) -> list[dict]:
    """The `log_history` of a trainer_state.json; a `ValueError` naming the file when it is not one."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{state_file} is not valid JSON ({exc}): it is empty or was cut while being written. Plot a complete "
            "one (an earlier checkpoint-N/trainer_state.json) or rerun the save."
        ) from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        raise ValueError(
            f"{state_file} is not a Trainer state: expected an object with a `log_history` list of logged steps, "
            f"found {type(state).__name__}" + (" without one" if isinstance(state, dict) else "") + "."
        )
    return history


def curves(log_history: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {metric: (steps, values)}} for every metric of `PANELS` present in the log history."""
    result: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for panel, patterns in PANELS.items():
        for entry in log_history:
            for key, value in entry.items():
                if not isinstance(value, (int, float)) or not any(re.fullmatch(p, key) for p in patterns):
                    continue
                steps, values = result.setdefault(panel, {}).setdefault(key, ([], []))
                steps.append(int(entry.get("step", 0)))
                values.append(float(value))
    return result


def plot_training(path: str | Path, output: str | Path | None = None) -> Path:
    """Draw the curves of the run at `path` (an output_dir or a trainer_state.json); returns the PNG's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, also without a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("`trl-longpo plot` needs matplotlib: pip install matplotlib (or trl-longpo[demo])") from exc

    state_file = find_trainer_state(path)
    data = curves(read_log_history(state_file))
    if not data:
        raise ValueError(f"{state_file} has no logged loss, reward or retention metrics to plot")
    output = Path(output) if output else state_file.parent / "training_curves.png"
    ncols = min(2, len(data))
    nrows = -(-len(data) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(data) :]:
        ax.set_visible(False)
    for ax, (panel, series) in zip(axes.flat, data.items()):
        for key, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(panel)
        if panel == "long-context probe accuracy":
            ax.set_ylim(-0.05, 1.05)  # an accuracy: a flat line at 1.0 should look like one
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(state_file.parent.name, fontsize=8)  # the run's name, not a machine-specific path
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
