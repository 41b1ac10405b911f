"""Which checkpoint a run resumes from, and whether its files are intact.

`Trainer.train(resume_from_checkpoint=...)` takes a path or `True`, but from the command line (`--resume_from_checkpoint
True`) it receives the string "True" and looks for a directory of that name. And it trusts the newest
`checkpoint-N`, even one a kill left half-written. Here `True`, "True" and "latest" mean the newest COMPLETE checkpoint
in `output_dir`: the Trainer writes `trainer_state.json` after the model, optimizer and RNG files, so a checkpoint
without it was interrupted and is skipped with a warning. Files that exist but are corrupt (a truncated safetensors,
an empty `optimizer.pt`) are an error naming the file and the previous checkpoint.

Each checkpoint also records which data it was trained on (`DATA_FILE`: the train dataset's fingerprint and the
settings that decide which rows a step reads). The Trainer resumes by skipping the batches already seen; with another
dataset or other data settings those batch counts would point at other rows, so such a resume is refused, naming what
changed.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

LATEST = ("true", "latest")
STATE_FILE = "trainer_state.json"
DATA_FILE = "longpo_data.json"
# LongPOConfig fields that change the rows or their order (what the skipped-batch bookkeeping of a resume relies on)
DATA_SETTINGS = ("max_length", "truncation_mode", "seed", "data_seed")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from; the message names the file and what to do."""


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` directories of `output_dir`, newest (highest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint holding `trainer_state.json`; newer incomplete ones are skipped with a warning."""
    for path in checkpoints(output_dir):
        if (path / STATE_FILE).is_file():
            return path
        logger.warning(
            f"Skipping {path}: it has no {STATE_FILE}, so it was left incomplete (the run was probably stopped while "
            "saving it)."
        )
    return None


def _corruption(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded, from cheap structural checks (no tensor is read)."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if header_len is None or 8 + header_len > size:
                return "its header is truncated"
            try:
                header = json.loads(f.read(header_len))
            except ValueError:
                return "its header is not valid JSON"
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        if 8 + header_len + max(ends, default=0) > size:
            return f"it is truncated ({size} bytes, its header describes {8 + header_len + max(ends)})"
    elif path.suffix in {".pt", ".pth", ".bin"} and not zipfile.is_zipfile(path):
        return "it is not a complete torch.save archive (truncated?)"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError:
            return "it is not valid JSON"
    return None


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` for an incomplete checkpoint or a corrupt file in it."""
    path = Path(path)
    previous = [p for p in checkpoints(path.parent) if _step(p) < _step(path) and (p / STATE_FILE).is_file()]
    hint = f" Resume from the previous checkpoint: --resume_from_checkpoint {previous[0]}" if previous else ""
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is incomplete: it has no {STATE_FILE} (the run stopped while saving it).{hint}")
    for file in sorted(path.rglob("*")):
        if file.is_file() and (reason := _corruption(file)):
            raise CheckpointError(f"Checkpoint file {file} is corrupt: {reason}.{hint}")


def _step(path: Path) -> int:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else -1


def resolve_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: `None`/`False`/"false" for none, `True`/"True"/"latest" for the newest complete
    one in `output_dir`, else the given path; checked with `check_checkpoint`."""
    value = resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in LATEST):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise CheckpointError(
                f"Asked to resume from the latest checkpoint, but {output_dir} holds no complete checkpoint-N "
                "directory. Pass a checkpoint path, or leave --resume_from_checkpoint unset to start afresh."
            )
        logger.info(f"Resuming from {path}.")
    else:
        path = Path(value)
        if not path.is_dir():
            raise CheckpointError(f"Cannot resume: {value!r} is not a checkpoint directory (nor True/latest).")
    check_checkpoint(path)
    return str(path)


def data_fingerprint(train_dataset, args) -> dict:
    """What a run trains on: the train dataset's fingerprint (`datasets` hashes its content or source files) and row
    count, and the data-affecting settings. A streamed dataset has no fingerprint (None: not checked)."""
    fingerprint = getattr(train_dataset, "_fingerprint", None)
    rows = len(train_dataset) if fingerprint is not None and hasattr(train_dataset, "__len__") else None
    record = {"train_dataset": fingerprint, "train_rows": rows}
    record.update({name: getattr(args, name, None) for name in DATA_SETTINGS})
    return record


class DataFingerprintCallback(TrainerCallback):
    """Writes `DATA_FILE` into every checkpoint the Trainer saves (main process only)."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / DATA_FILE).write_text(json.dumps(self.fingerprint, indent=2, default=str) + "\n")


def check_resume_data(checkpoint: str | os.PathLike, current: dict) -> None:
    """Refuse to resume `checkpoint` with a train dataset or data settings other than those it was trained on."""
    path = Path(checkpoint) / DATA_FILE
    if not path.is_file():  # written by an older version, or a streamed dataset's run: nothing to compare
        return
    stored = json.loads(path.read_text())
    current = json.loads(json.dumps(current, default=str))
    if stored.get("train_dataset") is None or current.get("train_dataset") is None:
        stored, current = ({k: v for k, v in d.items() if not k.startswith("train_")} for d in (stored, current))
    changed = [
        f"{key}: {stored.get(key)!r} at the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    if changed:
        raise CheckpointError(
            f"Cannot resume from {checkpoint}: it was trained on other data or data settings ("
            + "; ".join(changed)
            + "). Resuming skips the batches already seen, which would now be other rows. Resume with the same "
            "dataset and settings, or start a new run (another output_dir, or no --resume_from_checkpoint)."
        )
