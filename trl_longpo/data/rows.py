"""Assemble LongPOTrainer rows from finished turns and write them (dataset on disk, optional jsonl/parquet)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import datasets

from .config import DataConfigError, GenerationConfig
from .stages import Turn, answer_text, assistant, join_context, user
from .stats import RunStats
from .store import SETTINGS_FILE, atomic_replace_dir, atomic_write_text

_MESSAGE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def build_rows(per_doc: list[list[Turn]], config: GenerationConfig, stats: RunStats) -> list[dict[str, Any]]:
    """LongPOTrainer rows. Conversation mode keeps the longest valid prefix of turns (a later long answer was
    generated after the earlier ones, so a turn cannot be dropped from the middle); independent mode keeps every
    valid turn."""
    nested = config.group_turns and config.turns_per_doc > 1
    rows = []
    for ts in per_doc:
        if config.long_turn_context == "conversation":
            valid = []
            for t in ts:
                if t.failure is not None:
                    break
                valid.append(t)
        else:
            valid = [t for t in ts if t.failure is None]
        if not valid:
            stats.count("rows", "documents_without_valid_turn")
            continue
        if config.group_turns and len(valid) < config.min_turns:
            stats.count("rows", "documents_below_min_turns")
            continue
        for group in [valid] if config.group_turns else [[t] for t in valid]:
            rows.append(_row(group, config, nested, stats))
    stats.set("rows", "rows", len(rows))
    return rows


def _row(group: list[Turn], config: GenerationConfig, nested: bool, stats: RunStats) -> dict[str, Any]:
    first = group[0]
    prompt = [user(join_context(first.doc.text, first.instruction, config))]
    chosen, rejected = [], []
    for k, turn in enumerate(group):
        if k:
            chosen.append(user(turn.instruction))
            rejected.append(user(turn.instruction))
        chosen.append(assistant(answer_text(turn.short)))
        rejected.append(assistant(answer_text(turn.long)))
        stats.add_length("short_prompt_tokens", turn.short["prompt_tokens"])
        stats.add_length("chosen_tokens", turn.short["completion_tokens"])
        stats.add_length("rejected_tokens", turn.long["completion_tokens"])
    stats.add_length("long_prompt_tokens", first.long["prompt_tokens"])
    stats.count("rows", f"rows_with_{len(group)}_turns")
    shorts = [[user(join_context(t.chunk.text, t.instruction, config))] for t in group]
    return {"prompt": prompt, "short_prompt": shorts if nested else shorts[0], "chosen": chosen, "rejected": rejected}


def _features(nested: bool) -> datasets.Features:
    short = datasets.List(_MESSAGE) if nested else _MESSAGE
    return datasets.Features({"prompt": _MESSAGE, "short_prompt": short, "chosen": _MESSAGE, "rejected": _MESSAGE})


def write_outputs(out: Path, rows: list[dict[str, Any]], config: GenerationConfig) -> datasets.Dataset:
    features = _features(config.group_turns and config.turns_per_doc > 1)
    dataset = datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in features}, features=features)
    tmp = out / "dataset.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp), num_shards=1 if len(dataset) == 0 else None)  # 0 shards would not load back
    atomic_replace_dir(tmp, out / "dataset")
    if config.save_jsonl:
        dataset.to_json(str(out / "data.jsonl.tmp"), lines=True, force_ascii=False)
        (out / "data.jsonl.tmp").replace(out / "data.jsonl")
    if config.save_parquet:
        dataset.to_parquet(str(out / "data.parquet.tmp"))
        (out / "data.parquet.tmp").replace(out / "data.parquet")
    return datasets.load_from_disk(str(out / "dataset"))


def merge_shards(output: str | Path) -> datasets.Dataset:
    """Concatenate the datasets of all `rank-r-of-n` shards under OUTPUT/shards into OUTPUT/dataset, after
    `check_shards` (one world size, every rank present and finished, the same settings)."""
    output = Path(output)
    shards = check_shards(output / "shards")
    merged = datasets.concatenate_datasets([datasets.load_from_disk(str(s / "dataset")) for s in shards])
    tmp = output / "dataset.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_to_disk(str(tmp))
    atomic_replace_dir(tmp, output / "dataset")
    atomic_write_text(output / "shards.txt", "\n".join(s.name for s in shards) + "\n")
    return merged


def check_shards(shards_dir: Path) -> list[Path]:
    """The shard directories of one sharded run in rank order; raises `ShardsError` naming missing or unfinished
    ranks, a second world size, or settings (other than the rank) that differ between shards."""
    found = {}
    for path in sorted(shards_dir.glob("rank-*-of-*")):
        match = _SHARD.match(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise ShardsError(f"No shards (rank-R-of-N directories) under {shards_dir}.")
    if len(found) > 1:
        listing = "; ".join(f"world size {n}: {sorted(p.name for p in ranks.values())}" for n, ranks in sorted(found.items()))
        raise ShardsError(
            f"{shards_dir} holds shards of {len(found)} runs with different --world_size ({listing}). Delete the "
            "shards of the run you do not want, then merge again."
        )
    ((world_size, ranks),) = found.items()
    missing = [r for r in range(world_size) if r not in ranks]
    if missing:
        raise ShardsError(
            f"{shards_dir}: rank(s) {missing} of --world_size {world_size} are missing (no "
            f"{', '.join(shard_name(r, world_size) for r in missing[:5])}). Run `trl-longpo generate --rank R "
            f"--world_size {world_size}` for them, then merge again."
        )
    shards = [ranks[r] for r in range(world_size)]
    unfinished = [s.name for s in shards if not (s / "dataset").exists()]
    if unfinished:
        raise ShardsError(
            f"{shards_dir}: shard(s) {unfinished} are not finished (no dataset/). Rerun (resume) them, then merge."
        )
    settings = {s.name: _shard_settings(s) for s in shards}
    reference = settings[shards[0].name]
    differing = sorted(
        {
            key
            for values in settings.values()
            for key in set(values) | set(reference)
            if key not in _PER_RANK_SETTINGS and values.get(key, "<unset>") != reference.get(key, "<unset>")
        }
    )
    if differing:
        shown = "; ".join(
            f"{key}: " + ", ".join(f"{name}={values.get(key, '<unset>')!r}" for name, values in settings.items())
            for key in differing
        )
        raise ShardsError(
            f"The shards under {shards_dir} were generated with different settings ({shown[:600]}); merging them "
            "would mix two datasets. Regenerate the odd shards with the settings of the others."
        )
    return shards


_SHARD = re.compile(r"^rank-(\d+)-of-(\d+)$")
_PER_RANK_SETTINGS = ("rank", "documents_fingerprint")  # each rank reads its own documents


class ShardsError(DataConfigError):
    """The shards of a multi-process run cannot be merged; the message names the shards and what to do."""


def shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}"


def _shard_settings(shard: Path) -> dict[str, Any]:
    try:
        return json.loads((shard / SETTINGS_FILE).read_text())["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise ShardsError(f"Cannot read the settings of shard {shard} ({SETTINGS_FILE}): {exc}.") from exc
