"""Answer filters. Each returns the name of the reason an answer is rejected, so every drop is counted and reported.

The "too short" and "degenerate repetition" measures follow the official LongPO post-processing
(`is_meaningless_response`): words are lower-cased alphanumerics; the repetition ratio is the share of words whose
count exceeds one.
"""

from __future__ import annotations

import re
from collections import Counter

# From the official code's CENSORED_PHRASES (a subset that generalises beyond the exact wording), plus common ones.
DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "I can't assist",
    "I cannot assist",
    "As an AI assistant",
    "As an AI language model",
    "I am unable to",
    "I'm unable to",
    "Sorry, I can't",
    "I can't help with",
    "I can't fulfill this request",
    "I cannot fulfill",
    "I don't have the capability",
    "I cannot discuss this subject",
    "I'm not permitted to provide",
    "This query is beyond my capabilities",
    "I'm programmed not to respond",
    "My guidelines prevent me from",
    "I am restricted from",
)

# The official code's CENSORED_PHRASES (data_prepare/postprocess_longpo_pair.py), all 37, used by `--preset official`.
# It checks them in chosen + rejected together; a phrase in either answer drops the pair, as here.
OFFICIAL_REFUSAL_PHRASES: tuple[str, ...] = (
    "I can't assist",
    "content is not available",
    "As an AI assistant",
    "I am unable to",
    "Sorry, I can't",
    "That topic is outside my scope",
    "My guidelines prevent me from addressing",
    "I can't help with",
    "I can't fulfill this request",
    "I don't have the capability",
    "This topic is restricted",
    "I cannot discuss this subject",
    "This information is not accessible",
    "I'm not permitted to provide",
    "I have no data on this issue",
    "My training data does not cover this",
    "Access to this information is restricted",
    "This query is beyond my capabilities",
    "Sorry, I can't delve into that",
    "This goes beyond my operational boundaries",
    "I cannot support this inquiry",
    "I'm programmed not to respond to this",
    "This matter is beyond my scope",
    "My responses are limited",
    "I have no input on that",
    "My algorithm restricts me from answering",
    "I'm sorry, but that's beyond my reach",
    "My response capabilities don\u2019t include this topic",
    "This falls outside my answer scope",
    "I don't cover ",
    "I can't engage with ",
    "I'm not the right resource for that information",
    "This content is beyond my purview",
    "I don't handle this type of query",
    "My training limits me from assisting on this",
    "This issue is beyond my functionality",
    "I am restricted from",
)

# The order in which an answer is checked; the first failing check is the one counted.
ANSWER_FILTERS = ("empty", "truncated", "too_short", "degenerate", "refusal")

_WORD = re.compile(r"[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.sub("", text.lower()).split()


def repetition_ratio(text: str) -> float:
    """Share of words that occur more than once (0 = all distinct, 1 = every word repeats)."""
    tokens = words(text)
    if not tokens:
        return 1.0
    counts = Counter(tokens)
    return sum(c for c in counts.values() if c > 1) / len(tokens)


def is_refusal(text: str, phrases: list[str] | tuple[str, ...]) -> bool:
    lowered = text.lower()
    return any(p.lower() in lowered for p in phrases if p)


def check_answer(
    text: str,
    finish_reason: str | None,
    *,
    min_words: int,
    max_repetition_ratio: float,
    refusal_phrases: list[str] | tuple[str, ...],
    drop_truncated: bool,
) -> str | None:
    """The reason this answer is unusable, or None if it passes every filter."""
    if not text.strip():
        return "empty"
    if drop_truncated and finish_reason == "length":
        return "truncated"
    if sum(len(w) >= 3 for w in words(text)) < min_words:
        return "too_short"
    if max_repetition_ratio < 1.0 and repetition_ratio(text) > max_repetition_ratio:
        return "degenerate"
    if is_refusal(text, refusal_phrases):
        return "refusal"
    return None


def same_answer(chosen: str, rejected: str) -> bool:
    """Identical up to surrounding whitespace: such a pair carries no preference."""
    return chosen.strip() == rejected.strip()
