"""Split a long document into short contexts on natural boundaries, with a token bound measured by the tokenizer.

Invariants (tested): chunks are exact, contiguous spans of the document, so `"".join(c.text for c in chunks)` is the
document, byte for byte (prompts strip a chunk's surrounding whitespace when they use it); every chunk has at most
`chunk_tokens` tokens under the model's tokenizer; chunks end at a blank line, before a LaTeX sectioning command, or
around a fenced code block, unless a single block is longer than `chunk_tokens`, in which case it is split at lines,
then sentences, then words, then tokens — never dropped.

Written by hand: text splitters in other libraries strip or overlap text and measure length in characters, which
would break the exact-coverage and token-bound guarantees LongPO's short/long pairing relies on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*(?:\n|\Z)", re.MULTILINE | re.DOTALL)
_BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
_LATEX_SECTION = re.compile(
    r"^[ \t]*\\(?:part|chapter|section|subsection|subsubsection|paragraph)\*?\s*[\[{]", re.MULTILINE
)
# Finer separators for an over-long block; each cut falls right after the separator, keeping it with the text.
_FINER = (re.compile(r"\n"), re.compile(r"[.!?][\"')\]]*[ \t]+"), re.compile(r"\s+"))


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets in the document
    end: int
    num_tokens: int


TokenCounter = Callable[[list[str]], list[int]]


def token_counter(tokenizer) -> TokenCounter:
    """Counts tokens of plain text (no special tokens), batched, with the given tokenizer."""

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def _cut(text: str, cuts: set[int]) -> list[str]:
    points = sorted(c for c in cuts if 0 < c < len(text))
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in pairwise(bounds) if b > a]


def split_units(text: str) -> list[str]:
    """Boundary-delimited blocks whose concatenation is `text`: paragraphs, LaTeX sections, whole code fences."""
    fences = [(m.start(), m.end()) for m in _FENCE.finditer(text)]

    def in_fence(pos: int) -> bool:
        return any(a < pos < b for a, b in fences)

    cuts = {p for a, b in fences for p in (a, b)}
    cuts |= {m.end() for m in _BLANK_RUN.finditer(text) if not in_fence(m.end())}
    cuts |= {m.start() for m in _LATEX_SECTION.finditer(text) if not in_fence(m.start())}
    return _cut(text, cuts)


def _split_finer(text: str, level: int) -> list[str]:
    return _cut(text, {m.end() for m in _FINER[level].finditer(text)})


def _hard_split(text: str, limit: int, tokenizer, count: TokenCounter) -> list[str]:
    """Last resort for a run of text with no usable separator: cut at token offsets."""
    offsets = [
        start for start, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    pieces, start_char, k = [], 0, 0
    while start_char < len(text):
        end_tok = min(k + limit, len(offsets))
        while True:
            end_char = offsets[end_tok] if end_tok < len(offsets) else len(text)
            while end_char <= start_char and end_tok < len(offsets):  # several byte tokens in one character
                end_tok += 1
                end_char = offsets[end_tok] if end_tok < len(offsets) else len(text)
            piece = text[start_char:end_char]
            over = count([piece])[0] - limit
            if over <= 0 or end_tok - k <= 1:
                break
            end_tok -= max(1, over)
        pieces.append(piece)
        start_char, k = end_char, end_tok
    return pieces


def _fit(pieces: list[str], limit: int, tokenizer, count: TokenCounter, level: int = 0) -> list[tuple[str, int]]:
    """Re-split every piece over `limit` with the next finer separator until all pieces fit; (piece, tokens)."""
    out: list[tuple[str, int]] = []
    for piece, n in zip(pieces, count(pieces)):
        if n <= limit:
            out.append((piece, n))
        elif level < len(_FINER):
            out.extend(_fit(_split_finer(piece, level), limit, tokenizer, count, level + 1))
        else:
            hard = _hard_split(piece, limit, tokenizer, count)
            out.extend(zip(hard, count(hard)))
    return out


def _group(fitted: list[tuple[str, int]], limit: int, count: TokenCounter) -> list[tuple[str, int]]:
    """Greedy packing; the sum of piece counts only estimates a chunk's count (BPE merges across a join can add
    tokens), so each chunk is re-measured and shortened until it fits; (chunk, its measured tokens)."""
    pieces, counts = [p for p, _ in fitted], [n for _, n in fitted]
    chunks, i = [], 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + counts[j] <= limit):
            total += counts[j]
            j += 1
        n = counts[i]  # a single piece: measured by _fit
        while j - i > 1:
            n = count(["".join(pieces[i:j])])[0]
            if n <= limit:
                break
            j -= 1
            n = counts[i]
        chunks.append(("".join(pieces[i:j]), n))
        i = j
    return chunks


def chunk_document(text: str, tokenizer, chunk_tokens: int, count: TokenCounter | None = None) -> list[Chunk]:
    """Chunks of at most `chunk_tokens` tokens covering `text` exactly (see the module docstring)."""
    if not text:
        return []
    count = count or token_counter(tokenizer)
    chunks, pos = [], 0
    for chunk_text, n in _group(_fit(split_units(text), chunk_tokens, tokenizer, count), chunk_tokens, count):
        chunks.append(Chunk(chunk_text, pos, pos + len(chunk_text), n))
        pos += len(chunk_text)
    return chunks
