"""Iterated self-evolution (paper: Mistral-7B-Instruct-v0.2 -> 128K -> 256K -> 512K) from one YAML file.

    trl-longpo evolve examples/configs/evolve_tiny_cpu.yaml
    from trl_longpo.evolve import load_evolve_config, run_evolve; run_evolve(load_evolve_config("run.yaml"))

Round r generates its data with the model of round r-1 (`generate_dataset`) and trains from that model
(`LongPOTrainer`); its reference is round r-1's model by default (`reference: previous`) or the original base
(`reference: base`). Every round lives in OUTPUT/round-R with its resolved settings (`settings.json`), its data
(`data/`, the generation store) and its model (`model/`, with the trainer's checkpoints). Rerunning skips finished
rounds (`done.json`), resumes a partial round (generation through its store, training from the newest complete
checkpoint) and refuses a round whose settings changed. Training runs in this process, or through a launch command
(`accelerate launch --config_file ...`) that runs `-m trl_longpo.evolve --train_round OUTPUT/round-R`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.config import GenerationConfig
from .data.store import SettingsMismatchError, atomic_write_text, lock_settings

IN_PROCESS = "in-process"
REFERENCES = ("previous", "base")
ROUND_FIELDS = ("min_doc_tokens", "max_doc_tokens", "chunk_tokens", "context_length", "long_rope_theta")
# Training settings that change how a round runs but not what it learns: they may differ when a round is resumed
TRAINING_OPERATIONAL = frozenset(
    {"logging_steps", "report_to", "disable_tqdm", "dataloader_num_workers", "save_total_limit", "logging_dir"}
)
# Keys of a `train_mistral.py` YAML that evolve sets itself (per round), and model-loading keys it passes on
SET_BY_EVOLVE = frozenset({"model_name_or_path", "dataset_name", "output_dir", "build_tiny_model", "build_toy_dataset"})
MODEL_INIT_KEYS = {"dtype": "dtype", "attn_implementation": "attn_implementation", "model_revision": "revision"}
SETTINGS_FILE = "settings.json"
TRAIN_FILE = "train.json"
DONE_FILE = "done.json"


class EvolveConfigError(ValueError):
    """An evolve YAML that cannot work; the message names the field (and round) and how to fix it."""


@dataclass
class RoundConfig:
    """One self-evolution round: the document lengths it generates from and the RoPE θ of its two passes."""

    name: str = ""
    documents: str | None = None  # default: the run's documents
    min_doc_tokens: int | None = None
    max_doc_tokens: int | None = None
    chunk_tokens: int | None = None
    context_length: int | None = None  # the round's target context (long prompts above it are filtered)
    long_rope_theta: float | None = None  # RoPE θ of the generation's long (rejected) pass
    policy_rope_theta: float | None = None  # RoPE θ of the policy in training
    reference: str | None = None  # previous | base (default: the run's)
    launch: str | None = None  # in-process or a command prefix (default: the run's)
    training_config: str | None = None  # a LongPOConfig YAML, over the run's
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields, over the run's
    training: dict[str, Any] = field(default_factory=dict)  # LongPOConfig fields, over the run's and the YAML's


@dataclass
class EvolveConfig:
    """A self-evolution run: a base model, documents and a list of rounds (see `examples/configs/evolve_*.yaml`)."""

    base_model: str
    output: str
    rounds: list[RoundConfig]
    documents: str = ""
    reference: str = "previous"
    launch: str = IN_PROCESS
    training_config: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(mapping: dict[str, Any], allowed: set[str], where: str, hint: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise EvolveConfigError(f"{where}: unknown field(s) {unknown}; {hint}")


def evolve_config_from_dict(raw: dict[str, Any], source: str = "config") -> EvolveConfig:
    """Build and check an `EvolveConfig` from a parsed YAML mapping; errors name the field and round."""
    if not isinstance(raw, dict):
        raise EvolveConfigError(f"{source}: expected a mapping of fields, got {type(raw).__name__}")
    top = _fields(EvolveConfig)
    _check_keys(raw, top, source, f"allowed: {sorted(top)}")
    for name in ("base_model", "output", "rounds"):
        if not raw.get(name):
            raise EvolveConfigError(f"{source}: `{name}` is required")
    if not isinstance(raw["rounds"], list):
        raise EvolveConfigError(f"{source}: `rounds` must be a list of rounds")
    rounds = []
    for i, item in enumerate(raw["rounds"], 1):
        where = f"{source}: rounds[{i}]"
        if not isinstance(item, dict):
            raise EvolveConfigError(f"{where}: expected a mapping, got {item!r}")
        _check_keys(item, _fields(RoundConfig), where, f"allowed: {sorted(_fields(RoundConfig))}")
        rounds.append(RoundConfig(**item))
    config = EvolveConfig(**{**raw, "rounds": rounds})
    _validate(config, source)
    return config


def load_evolve_config(path: str | Path) -> EvolveConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvolveConfigError(f"{path}: no such evolve config file")
    return evolve_config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


def _validate(config: EvolveConfig, source: str) -> None:
    from .config import LongPOConfig

    generation_fields, training_fields = _fields(GenerationConfig), _fields(LongPOConfig)
    owned = {"model", "output", "documents", *ROUND_FIELDS}
    _check_keys(config.generation, generation_fields - owned, f"{source}: generation",
                f"use GenerationConfig fields (`trl-longpo generate --help`); {sorted(owned)} are set per round")
    _check_keys(config.training, training_fields - {"output_dir"}, f"{source}: training",
                "use LongPOConfig fields; output_dir is OUTPUT/round-R/model")
    for i, r in enumerate(config.rounds, 1):
        where = f"{source}: rounds[{i}]"
        _check_keys(r.generation, generation_fields - owned, f"{where}.generation",
                    f"use GenerationConfig fields; {sorted(owned)} are fields of the round itself")
        _check_keys(r.training, training_fields - {"output_dir", "policy_rope_theta"}, f"{where}.training",
                    "use LongPOConfig fields; policy_rope_theta is a field of the round itself")
        reference = r.reference or config.reference
        if reference not in REFERENCES:
            raise EvolveConfigError(f"{where}: reference must be one of {REFERENCES}, got {reference!r}")
        if not (r.documents or config.documents):
            raise EvolveConfigError(f"{where}: no documents (set `documents` for the run or the round)")
    if config.reference not in REFERENCES:
        raise EvolveConfigError(f"{source}: reference must be one of {REFERENCES}, got {config.reference!r}")


def _training_yaml(path: str | None, where: str) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    from .config import LongPOConfig

    if not Path(path).is_file():
        raise EvolveConfigError(f"{where}: training_config {path!r} is not a file")
    values = yaml.safe_load(Path(path).read_text()) or {}
    # A `train_mistral.py` YAML also names the model, data and output: evolve sets those per round; the model's
    # loading options (trl.ModelConfig) become `model_init_kwargs`
    values = {k: v for k, v in values.items() if k not in SET_BY_EVOLVE}
    init = {MODEL_INIT_KEYS[k]: values.pop(k) for k in list(MODEL_INIT_KEYS) if k in values}
    if init:
        values["model_init_kwargs"] = {**init, **(values.get("model_init_kwargs") or {})}
    _check_keys(values, _fields(LongPOConfig), f"{where}: training_config {path}",
                f"a LongPOConfig YAML (plus {sorted(SET_BY_EVOLVE | set(MODEL_INIT_KEYS))})")
    return values


# ------------------------------------------------------------------------------------------------------- rounds
@dataclass
class ResolvedRound:
    """Everything one round runs with, as written to OUTPUT/round-R/settings.json."""

    index: int
    directory: Path
    model: str  # the model the round generates with and trains from (round r-1's, or the base)
    reference: str  # the reference model's path
    generation: GenerationConfig
    training: dict[str, Any]  # LongPOConfig fields
    launch: str
    model_label: str  # `model` as the settings record it: the base, or "round-R/model" (the run may move)
    reference_label: str

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"

    def settings(self) -> dict[str, Any]:
        """The settings a finished or partial round must keep to be resumed (operational ones left out)."""
        generation = {f"generation.{k}": v for k, v in self.generation.hashed_settings().items() if k != "model"}
        training = {
            f"training.{k}": v for k, v in self.training.items() if k not in TRAINING_OPERATIONAL | {"output_dir"}
        }
        return {"model": self.model_label, "reference": self.reference_label, **generation, **training}


def round_directory(config: EvolveConfig, index: int) -> Path:
    return Path(config.output) / f"round-{index}"


def resolve_round(config: EvolveConfig, index: int) -> ResolvedRound:
    """Round `index` (1-based) with every default filled in: run-level values, then the training YAMLs, then the
    round's own fields win."""
    r = config.rounds[index - 1]
    where = f"rounds[{index}]"
    directory = round_directory(config, index)
    model = config.base_model if index == 1 else str(round_directory(config, index - 1) / "model")
    model_label = config.base_model if index == 1 else f"round-{index - 1}/model"
    use_base = (r.reference or config.reference) == "base"
    reference, reference_label = (config.base_model, config.base_model) if use_base else (model, model_label)
    generation = {**config.generation, **r.generation}
    generation.update({k: getattr(r, k) for k in ROUND_FIELDS if getattr(r, k) is not None})
    generation.update(model=model, documents=r.documents or config.documents, output=str(directory / "data"))
    training = {
        **_training_yaml(config.training_config, "run"),
        **config.training,
        **_training_yaml(r.training_config, where),
        **r.training,
        "output_dir": str(directory / "model"),
    }
    if r.policy_rope_theta is not None:
        training["policy_rope_theta"] = r.policy_rope_theta
    try:
        generation_config = GenerationConfig(**generation)
    except TypeError as exc:
        raise EvolveConfigError(f"{where}: generation settings: {exc}") from exc
    return ResolvedRound(
        index, directory, model, reference, generation_config, training, r.launch or config.launch, model_label,
        reference_label,
    )


