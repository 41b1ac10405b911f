"""Question-list parsing on messy model outputs, prompt rendering and picking."""

from __future__ import annotations

import random

import pytest

from trl_longpo.data.instructions import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    parse_instructions,
    pick_instruction,
    render_instruction_prompt,
)

Q = ["What is the role of A in the text?", "How does B relate to C?", "Why is D important here?", "Compare E and F."]

CASES = {
    "official colon format": "1: What is the role of A in the text?\n2: How does B relate to C?\n3: Why is D important "
    "here?\n4: Compare E and F.",
    "dots with preamble and outro": "Here are 4 questions based on the text:\n\n1. What is the role of A in the text?\n"
    "2. How does B relate to C?\n3. Why is D important here?\n4. Compare E and F.\n\nI hope these questions help!",
    "parentheses": "1) What is the role of A in the text?\n2) How does B relate to C?\n3) Why is D important here?\n"
    "4) Compare E and F.",
    "bold markdown numbers": "**1.** What is the role of A in the text?\n**2.** How does B relate to C?\n"
    "**3.** Why is D important here?\n**4.** Compare E and F.",
    "bold whole question": "1. **What is the role of A in the text?**\n2. **How does B relate to C?**\n"
    "3. **Why is D important here?**\n4. **Compare E and F.**",
    "Q-prefix": "Q1: What is the role of A in the text?\nQ2: How does B relate to C?\nQ3. Why is D important here?\n"
    "Q4 - Compare E and F.",
    "Question N:": "Question 1: What is the role of A in the text?\nQuestion 2: How does B relate to C?\n"
    "Question 3: Why is D important here?\nQuestion 4: Compare E and F.",
    "markdown headers": "### 1. What is the role of A in the text?\n### 2. How does B relate to C?\n"
    "### 3. Why is D important here?\n### 4. Compare E and F.",
    "bullets": "- What is the role of A in the text?\n- How does B relate to C?\n* Why is D important here?\n"
    "• Compare E and F.",
    "wrapped lines": "1. What is the role of A\n   in the text?\n2. How does B\nrelate to C?\n3. Why is D important "
    "here?\n4. Compare E\n   and F.",
    "inline run-on": "1: What is the role of A in the text? 2: How does B relate to C? 3: Why is D important here? "
    "4: Compare E and F.",
    "sub-bullets ignored": "Sure! Here are the questions:\n1. What is the role of A in the text?\n   - hint: see "
    "section 2\n2. How does B relate to C?\n3. Why is D important here?\n4. Compare E and F.",
    "header on its own line": "Question 1\nWhat is the role of A in the text?\nQuestion 2\nHow does B relate to C?\n"
    "Question 3\nWhy is D important here?\nQuestion 4\nCompare E and F.",
    "windows newlines": "1. What is the role of A in the text?\r\n2. How does B relate to C?\r\n3. Why is D important "
    "here?\r\n4. Compare E and F.",
}


@pytest.mark.parametrize("name", list(CASES))
def test_parses_messy_lists(name):
    assert parse_instructions(CASES[name]) == Q


def test_duplicates_and_fragments_are_dropped():
    text = "1. What is the role of A in the text?\n2. what is the role of A in the text?\n3. Why?\n4. Questions:"
    assert parse_instructions(text) == ["What is the role of A in the text?"]


@pytest.mark.parametrize("text", ["", "   \n\n", "asdk qwe zxc", "\u0012�ma D using====", "Here are the questions:"])
def test_gibberish_yields_nothing(text):
    assert parse_instructions(text) == []


def test_template_rendering_keeps_braces_in_chunk():
    chunk = "A dict literal {n} and {chunk} inside the text."
    prompt = render_instruction_prompt(DEFAULT_INSTRUCTION_TEMPLATE, chunk, 3)
    assert chunk in prompt and '"1:" to "3:"' in prompt and "generate 3 comprehensive" in prompt


def test_pick_is_seeded_and_uses_lead_in():
    phrases = ["As described in the preceding text,"]
    a = pick_instruction(Q, "random", random.Random(7), True, phrases)
    b = pick_instruction(Q, "random", random.Random(7), True, phrases)
    assert a == b and a.startswith(phrases[0] + " ")
    assert a[len(phrases[0]) + 1 :] in [q[0].lower() + q[1:] for q in Q]  # "..., what is ..." reads as one sentence
    assert pick_instruction(Q, "first", random.Random(0), False, phrases) == Q[0]
