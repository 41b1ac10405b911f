"""Document loaders and the clear errors: unreadable inputs, missing column, no chat template, chunk size vs context,
settings mismatch on resume."""

from __future__ import annotations

import copy
import json

import datasets
import pytest

from trl_longpo.cli import main
from trl_longpo.data import (
    DataConfigError,
    DocumentsError,
    GenerationConfig,
    SettingsMismatchError,
    generate_dataset,
    load_documents_table,
)
from trl_longpo.data.testing import ScriptedBackend

DOCS = ["First document.\n\nWith two paragraphs.", "Second document text.", "Third one."]


def respond(prompt, long_context):
    if "comprehensive English questions" in prompt:
        return "1. What is described in the text above?\n2. Why does it matter to the reader?"
    return "A long enough answer from the long prompt." if long_context else "A short prompt answer with words."


def config(tmp_path, **overrides):
    settings = {
        "output": str(tmp_path / "out"),
        "chunk_tokens": 8,
        "max_new_tokens": 8,
        "progress": False,
        "batch_size": 2,
    }
    return GenerationConfig(**{**settings, **overrides})


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "txt_dir", "saved", "list"])
def test_loaders(tmp_path, kind):
    if kind == "jsonl":
        source = tmp_path / "docs.jsonl"
        source.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    elif kind in {"parquet", "csv"}:
        source = tmp_path / f"docs.{kind}"
        table = datasets.Dataset.from_dict({"text": DOCS})
        table.to_parquet(str(source)) if kind == "parquet" else table.to_csv(str(source), index=False)
    elif kind == "txt_dir":
        source = tmp_path / "texts"
        source.mkdir()
        for i, t in enumerate(DOCS):
            (source / f"{i}.txt").write_text(t)
        (source / "README.bin").write_bytes(b"\x00\x01")  # ignored: not a text suffix
    elif kind == "saved":
        source = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(source))
    else:
        source = DOCS
    table, column = load_documents_table(source if kind == "list" else str(source))
    assert table[column] == DOCS


def test_builtin_corpus_groups_topics_into_long_documents():
    table, column = load_documents_table("builtin:pydoc", pydoc_doc_chars=6000)
    lengths = [len(t) for t in table[column]]
    assert len(lengths) > 10 and min(lengths[:-1]) >= 6000


@pytest.mark.parametrize(
    "source, message",
    [("/nonexistent/docs.jsonl", "no such file"), ("builtin:nope", "Unknown built-in corpus"), ("", "No documents")],
)
def test_unreadable_sources(source, message):
    with pytest.raises(DocumentsError, match=message):
        load_documents_table(source)


def test_corrupt_jsonl_and_empty_directory(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DocumentsError, match="Cannot read documents"):
        load_documents_table(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentsError, match="No documents found"):
        load_documents_table(str(tmp_path / "empty"))


def test_missing_text_column_lists_the_columns(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    with pytest.raises(DocumentsError, match=r"no column 'text'.*\['body', 'title'\].*--text_column"):
        load_documents_table(str(source))
    table, column = load_documents_table(str(source), text_column="body")
    assert table[column] == ["x"]


def test_tokenizer_without_chat_template(tmp_path, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataConfigError, match="no chat template"):
        generate_dataset(config(tmp_path), documents=DOCS, backend=ScriptedBackend(plain, respond), tokenizer=plain)


def test_chunk_tokens_larger_than_context(tmp_path, tokenizer):
    backend = ScriptedBackend(tokenizer, respond, context_length=64)
    with pytest.raises(DataConfigError, match=r"chunk_tokens=100 is larger than the model's context \(64"):
        generate_dataset(config(tmp_path, chunk_tokens=100), documents=DOCS, backend=backend, tokenizer=tokenizer)


def test_invalid_settings_are_listed(tmp_path):
    with pytest.raises(DataConfigError) as info:
        config(tmp_path, rank=2, world_size=2, min_turns=5, vllm_kwargs="[1]", kv_cache_gib=0).validate()
    for text in ("rank must lie", "min_turns", "vllm_kwargs", "kv_cache_gib must be positive"):
        assert text in str(info.value)


def test_resume_refuses_different_settings(tmp_path, tokenizer):
    backend = ScriptedBackend(tokenizer, respond)
    first = generate_dataset(config(tmp_path), documents=DOCS, backend=backend, tokenizer=tokenizer)
    calls = len(backend.calls)
    # operational settings may change; finished work is not redone
    again = generate_dataset(config(tmp_path, batch_size=7), documents=DOCS, backend=backend, tokenizer=tokenizer)
    assert len(backend.calls) == calls and again.dataset.to_list() == first.dataset.to_list()
    with pytest.raises(SettingsMismatchError, match=r"chunk_tokens: 8 \(stored\) != 9 \(now\)") as info:
        generate_dataset(
            config(tmp_path, chunk_tokens=9, seed=1), documents=DOCS, backend=backend, tokenizer=tokenizer
        )
    assert "seed: 42 (stored) != 1 (now)" in str(info.value) and "--overwrite" in str(info.value)
    with pytest.raises(SettingsMismatchError, match="documents_fingerprint"):
        generate_dataset(config(tmp_path), documents=DOCS[:2], backend=backend, tokenizer=tokenizer)
    redone = generate_dataset(
        config(tmp_path, chunk_tokens=9, overwrite=True), documents=DOCS, backend=backend, tokenizer=tokenizer
    )
    assert len(redone.dataset) >= 1


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path),
            "--documents",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert main(["generate", "--documents", "x"]) == 2
    assert main([]) == 2 and main(["--help"]) == 0


def test_mixed_document_folders_and_output_inside_documents_are_refused(tmp_path, tokenizer):
    """Issue 19: a folder of books plus one stray .json loaded only the JSON table; an --output inside the documents
    folder made the rerun read the run's own files as documents."""
    books = tmp_path / "books"
    books.mkdir()
    for i, text in enumerate(DOCS):
        (books / f"book{i}.txt").write_text(text)
    (books / "notes.json").write_text(json.dumps({"text": "not a book"}) + "\n")
    with pytest.raises(DocumentsError, match=r"mixes kinds of document files: 3 text files \(book0.txt, .*\); 1 json tables \(notes.json\)"):
        load_documents_table(str(books))
    (books / "notes.json").unlink()
    assert sorted(load_documents_table(str(books))[0]["text"]) == sorted(DOCS)  # negative control
    backend = ScriptedBackend(tokenizer, respond)
    cfg = config(tmp_path, documents=str(books), output=str(books / "run"))
    with pytest.raises(DataConfigError, match="--output .*/books/run is inside --documents"):
        generate_dataset(cfg, backend=backend, tokenizer=tokenizer)
    assert not (books / "run").exists()


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DocumentsError, match=r"docs.jsonl.*line 2: byte 0xe9 at column 14 is not UTF-8"):
        load_documents_table(str(source))


def test_retention_documents_take_a_text_column(tmp_path):
    from trl_longpo import LongPOConfig
    from trl_longpo.evaluation.callback import load_retention_documents

    source = tmp_path / "haystack.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    with pytest.raises(DocumentsError, match="Choose one with `retention_documents_text_column`"):
        load_retention_documents(str(source))
    args = LongPOConfig(output_dir=str(tmp_path), report_to="none", retention_documents_text_column="body")
    assert load_retention_documents(str(source), args.retention_documents_text_column) == DOCS
