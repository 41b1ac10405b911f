"""Long-context retrieval probes: a fact (a key and a number) hidden at a chosen depth of a haystack of real text.

Why this shape: the answer is exact (a number), so accuracy needs no judge model; the haystack is the user's own
documents (or the built-in corpus), cut to a target token length that INCLUDES the chat template and the question, so
`acc@L` really measures prompts of L tokens; the needle sits at a sentence boundary near the requested depth, so
depth-wise failures ("lost in the middle") show up. Everything is deterministic in (documents, lengths, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trl_longpo.tokenization import tokenize_prompt

DEFAULT_KEYS = (
    "the amber lighthouse",
    "the silver fox",
    "the northern gate",
    "the paper crane",
    "the iron kettle",
    "the quiet harbor",
    "the copper bell",
    "the velvet chair",
    "the granite bridge",
    "the crimson kite",
    "the hollow oak",
    "the glass garden",
    "the winter orchard",
    "the blue caravan",
    "the marble owl",
    "the sleeping dragon",
)
_SENTENCE_END = re.compile(r"[.!?:]\s+|\n+")
_FIT_ITERATIONS = 16


@dataclass(frozen=True)
class RetrievalProbe:
    """One retrieval question. `prompt` is a message list when built with `chat=True`, else plain text."""

    prompt: str | list[dict]
    answer: str  # exact expected answer, e.g. "48213"
    length: int  # target prompt length in tokens (the bucket reported as acc@length)
    depth: float  # where the needle sits, 0.0 (start) .. 1.0 (end) of the haystack
    needle_token_start: int  # tokens of the haystack before the needle (the haystack text tokenized alone)


def default_documents() -> list[str]:
    """The built-in corpus (CPython's help topics grouped into documents), as used by `trl-longpo generate`."""
    from trl_longpo.data.documents import pydoc_documents

    return pydoc_documents()


def _five_digits(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _default_depths(n: int) -> list[float]:
    return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


class _Haystack:
    """Documents concatenated (from a start document, wrapping around) with a token -> character offset index."""

    def __init__(self, tokenizer, documents: Sequence[str], cache: dict[int, list[int]], start: int, needed: int):
        parts, ends = [], []  # ends[t]: character end of token t in the joined text
        offset = 0
        for k in range(len(documents)):
            index = (start + k) % len(documents)
            if index not in cache:
                cache[index] = _token_ends(tokenizer, documents[index])
            if parts:
                offset += 2  # "\n\n" separator
            parts.append(documents[index])
            ends.extend(offset + e for e in cache[index])
            offset += len(documents[index])
            if len(ends) >= needed:
                break
        self.text = "\n\n".join(parts)
        self.ends = ends

    def char_at(self, num_tokens: int) -> int:
        """Character offset just after the first `num_tokens` tokens."""
        return self.ends[min(num_tokens, len(self.ends)) - 1] if num_tokens > 0 else 0

    def cut(self, num_tokens: int) -> str:
        return self.text[: self.char_at(num_tokens)]



def _token_ends(tokenizer, text: str) -> list[int]:
    """Character end offset of every token of `text`: cuts on token boundaries never split a character."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [end for _, end in offsets]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


def _sentence_boundary(text: str, char: int, lo: int, hi: int) -> int:
    """The sentence/paragraph boundary nearest to `char` within [lo, hi] (else `char` itself)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, lo, hi) if m.end() <= hi]
    return min(ends, key=lambda e: abs(e - char)) if ends else char


def _render(prefix: str, needle: str, rest: str, question: str, chat: bool) -> str | list[dict]:
    haystack = " ".join(part for part in (prefix.rstrip(), needle, rest.lstrip()) if part)
    content = f"{haystack}\n\n{question}"
    return [{"role": "user", "content": content}] if chat else content


