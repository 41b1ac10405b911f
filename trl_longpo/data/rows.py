"""Assemble LongPOTrainer rows from finished turns and write them (dataset on disk, optional jsonl/parquet)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import datasets

from .config import GenerationConfig
from .stages import Turn, answer_text, assistant, join_context, user
from .stats import RunStats
from .store import atomic_replace_dir, atomic_write_text

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
    """Concatenate the datasets of all `rank-r-of-n` shards under OUTPUT/shards into OUTPUT/dataset."""
    output = Path(output)
    shards = sorted((output / "shards").glob("rank-*-of-*"))
    if not shards:
        raise FileNotFoundError(f"No shards under {output / 'shards'}.")
    world = {s.name.rsplit("-of-", 1)[1] for s in shards}
    missing = [s for s in shards if not (s / "dataset").exists()]
    if len(world) != 1 or len(shards) != int(next(iter(world))) or missing:
        raise RuntimeError(
            f"Shards under {output / 'shards'} are incomplete: found {[s.name for s in shards]}, unfinished "
            f"{[s.name for s in missing]}."
        )
    merged = datasets.concatenate_datasets([datasets.load_from_disk(str(s / "dataset")) for s in shards])
    tmp = output / "dataset.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_to_disk(str(tmp))
    atomic_replace_dir(tmp, output / "dataset")
    atomic_write_text(output / "shards.txt", "\n".join(s.name for s in shards) + "\n")
    return merged
