"""Crash-safe storage of generation results, and the settings lock that makes resuming safe.

Each stage appends finished batches to its own JSON-lines file with one `write` + `fsync` per batch, keyed by request.
A SIGKILL can only leave a torn last line, which `StageStore.load` cuts off; the keys already stored are skipped on the
next run, so work is never repeated or duplicated. Files that are written once (settings, stats, the final dataset)
are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .config import settings_hash

SETTINGS_FILE = "settings.json"


class SettingsMismatchError(RuntimeError):
    """The output directory holds a run made with different settings; resuming it would mix two datasets."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written directory into place (the old one, if any, is removed first)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def lock_settings(output_dir: Path, settings: dict[str, Any]) -> str:
    """Record the settings of a new run, or check that an existing run used the same ones; returns the hash."""
    digest = settings_hash(settings)
    path = output_dir / SETTINGS_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("hash") != digest:
            old = stored.get("settings", {})
            new = json.loads(json.dumps(settings, default=str))
            diffs = [
                f"  {key}: {_describe(old.get(key, '<unset>'))} (stored) != {_describe(new.get(key, '<unset>'))} (now)"
                for key in sorted(set(old) | set(new))
                if old.get(key, "<unset>") != new.get(key, "<unset>")
            ]
            raise SettingsMismatchError(
                f"{output_dir} holds a run made with different settings, so it cannot be resumed:\n"
                + "\n".join(diffs or ["  (settings hash differs)"])
                + "\nUse the stored settings, another --output, or --overwrite to delete the old run."
            )
        return digest
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"hash": digest, "settings": settings}, indent=2, default=str) + "\n")
    return digest


class StageStore:
    """Append-only JSON-lines records `{"key": ..., ...}` of one stage."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn write from a killed process: drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        records = {}
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RuntimeError(
                    f"{self.path}:{number} is corrupt ({exc}); delete the file to redo the stage."
                ) from exc
            records[record["key"]] = record
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