def build_retrieval_probes(
    tokenizer,
    lengths: Sequence[int],
    probes_per_length: int,
    *,
    documents: Sequence[str] | None = None,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    chat: bool = True,
    needle_template: str = "The secret number of {key} is {value}.",
    question_template: str = "What is the secret number of {key}? Answer with the number only.",
    keys: Sequence[str] | None = None,
    value_fn: Callable[[random.Random], str] | None = None,
) -> list[RetrievalProbe]:
    """`probes_per_length` probes for each length in `lengths`, each a prompt of at most `length` tokens (template and
    question included, within a few tokens of it) with one needle at its depth (`depths`, default spread evenly from
    0 to 1; cycled over the probes). Raises `ValueError` naming the option for input it cannot honour."""
    lengths = list(lengths)
    if not lengths:
        raise ValueError("`lengths` is empty: give at least one probe length in tokens.")
    if any(not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"`lengths` must be positive token counts, got {lengths}.")
    if probes_per_length < 1:
        raise ValueError(f"`probes_per_length` must be >= 1, got {probes_per_length}.")
    depths = list(depths) if depths is not None else _default_depths(probes_per_length)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"`depths` must be a non-empty list of numbers in [0, 1], got {depths}.")
    documents = [d for d in (default_documents() if documents is None else documents) if d and d.strip()]
    if not documents:
        raise ValueError("`documents` holds no non-empty text to build the haystack from.")
    keys = list(keys or DEFAULT_KEYS)
    value_fn = value_fn or _five_digits
    templates = {"needle_template": (needle_template, "{value}"), "question_template": (question_template, "{key}")}
    for name, (template, placeholder) in templates.items():
        if placeholder not in template:
            raise ValueError(f"`{name}` must contain {placeholder}, got {template!r}.")

    cache: dict[int, list[int]] = {}
    probes = []
    for length in lengths:
        for j in range(probes_per_length):
            rng = random.Random(f"longpo-probe-{seed}-{length}-{j}")
            key, value = rng.choice(keys), value_fn(rng)
            needle = needle_template.format(key=key, value=value)
            question = question_template.format(key=key)
            start = rng.randrange(len(documents))
            depth = depths[j % len(depths)]
            probe = _fit_probe(tokenizer, documents, cache, start, length, depth, needle, question, value, chat)
            probes.append(probe)
    return probes


def _fit_probe(
    tokenizer,
    documents: Sequence[str],
    cache: dict[int, list[int]],
    start: int,
    length: int,
    depth: float,
    needle: str,
    question: str,
    answer: str,
    chat: bool,
) -> RetrievalProbe:
    """Grow/shrink the haystack on token boundaries until the rendered prompt has `length` tokens (or just under)."""
    overhead = len(tokenize_prompt(tokenizer, _render("", needle, "", question, chat)))
    if overhead >= length:
        raise ValueError(
            f"Probe length {length} is too short: the chat template, needle and question alone take {overhead} "
            "tokens. Raise the shortest of `lengths` (retention_probe_lengths)."
        )
    budget = length - overhead
    haystack = _Haystack(tokenizer, documents, cache, start, length)
    if len(haystack.ends) < budget:
        raise ValueError(
            f"The documents hold only {len(haystack.ends)} tokens in all, but a probe of {length} tokens needs about "
            f"{budget} tokens of haystack. Pass more or longer `documents` (retention_documents) or lower `lengths` "
            "(retention_probe_lengths)."
        )
    best, fits, overflows = None, 0, len(haystack.ends) + 1  # largest budget known to fit, smallest known not to
    cut = None  # the needle's place, chosen once so that fitting the end does not move it
    for _ in range(_FIT_ITERATIONS):
        text = haystack.cut(budget)
        if depth == 1.0:
            cut = len(text)
        elif cut is None:
            target = round(depth * budget)
            cut = haystack.char_at(target)
            if depth:  # snap to a sentence boundary at most ~1% of the haystack's tokens away
                window = max(1, budget // 100)
                lo, hi = haystack.char_at(target - window), haystack.char_at(target + window)
                cut = _sentence_boundary(text, cut, lo, min(hi, len(text)))
        cut = min(cut, len(text))
        prompt = _render(text[:cut], needle, text[cut:], question, chat)
        total = len(tokenize_prompt(tokenizer, prompt))
        if total <= length:
            fits = max(fits, budget)
            if best is None or total > best[0]:
                best = (total, prompt, text[:cut].rstrip())
            if total == length:
                break
        else:
            overflows = min(overflows, budget)
        # Token counts are not additive across the cut and the needle: step by the miss, bisect once bracketed
        proposal = budget + length - total
        if not fits < proposal < overflows:
            proposal = (fits + overflows) // 2
        if proposal in (fits, overflows) or proposal < 1:
            break
        budget = proposal
    if best is None:
        raise ValueError(f"Could not fit a probe into {length} tokens; raise `lengths` (retention_probe_lengths).")
    before = len(tokenizer(best[2], add_special_tokens=False)["input_ids"]) if best[2] else 0
    return RetrievalProbe(prompt=best[1], answer=answer, length=length, depth=depth, needle_token_start=before)
