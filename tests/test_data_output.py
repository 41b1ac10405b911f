"""The output directory of `generate` / `demo`: `--overwrite` deletes only a run, and only after the inputs are
valid; an OS lock keeps two runs out of one directory without stale locks; clear one-line CLI errors (issue 9,
cases 1, 2 and 8)."""

from __future__ import annotations

import json
import os
import select
import signal
import time

import pytest

from trl_longpo.cli import main
from trl_longpo.data import DocumentsError, GenerationConfig, OutputDirError, generate_dataset
from trl_longpo.data.store import LOCK_FILE, SETTINGS_FILE, locked_output
from trl_longpo.data.testing import ScriptedBackend

DOCS = ["First document.\n\nWith two paragraphs.", "Second document text.", "Third one."]


def respond(prompt, long_context):
    if "comprehensive English questions" in prompt:
        return "1. What is described in the text above?\n2. Why does it matter to the reader?"
    return "A long enough answer from the long prompt." if long_context else "A short prompt answer with words."


def _config(output, **overrides):
    settings = {"output": str(output), "chunk_tokens": 8, "max_new_tokens": 8, "progress": False, "batch_size": 2}
    return GenerationConfig(**{**settings, **overrides})


def _run(tokenizer, output, documents=DOCS, backend=None, **overrides):
    backend = backend or ScriptedBackend(tokenizer, respond)
    return generate_dataset(_config(output, **overrides), documents=documents, backend=backend, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------- overwrite (case 1)
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_directory_that_holds_no_run_is_never_written_or_deleted(tmp_path, tokenizer, overwrite):
    out = tmp_path / "papers"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputDirError, match=r"is not empty and holds no `generate` run \(no settings.json\)"):
        _run(tokenizer, out, overwrite=overwrite)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == sorted(["thesis.tex", LOCK_FILE])


def test_overwrite_deletes_nothing_when_the_inputs_are_invalid(tmp_path, tokenizer):
    out = tmp_path / "run"
    first = _run(tokenizer, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    config = _config(out, overwrite=True, documents=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DocumentsError, match="no such file"):
        generate_dataset(config, backend=ScriptedBackend(tokenizer, respond), tokenizer=tokenizer)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert len(first.dataset) >= 1


def test_overwrite_replaces_a_run(tmp_path, tokenizer):
    out = tmp_path / "run"
    _run(tokenizer, out)
    (out / "work" / "stale.jsonl").write_text("{}\n")  # anything inside a run directory belongs to the run
    backend = ScriptedBackend(tokenizer, respond)
    redone = _run(tokenizer, out, backend=backend, chunk_tokens=9, overwrite=True)
    assert backend.calls and len(redone.dataset) >= 1  # everything regenerated
    assert not (out / "work" / "stale.jsonl").exists()
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["chunk_tokens"] == 9


# ------------------------------------------------------------------------------------------------ the lock (case 2)
def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tmp_path, tokenizer):
    out = tmp_path / "run"
    seen = []

    def concurrent(prompt, long_context):  # a second run starts while the first is generating
        if not seen:
            with pytest.raises(OutputDirError, match=rf"in use by another `generate` run \(pid {os.getpid()} on host"):
                _run(tokenizer, out)
            seen.append(True)
        return respond(prompt, long_context)

    result = _run(tokenizer, out, backend=ScriptedBackend(tokenizer, concurrent))
    assert seen and len(result.dataset) >= 1
    again = _run(tokenizer, out)  # the lock is released when the run ends
    assert again.dataset.to_list() == result.dataset.to_list()


def test_lock_of_a_killed_run_does_not_block(tmp_path, tokenizer):
    out = tmp_path / "run"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the lock like a run, then wait to be killed
        try:
            with locked_output(out):
                os.write(write, b"x")
                time.sleep(120)
        finally:
            os.write(write, b"!")
            os._exit(0)
    try:
        assert select.select([read], [], [], 60)[0] and os.read(read, 1) == b"x"
        with pytest.raises(OutputDirError, match=rf"pid {pid} on host"):
            _run(tokenizer, out)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert f"pid {pid}" in (out / LOCK_FILE).read_text()  # the killed run's lock file is still there
    assert len(_run(tokenizer, out).dataset) >= 1


def test_ranks_of_a_multi_process_run_lock_their_own_shards(tmp_path, tokenizer):
    out = tmp_path / "run"
    shard0 = out / "shards" / "rank-00000-of-00002"
    with locked_output(shard0):  # rank 0 is running
        rank1 = _run(tokenizer, out, rank=1, world_size=2)
        with pytest.raises(OutputDirError, match="in use by another"):
            _run(tokenizer, out, rank=0, world_size=2)
    assert rank1.output_dir.name == "rank-00001-of-00002"


# --------------------------------------------------------------------------------------------------- CLI (case 8)
def test_empty_jsonl_says_the_file_is_empty(tmp_path, capsys):
    empty = tmp_path / "docs.jsonl"
    empty.write_text("\n")
    code = main(["generate", "--model", str(tmp_path), "--documents", str(empty), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "docs.jsonl" in err and "is empty" in err
    assert "StopIteration" not in err and "Traceback" not in err


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    from trl_longpo.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["generate", "--model", str(model), "--documents", "builtin:pydoc", "--max_documents", "1"]
    argv += ["--chunk_tokens", "512"]
    capsys.readouterr()
    code = main([*argv, "--output", str(blocker / "out"), "--progress", "false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("trl-longpo generate: error: Cannot write to the output directory")
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Not a directory" in err


def test_demo_accepts_overwrite_with_generates_safety(tmp_path, capsys):
    demo = ["demo", "--model", "tiny", "--output", str(tmp_path / "demo"), "--num_documents", "1", "--train_steps", "0"]
    demo += ["--progress", "false"]
    assert main(demo) == 0
    assert main([*demo, "--max_new_tokens", "8"]) == 2  # changed settings: refused, with the hint
    assert "--overwrite" in capsys.readouterr().err
    assert main([*demo, "--max_new_tokens", "8", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n") :])
    assert summary["data"] == str(tmp_path / "demo" / "data" / "dataset")
    settings = json.loads((tmp_path / "demo" / "data" / SETTINGS_FILE).read_text())["settings"]
    assert settings["max_new_tokens"] == 8
    assert (tmp_path / "demo" / "model" / "config.json").exists()  # only the data run was replaced