def _lock_round(resolved: ResolvedRound, total: int) -> None:
    """Record the round's settings, or refuse a round that ran (finished or not) with other ones."""
    try:
        lock_settings(resolved.directory, resolved.settings())
    except SettingsMismatchError as exc:
        detail = str(exc).split("\n", 1)[1].rsplit("\n", 1)[0]
        state = "finished" if (resolved.directory / DONE_FILE).exists() else "started"
        raise SettingsMismatchError(
            f"Round {resolved.index}/{total} ({resolved.directory}) {state} with different settings:\n{detail}\n"
            "Restore them, or give the run a new `output` (later rounds build on this round's model)."
        ) from None


# ---------------------------------------------------------------------------------------------------- training
def write_train_spec(resolved: ResolvedRound) -> Path:
    """The round's training job as a JSON file, read by `train_round` in this process or in launched ones."""
    spec = {
        "model": resolved.model,
        "reference": None if resolved.reference == resolved.model else resolved.reference,
        "dataset": str(resolved.data_dir / "dataset"),
        "training": resolved.training,
    }
    path = resolved.directory / TRAIN_FILE
    atomic_write_text(path, json.dumps(spec, indent=2, default=str) + "\n")
    return path


def build_trainer(spec: dict[str, Any], dataset, callbacks: list | None = None):
    """The round's `LongPOTrainer`: policy = the round's input model; reference = the same model (the trainer's
    frozen initial copy) or, with `reference: base`, the base model loaded separately."""
    from trl.trainer.utils import create_model_from_path

    from .config import LongPOConfig
    from .trainer import LongPOTrainer

    args = LongPOConfig(**spec["training"])
    ref_model = None
    if spec["reference"] is not None:
        ref_model = create_model_from_path(spec["reference"], **dict(args.model_init_kwargs or {}))
    return LongPOTrainer(model=spec["model"], ref_model=ref_model, args=args, train_dataset=dataset, callbacks=callbacks)


