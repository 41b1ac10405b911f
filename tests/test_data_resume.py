"""Crash safety: SIGKILL a real `trl-longpo generate` process, rerun it, and get exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from trl_longpo.data.store import StageStore
from trl_longpo.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _command(model_dir: str, output: Path) -> list[str]:
    args = {
        "model": model_dir,
        "documents": "builtin:pydoc",
        "output": str(output),
        "pydoc_doc_chars": 3000,
        "min_doc_tokens": 300,
        "max_documents": 6,
        "chunk_tokens": 128,
        "turns_per_doc": 2,
        "max_new_tokens": 4,
        "instruction_max_new_tokens": 6,
        "on_parse_failure": "fallback",
        "drop_truncated": "false",
        "min_answer_words": 0,
        "max_repetition_ratio": 1.0,
        "batch_size": 1,
        "generation_batch_size": 1,
        "progress": "false",
    }
    return [sys.executable, "-m", "trl_longpo.cli", "generate"] + [f"--{k}={v}" for k, v in args.items()]


def _uninterrupted_run_here(model_dir: str, output: Path) -> None:
    """The reference run in this process, with one thread as the killed and resumed processes have: a separate
    interpreter would only add its imports (~8 CPU-s)."""
    from trl_longpo.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_command(model_dir, output)[3:]) == 0
    finally:
        torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _records(output: Path) -> dict[str, dict]:
    return {p.name: StageStore(p).load() for p in sorted((output / "work").glob("*.jsonl"))}


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, model_dir):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    victim = subprocess.Popen(
        _command(model_dir, crashed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    stage_file = crashed / "work" / "short_answers.jsonl"  # killed mid-way through the second stage
    deadline = time.monotonic() + 240
    while _lines(stage_file) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (crashed / "dataset").exists(), "the run finished before it could be killed"
    killed_at = _lines(stage_file)
    with open(stage_file, "ab") as f:  # and a torn last line, as a kill in the middle of a write would leave
        f.write(b'{"key": "0000000-torn/t0", "te')
    assert killed_at < 12 and not (crashed / "work" / "long_answers_turn1.jsonl").exists()

    resumed = subprocess.run(
        _command(model_dir, crashed), env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _uninterrupted_run_here(model_dir, reference)

    expected = datasets.load_from_disk(str(reference / "dataset")).to_list()
    assert len(expected) == 6
    assert datasets.load_from_disk(str(crashed / "dataset")).to_list() == expected
    assert _records(crashed) == _records(reference)
    for path in (crashed / "work").glob("*.jsonl"):  # never duplicated, torn line gone
        keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
        assert len(keys) == len(set(keys)) and "0000000-torn/t0" not in keys
    assert _lines(stage_file) >= killed_at
    stats = [json.loads((d / "stats.json").read_text()) for d in (crashed, reference)]
    for s in stats:
        s["run"].pop("output")
    assert stats[0] == stats[1]


def test_store_truncates_torn_tail_and_rejects_corruption(tmp_path):
    store = StageStore(tmp_path / "s.jsonl")
    store.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(store.path, "ab") as f:
        f.write(b'{"key": "c", "v"')
    assert set(store.load()) == {"a", "b"}
    store.append([{"key": "c", "v": 3}])
    assert store.load()["c"]["v"] == 3
    store.path.write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(RuntimeError, match="corrupt"):
        store.load()
