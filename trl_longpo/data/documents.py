"""Load long documents from files, directories, `datasets` datasets or the built-in corpus, with clear errors."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs"}
TABLE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DocumentsError(ValueError):
    """The documents cannot be read or lack the text column; the message says which and what to do."""


@dataclass(frozen=True)
class Document:
    id: str  # "<index in the source>-<text hash>": stable across runs, changes if the text does
    index: int
    text: str
    num_tokens: int


def document_id(index: int, text: str) -> str:
    return f"{index:07d}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def corpus_texts() -> list[str]:
    """The built-in corpus: long English documents that ship with CPython (the `help()` topics, no download),
    sorted by name for determinism. The tiny tokenizer is trained on it; `builtin:pydoc` groups it into documents."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def pydoc_documents(doc_chars: int = 12000) -> list[str]:
    """CPython's help topics (`corpus_texts`) joined in name order into documents of about `doc_chars` characters,
    so a document is several times longer than a chunk."""
    docs, current = [], []
    for topic in corpus_texts():
        current.append(topic.strip())
        if sum(len(t) for t in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def _check_utf8(name: str, source: str) -> None:
    """Name the file, line and byte of the first non-UTF-8 byte (datasets' own error names neither)."""
    with open(name, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DocumentsError(
                    f"Document file {name!r} (from {source!r}), line {number}: byte {line[exc.start]:#04x} at column "
                    f"{exc.start + 1} is not UTF-8. Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None


def _load_table(loader: str, files: list[str], source: str) -> datasets.Dataset:
    for name in files:
        with open(name, "rb") as f:
            blank = not f.read(1 << 16).strip() and f.read(1) == b""
        if blank:
            raise DocumentsError(f"Document file {name!r} (from {source!r}) is empty: it holds no documents.")
        if loader in ("json", "csv"):
            _check_utf8(name, source)
    try:
        return datasets.load_dataset(loader, data_files=files, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DocumentsError(
            f"Cannot read documents from {source!r} as {loader}: {type(exc).__name__}: {exc}"
        ) from exc


def _read_text_files(files: list[Path], source: str) -> datasets.Dataset:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DocumentsError(f"Cannot read document file {str(f)!r} (from {source!r}): {exc}") from exc
    return datasets.Dataset.from_dict({"text": texts})


def _from_path(source: str) -> tuple[datasets.Dataset, bool]:
    """(dataset, whether its text column is the fixed `text`) for a path source."""
    path = Path(source)
    if not path.exists():
        raise DocumentsError(f"Cannot read documents from {source!r}: no such file or directory.")
    if not os.access(path, os.R_OK):
        raise DocumentsError(f"Cannot read documents from {source!r}: permission denied.")
    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as exc:
                raise DocumentsError(f"Cannot load the saved dataset at {source!r}: {exc}") from exc
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DocumentsError(f"{source!r} holds splits {list(loaded)}; point at one split's directory.")
                loaded = loaded["train"]
            return loaded, False
        files = sorted(p for p in path.rglob("*") if p.is_file())
        kinds: dict[str, list[Path]] = {}
        for f in files:
            if f.suffix in TABLE_LOADERS:
                kinds.setdefault(f"{TABLE_LOADERS[f.suffix]} tables", []).append(f)
            elif f.suffix in TEXT_SUFFIXES:
                kinds.setdefault("text files", []).append(f)
        if len(kinds) > 1:  # loading one kind would silently ignore the others
            found = "; ".join(
                f"{len(group)} {kind} ({', '.join(p.name for p in group[:3])}{', ...' if len(group) > 3 else ''})"
                for kind, group in kinds.items()
            )
            raise DocumentsError(
                f"Directory {source!r} mixes kinds of document files: {found}. Only one kind would be read; keep one "
                "kind in the directory (move the others out), or pass a single file as --documents."
            )
        if not kinds:
            raise DocumentsError(
                f"No documents found in directory {source!r}: expected .jsonl/.json/.parquet/.csv files or text files "
                f"({', '.join(sorted(TEXT_SUFFIXES))})."
            )
        ((kind, group),) = kinds.items()
        if kind == "text files":
            return _read_text_files(group, source), True
        return _load_table(TABLE_LOADERS[group[0].suffix], [str(p) for p in group], source), False
    if path.suffix in TABLE_LOADERS:
        return _load_table(TABLE_LOADERS[path.suffix], [str(path)], source), False
    return _read_text_files([path], source), True


def load_documents_table(
    source: str | datasets.Dataset | list[str],
    text_column: str = "text",
    pydoc_doc_chars: int = 12000,
    column_option: str = "--text_column",
) -> tuple[datasets.Dataset, str]:
    """The documents as a `datasets.Dataset` and the name of its text column; raises `DocumentsError` (which names
    `column_option` as the way to choose another column)."""
    if isinstance(source, list):
        return datasets.Dataset.from_dict({"text": source}), "text"
    if isinstance(source, datasets.Dataset):
        table, fixed = source, False
    elif not source:
        raise DocumentsError("No documents given: pass --documents (a file, a directory, hf:NAME or builtin:pydoc).")
    elif source == "builtin:pydoc":
        return datasets.Dataset.from_dict({"text": pydoc_documents(pydoc_doc_chars)}), "text"
    elif source.startswith("builtin:"):
        raise DocumentsError(f"Unknown built-in corpus {source!r}; available: builtin:pydoc.")
    elif source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        try:
            table, fixed = datasets.load_dataset(name, split=split or "train"), False
        except Exception as exc:
            raise DocumentsError(f"Cannot load hub dataset {name!r} (split {split or 'train'!r}): {exc}") from exc
    else:
        table, fixed = _from_path(source)
    column = "text" if fixed else text_column
    if column not in table.column_names:
        raise DocumentsError(
            f"The documents from {source if isinstance(source, str) else 'the given dataset'!r} have no column "
            f"{column!r}; columns: {table.column_names}. Choose one with {column_option}."
        )
    return table, column
