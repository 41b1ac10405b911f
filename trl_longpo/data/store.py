"""Crash-safe storage of generation results, and the settings lock that makes resuming safe.

Each stage appends finished batches to its own JSON-lines file with one `write` + `fsync` per batch, keyed by request.
A SIGKILL can only leave a torn last line, which `StageStore.load` cuts off; the keys already stored are skipped on the
next run, so work is never repeated or duplicated. Files that are written once (settings, stats, the final dataset)
are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import settings_hash

SETTINGS_FILE = "settings.json"
LOCK_FILE = ".generate.lock"


class SettingsMismatchError(RuntimeError):
    """The output directory holds a run made with different settings; resuming it would mix two datasets."""


class OutputDirError(RuntimeError):
    """The output directory cannot be used: busy with another run, not a run, or not writable."""


@contextlib.contextmanager
def locked_output(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on `output_dir` (created if needed) for the duration of a run.

    `flock` is released by the OS when its holder exits, however it exits, so a run killed with SIGKILL never blocks
    the next one (a marker file would). The lock file records its holder for the error a second run gets.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILE, "a+")
    except OSError as exc:
        raise OutputDirError(
            f"Cannot write to the output directory {str(output_dir)!r}: {exc.strerror or exc}."
        ) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            raise OutputDirError(
                f"{output_dir} is in use by another `generate` run ({holder}). Wait for it to finish, or use another "
                "--output (multi-process runs use --rank/--world_size, one shard directory each)."
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory that holds no run; with `overwrite`, delete a run's files (only a directory the
    pipeline wrote, recognised by its settings file). Call while holding `locked_output`: the lock file stays."""
    entries = [p for p in output_dir.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return
    if not (output_dir / SETTINGS_FILE).exists():
        raise OutputDirError(
            f"{output_dir} is not empty and holds no `generate` run (no {SETTINGS_FILE}); refusing to write into it"
            f"{' or delete it' if overwrite else ''}. Choose a new or empty --output directory."
        )
    if overwrite:
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


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
