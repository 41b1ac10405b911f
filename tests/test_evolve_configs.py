"""Every round of the shipped paper-scale evolve config yields rows: each round's resolved generation settings are
dry-run (tokenizer and config only) on local documents of the shortest and longest lengths the round selects, with a
local model directory carrying Mistral-7B-Instruct-v0.2's window, θ and chat template (as for the README's commands).
A round whose chunks leave no room for the template and the new tokens in the 32K window stops at its plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from test_readme_generate import _document, _model_dir
from trl_longpo.data import plan_generation
from trl_longpo.evolve import load_evolve_config, resolve_round
from trl_longpo.tiny import build_tiny_tokenizer

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "evolve_mistral_512k.yaml"


def _plan(index: int, tmp_path, **changes):
    config = load_evolve_config(CONFIG)
    resolved = resolve_round(config, index)
    generation = resolved.generation
    tokenizer = build_tiny_tokenizer()
    model = _model_dir(config.base_model, tmp_path, tokenizer)  # rounds 2-3 generate with a trained Mistral: same window
    low, high = generation.min_doc_tokens, generation.max_doc_tokens
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": _document(*b)}) + "\n" for b in [(low, low + 2048), (high - 2048, high)]))
    generation = dataclasses.replace(
        generation, model=model, documents=str(docs), output=str(tmp_path / "out"), backend="hf", **changes
    )
    return plan_generation(generation)


@pytest.mark.slow
@pytest.mark.parametrize("index", [1, 2, 3])
def test_every_round_of_the_paper_config_yields_rows(index, tmp_path):
    plan = _plan(index, tmp_path)
    assert plan.max_rows == 2, plan.format()
    assert "skipped" not in plan.format(), plan.format()


def test_chunks_as_long_as_the_window_are_caught(tmp_path):
    """Negative control: round 1 with chunks of Mistral's whole 32K window yields no rows."""
    plan = _plan(1, tmp_path, chunk_tokens=32768)
    assert plan.max_rows == 0 and "--chunk_tokens" in plan.format() + str(plan.problem), plan.format()