def train_round(
    round_dir: str | Path,
    *,
    callbacks: list | None = None,
    prepare_rows: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Train one round from its `train.json`, resuming from the newest complete checkpoint; saves the model.

    `prepare_rows(dataset) -> dataset` (Python only) may filter or split the generated rows before training."""
    from datasets import load_from_disk

    from .checkpoints import latest_complete_checkpoint

    spec = json.loads((Path(round_dir) / TRAIN_FILE).read_text())
    dataset = load_from_disk(spec["dataset"])
    if prepare_rows is not None:
        dataset = prepare_rows(dataset)
    trainer = build_trainer(spec, dataset, callbacks)
    checkpoint = latest_complete_checkpoint(trainer.args.output_dir)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(trainer.args.output_dir)
    trainer.save_state()  # trainer_state.json next to the model (`trl-longpo plot`, the launch path's summary)
    return {
        "rows": len(dataset),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "trainer": trainer,
    }


def _launch(resolved: ResolvedRound) -> dict[str, Any]:
    command = [*shlex.split(resolved.launch), "-m", "trl_longpo.evolve", "--train_round", str(resolved.directory)]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"Round {resolved.index}: the training command exited with {done.returncode}: {shlex.join(command)}. "
            "Rerun `trl-longpo evolve` to resume from the newest checkpoint."
        )
    state_file = resolved.model_dir / "trainer_state.json"
    if not state_file.exists():
        raise RuntimeError(f"Round {resolved.index}: {shlex.join(command)} exited without saving {state_file}.")
    return {"steps": json.loads(state_file.read_text()).get("global_step"), "command": shlex.join(command)}


# -------------------------------------------------------------------------------------------------------- run
def _stage_counts(stats: dict[str, Any]) -> str:
    """`stage: passed/requested` for the generation stages, one line."""
    parts = []
    for stage, counts in stats.get("stages", {}).items():
        parts.append(f"{stage.split(' ')[0]} " + ",".join(f"{k}={v}" for k, v in counts.items()))
    return "; ".join(parts)


def run_evolve(
    config: EvolveConfig,
    *,
    callbacks: Callable[[int], list] | None = None,
    prepare_rows: Callable[[int, Any], Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every round; returns one summary per round. `callbacks(r)` and `prepare_rows(r, dataset)`
    (Python only, in-process rounds) add trainer callbacks and filter/split the rows of round r."""
    from .data import generate_dataset

    log = log or (lambda message: print(message, flush=True))
    total = len(config.rounds)
    summaries = []
    for index in range(1, total + 1):
        resolved = resolve_round(config, index)
        head = f"[evolve] round {index}/{total}"
        _lock_round(resolved, total)
        done_file = resolved.directory / DONE_FILE
        if done_file.exists():
            summary = json.loads(done_file.read_text())
            log(f"{head}: finished earlier, skipped ({resolved.model_dir})")
            summaries.append(summary)
            continue
        reference = "round input (previous)" if resolved.reference == resolved.model else f"base {resolved.reference}"

        start = time.perf_counter()
        resolved.generation.progress = False
        result = generate_dataset(resolved.generation, on_plan=lambda plan: log(f"{head} plan: {plan.format()}"))
        log(f"{head} generate: model {resolved.model}, {len(result.dataset)} rows -> {resolved.data_dir} "
            f"({time.perf_counter() - start:.0f}s) | {_stage_counts(result.stats)}")
        if len(result.dataset) == 0:
            raise RuntimeError(f"{head}: generation produced no rows; see {resolved.data_dir / 'stats.md'}")

        start = time.perf_counter()
        write_train_spec(resolved)
        if resolved.launch == IN_PROCESS:
            info = train_round(
                resolved.directory,
                callbacks=callbacks(index) if callbacks else None,
                prepare_rows=(lambda ds, i=index: prepare_rows(i, ds)) if prepare_rows else None,
            )
            info.pop("trainer")
        else:
            info = _launch(resolved)
        resumed = f", resumed from {Path(info['resumed_from']).name}" if info.get("resumed_from") else ""
        resumed += f", launched: {info['command']}" if info.get("command") else ""
        log(f"{head} train: from {resolved.model}, reference {reference}, {info.get('steps')} steps{resumed} -> "
            f"{resolved.model_dir} ({time.perf_counter() - start:.0f}s)")
        summary = {"round": index, "model": str(resolved.model_dir), "input_model": resolved.model,
                   "reference": resolved.reference, "rows": len(result.dataset), **info}
        atomic_write_text(done_file, json.dumps(summary, indent=2, default=str) + "\n")
        summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> int:
    """`trl-longpo evolve CONFIG.yaml`, and `python -m trl_longpo.evolve --train_round DIR` (what a launch command
    runs in every process)."""
    parser = argparse.ArgumentParser(prog="trl-longpo evolve", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="The evolve YAML (see examples/configs/evolve_tiny_cpu.yaml).")
    parser.add_argument("--train_round", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_round:
        train_round(args.train_round)
        return 0
    if not args.config:
        parser.error("the evolve YAML is required")
    run_evolve(load_evolve_config(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
