"""Self-instruct prompts and a tolerant parser for the question lists models write.

Models rarely follow "format the questions as 1: ... 4:" exactly: they add a preamble, bold the numbers, use
"Q1:", bullets, markdown headers, wrap long questions over several lines, or chat after the list. The parser accepts
all of those. No library parses free-form LLM lists, so this is written by hand.
"""

from __future__ import annotations

import random
import re

# The official LongPO self-instruct prompt (data_prepare/generate_qa.py), with the count made a parameter.
DEFAULT_INSTRUCTION_TEMPLATE = (
    "Context:\n{chunk}\n\n"
    "Based on the content presented above, generate {n} comprehensive English questions that test a reader's "
    "comprehension, analytical skills, and ability to extract and interconnect key themes and ideas across the "
    "entire document.\n\n"
    "Each question should:\n"
    "1. Encourage the reader to draw connections between different sections or concepts within the text.\n"
    "2. Challenge the reader to not only recall information but also to synthesize and summarize the material in a "
    "coherent manner.\n"
    "3. Be unique in its focus, avoiding repetition and ensuring a broad coverage of the document's content.\n"
    "4. Stimulate critical thinking by requiring the application or evaluation of the text's information in broader "
    "contexts or hypothetical scenarios, if relevant.\n"
    "5. Ensure the question is clear and unambiguous.\n\n"
    "Please directly give the questions without verbose illustration, and format the {n} questions numerically "
    'from "1:" to "{n}:".'
)

# The official code's lead-in phrases: they tell the model the answer lies in the preceding text.
DEFAULT_LEAD_IN_PHRASES: tuple[str, ...] = (
    "As described in the preceding text,",
    "As detailed in the foregoing document,",
    "As mentioned earlier in the text,",
    "As specified in the above material,",
    "As indicated in the preceding pages,",
    "In accordance with the above content,",
    "As set forth in the document mentioned,",
    "Following the details provided above,",
    "As elaborated in the prior document,",
    "Pursuant to the information above,",
    "In line with the preceding information,",
    "Reflecting on the content above,",
    "Based on the preceding descriptions,",
    "With reference to the document above,",
    "Drawing from the details above,",
    "Considering the information outlined above,",
    "As articulated in the previous sections,",
    "Conforming to the descriptions above,",
    "As captured in the above explanations,",
    "As chronicled in the earlier document,",
)

# Generic, document-agnostic instructions: used for instruction_source=list, or when parsing finds nothing and
# on_parse_failure=fallback (e.g. a tiny random model that cannot write questions).
DEFAULT_FALLBACK_INSTRUCTIONS: tuple[str, ...] = (
    "Summarize the main ideas of the text and explain how they relate to each other.",
    "What are the key concepts introduced in the text, and how are they connected?",
    "Explain the most important rules or definitions given in the text, with an example for each.",
    "Which details of the text would matter most to someone applying it in practice, and why?",
    "Describe the structure of the text and what each part contributes to the whole.",
    "What questions does the text leave open, and how could they be answered from what it says?",
)

_NUM = r"\d{1,2}"
# An item marker at the start of a line: "1.", "1)", "1:", "(1)", "[1]", "1 -", "Q1:", "Question 1:", "**1.**",
# "### 1.", "#### Question 2", with optional markdown emphasis around it.
_NUMBERED = re.compile(
    rf"^\s*(?:#{{1,6}}\s*)?[*_]{{0,2}}\s*(?:(?:Q|Question)\s*{_NUM}\s*[:.)\-]*|[(\[]?{_NUM}\s*[)\].:\-]+)"
    rf"\s*[*_]{{0,2}}\s*(?=\S)",
    re.IGNORECASE,
)
_NUMBERED_NO_PUNCT = re.compile(
    r"^\s*(?:#{1,6}\s*)?[*_]{0,2}\s*(?:Q|Question)\s*\d{1,2}\b\s*[*_]{0,2}\s*", re.IGNORECASE
)
_BULLET = re.compile(r"^\s*(?:[-*+•▪‣]|\u2013)\s+(?=\S)")
# The official regex: markers anywhere, for lists run together on one line ("1: ... 2: ... 3: ...").
_INLINE = re.compile(r"(?:^|\s)\d{1,2}\s*[:.)]\s+(.+?)(?=\s\d{1,2}\s*[:.)]\s+|$)", re.DOTALL)
_PREAMBLE = re.compile(
    r"^(?:here (?:are|is)|sure|certainly|of course|below|the following|questions?:?$)", re.IGNORECASE
)


def _clean(item: str) -> str:
    text = " ".join(item.split())
    text = re.sub(r"^(?:\*\*|__)?(?:question|q)\s*[:.\-]\s*", "", text, flags=re.IGNORECASE)  # "Question: ..."
    text = text.replace("**", "").replace("__", "").replace("`", "")
    text = text.strip(" \t*_#>\"'“”")
    return text


def _looks_like_question(text: str, min_words: int) -> bool:
    is_header = text.endswith(":") and "?" not in text  # such as "Questions about the text:"
    return len(text.split()) >= min_words and not is_header


def _collect(lines: list[str], marker: re.Pattern) -> list[str]:
    items: list[str] = []
    current: list[str] | None = None
    for line in lines:
        match = marker.match(line)
        if match:
            if current is not None:
                items.append(" ".join(current))
            current = [line[match.end() :]]
        elif current is not None and line.strip():
            if _BULLET.match(line) and marker is not _BULLET:
                continue  # a sub-bullet under a numbered question: a hint, not part of the question
            current.append(line.strip())  # a wrapped line continues the question
        elif current is not None:
            items.append(" ".join(current))  # a blank line ends the item; chat after the list is ignored
            current = None
    if current is not None:
        items.append(" ".join(current))
    return items


def parse_instructions(text: str, min_words: int = 3) -> list[str]:
    """The questions in a model's list, cleaned and de-duplicated, in order; [] if none can be found."""
    lines = text.replace("\r\n", "\n").split("\n")
    items = _collect(lines, _NUMBERED)
    if not items:
        items = _collect(lines, _NUMBERED_NO_PUNCT)
    if not items:
        items = _collect(lines, _BULLET)
    if len(items) <= 1:
        inline = [m.group(1) for m in _INLINE.finditer(text)]
        if len(inline) > len(items):
            items = inline
    seen, questions = set(), []
    for item in items:
        question = _clean(item)
        if _PREAMBLE.match(question) and "?" not in question:
            continue
        if _looks_like_question(question, min_words) and question.lower() not in seen:
            seen.add(question.lower())
            questions.append(question)
    return questions


def render_instruction_prompt(template: str, chunk: str, n: int) -> str:
    # Replace {n} first so a literal "{n}" inside the chunk is left alone.
    return template.replace("{n}", str(n)).replace("{chunk}", chunk)


def pick_instruction(
    questions: list[str], policy: str, rng: random.Random, lead_in: bool, phrases: list[str] | tuple[str, ...]
) -> str:
    """One question per the configured policy, optionally prefixed with a lead-in phrase."""
    question = questions[0] if policy == "first" else rng.choice(questions)
    if lead_in and phrases:
        if len(question) > 1 and question[0].isupper() and question[1].islower():  # "What ..." -> "what ..."
            question = question[0].lower() + question[1:]
        return f"{rng.choice(list(phrases))} {question}"
    return question
