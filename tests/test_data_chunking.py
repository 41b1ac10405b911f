"""Chunker invariants: exact coverage, token bounds measured with the tokenizer, natural boundaries, no drops."""

from __future__ import annotations

import pytest

from trl_longpo.data.chunking import chunk_document, split_units
from trl_longpo.data.documents import corpus_texts


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check(tokenizer, text: str, limit: int):
    chunks = chunk_document(text, tokenizer, limit)
    assert "".join(c.text for c in chunks) == text  # exact coverage: nothing lost, nothing duplicated
    pos = 0
    for c in chunks:
        assert c.start == pos and c.end == pos + len(c.text) and c.text == text[c.start : c.end]
        pos = c.end
        measured = _n_tokens(tokenizer, c.text)
        assert measured == c.num_tokens <= limit
        assert _n_tokens(tokenizer, c.text.strip()) <= limit  # prompts use the stripped chunk
    return chunks


@pytest.mark.parametrize("limit", [48, 300, 2000])
def test_corpus_documents_cover_exactly_within_bounds(tokenizer, limit):
    for text in corpus_texts()[:25]:
        _check(tokenizer, text, limit)


def test_chunks_end_on_blank_lines_when_paragraphs_fit(tokenizer):
    paragraphs = [f"Paragraph {i} " + " ".join(f"word{i}x{j}" for j in range(8 + i % 5)) for i in range(30)]
    text = "\n\n".join(paragraphs) + "\n"
    limit = int(2.5 * max(_n_tokens(tokenizer, p + "\n\n") for p in paragraphs))
    chunks = _check(tokenizer, text, limit)
    assert len(chunks) > 3
    for c in chunks[:-1]:
        assert c.text.endswith("\n\n"), repr(c.text[-20:])
    # every paragraph lies wholly inside one chunk
    for p in paragraphs:
        assert sum(p in c.text for c in chunks) == 1


def test_latex_sections_start_chunks(tokenizer):
    body = " ".join(f"token{i}" for i in range(25))
    text = "".join(f"\\section{{Part {i}}}\n{body}\n" for i in range(6))
    units = split_units(text)
    assert all(u.startswith("\\section{") for u in units)
    chunks = _check(tokenizer, text, _n_tokens(tokenizer, units[0]) + 5)
    assert all(c.text.startswith("\\section{") for c in chunks)


def test_code_fences_are_not_split_at_inner_blank_lines(tokenizer):
    fence = "```python\ndef f():\n\n    return 1\n\n\nclass A:\n    pass\n```\n"
    text = "Intro paragraph here.\n\n" + fence + "\nAfter the code.\n\n" + fence
    units = split_units(text)
    assert fence in units
    limit = _n_tokens(tokenizer, fence) + 2
    chunks = _check(tokenizer, text, limit)
    assert sum(fence in c.text for c in chunks) == 2


def test_blank_lines_between_code_blocks_split_source_files(tokenizer):
    functions = [f"def function_{i}(x):\n    y = x * {i}\n    return y + {i}\n" for i in range(20)]
    source = "\n\n".join(functions)
    chunks = _check(tokenizer, source, 3 * max(_n_tokens(tokenizer, f + "\n\n") for f in functions))
    assert len(chunks) > 2
    for c in chunks[:-1]:
        assert c.text.endswith("\n\n")
        assert c.text.lstrip().startswith("def function_")


def test_over_long_paragraph_is_split_not_dropped(tokenizer):
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    huge = sentence * 80  # one paragraph, far over the limit
    text = "Short intro.\n\n" + huge + "\n\nShort outro.\n"
    chunks = _check(tokenizer, text, 40)
    assert len(chunks) > 5
    # split at sentence ends where possible
    inner = [c for c in chunks if sentence.strip()[:10] in c.text]
    assert sum(c.text.rstrip().endswith(".") for c in inner) >= len(inner) - 2


def test_text_without_separators_is_hard_split(tokenizer):
    blob = "x" * 3000 + "é" * 300 + "🙂" * 50
    _check(tokenizer, blob, 16)


def test_empty_document():
    assert chunk_document("", None, 10) == []
