"""The dry run (`--dry_run`, `plan_generation`): its prediction equals what the real run does, a plan without rows
stops with exit 2 naming the option and a value that works, and the real run stops on such a plan before any model
call."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest

from trl_longpo.cli import main
from trl_longpo.data import EmptyPlanError, GenerationConfig, generate_dataset, plan_generation
from trl_longpo.demo import DemoConfig, demo_generation_config
from trl_longpo.data.store import StageStore
from trl_longpo.data.testing import ScriptedBackend


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from trl_longpo.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _mid_gap(*stages) -> int:
    """A prompt length halfway across the widest gap between the middle prompt lengths of `stages`."""
    lengths = sorted({r["prompt_tokens"] for s in stages for r in s.records.values()})
    middle = lengths[len(lengths) // 4 : 3 * len(lengths) // 4 + 1]
    low, high = max(itertools.pairwise(middle), key=lambda p: p[1] - p[0])
    assert high - low >= 8, lengths  # far from both: a placeholder answer a few tokens off cannot flip a prompt
    return (low + high) // 2


def _real_records(out, name):
    return StageStore(out / "work" / f"{name}.jsonl").load()


@pytest.mark.parametrize("tight", [False, True], ids=["demo", "demo-tight-context"])
def test_dry_run_predicts_the_real_runs_prompts_per_stage(tmp_path, tiny_dir, tight):
    """The demo's inputs (tiny model, builtin:pydoc): per stage, the plan's prompts that fit / are skipped (and the
    prompt tokens, where a prompt does not depend on an earlier answer) are the real run's."""
    config = demo_generation_config(
        DemoConfig(model="tiny", output=str(tmp_path), num_documents=5, progress=False), tiny_dir
    )
    plan = plan_generation(config)
    if tight:  # limits in the middle of the widest gaps: some question prompts and some long prompts do not fit
        config.model_context_length = _mid_gap(plan.stages[0]) + config.instruction_max_new_tokens
        config.context_length = _mid_gap(plan.stages[2], plan.stages[3]) + config.max_new_tokens
        plan = plan_generation(config)
    assert not (tmp_path / "data").exists()  # the dry run writes nothing
    result = generate_dataset(config)
    real = result.stats["stages"]
    assert plan.documents == real["documents"] and plan.chunks == real["chunks"]
    stage_files = ["instructions", "short_answers", "long_answers_turn1", "long_answers_turn2"]
    assert [s.name.split(" (")[0] for s in plan.stages] == [
        "instructions",
        "short answers",
        "long answers",
        "long answers",
    ]
    filtered = sum(v for k, v in real["short_answers (chosen)"].items() if k not in {"requested", "passed"})
    for name, stage in zip(stage_files, plan.stages):
        records = _real_records(result.output_dir, name)
        for key, record in records.items():  # every request the real run made, the plan predicted the same way
            assert ("skipped" in record) == ("skipped" in stage.records[key]), (name, key)
            if name != "long_answers_turn2":  # turn 2 holds the generated turn-1 answer: the plan uses a placeholder
                assert record["prompt_tokens"] == stage.records[key]["prompt_tokens"], (name, key)
        if not filtered:
            assert set(records) == set(stage.records)
    if tight:
        assert plan.stages[0].skipped == {"prompt_over_context": real["instructions"]["prompt_over_context"]} != {}
        assert plan.stages[2].skipped.get("prompt_over_context", 0) > 0
    assert plan.max_rows >= len(result.dataset) > 0
    text = plan.format()
    assert text.startswith("Plan: 5 of ") and f"at most {plan.max_rows} rows" in text


def _cli(capsys, *args):
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_zero_row_plans_exit_2_name_the_option_and_a_value_that_works(tmp_path, tiny_dir, capsys):
    base = [
        "--model",
        tiny_dir,
        "--documents",
        "builtin:pydoc",
        "--pydoc_doc_chars",
        "6000",
        "--max_documents",
        "3",
        "--instruction_source",
        "list",
        "--max_new_tokens",
        "32",
        "--dry_run",
    ]
    # the chunk leaves no room for the template and the answer in a 300-token model
    code, text = _cli(
        capsys, *base, "--model_context_length", "300", "--chunk_tokens", "290", "--context_length", "8192"
    )
    assert code == 2 and "--chunk_tokens 290" in text, text
    value = re.search(r"set --chunk_tokens (\d+)", text).group(1)
    code, text = _cli(
        capsys, *base, "--model_context_length", "300", "--chunk_tokens", value, "--context_length", "8192"
    )
    assert code == 0 and "at most 3 rows" in text, text
    # the long pass needs the target context: the native 300 tokens hold no whole document
    code, text = _cli(
        capsys, *base, "--model_context_length", "600", "--chunk_tokens", "256", "--context_length", "600"
    )
    assert code == 2 and "--context_length 600" in text, text
    value = re.search(r"set --context_length (\d+)", text).group(1)
    code, text = _cli(
        capsys, *base, "--model_context_length", "600", "--chunk_tokens", "256", "--context_length", value
    )
    assert code == 0 and "at most 3 rows" in text, text
    # documents: the length filter drops all of them
    code, text = _cli(capsys, *base, "--min_doc_tokens", "100000")
    assert code == 2 and "--min_doc_tokens 100000" in text, text
    value = re.search(r"set --min_doc_tokens (\d+)", text).group(1)
    assert _cli(capsys, *base, "--chunk_tokens", "256", "--min_doc_tokens", value)[0] == 0
    # chunks as long as the documents: nothing short to contrast with
    code, text = _cli(capsys, *base, "--chunk_tokens", "100000")
    assert code == 2 and "--chunk_tokens 100000" in text, text
    assert not (tmp_path / "out").exists()


def test_real_run_stops_on_an_empty_plan_before_any_model_call(tmp_path, tokenizer):
    calls = []
    backend = ScriptedBackend(tokenizer, lambda p, long: calls.append(p) or "never", context_length=200)
    config = GenerationConfig(
        output=str(tmp_path / "out"), chunk_tokens=190, instruction_source="list", max_new_tokens=16, progress=False
    )
    docs = ["\n\n".join(f"Paragraph {i} about the topic number {i} and more words." for i in range(200))]
    with pytest.raises(EmptyPlanError, match=r"--chunk_tokens 190 .*set --chunk_tokens \d+"):
        generate_dataset(config, documents=docs, backend=backend, tokenizer=tokenizer)
    assert calls == [] and not (tmp_path / "out").exists()


def test_dry_run_needs_no_weights(tmp_path, tokenizer, capsys):
    """A model directory with only config.json and the tokenizer (as the README test uses) is enough."""
    from transformers import MistralConfig

    MistralConfig(max_position_embeddings=16384).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = GenerationConfig(
        model=str(tmp_path / "m"),
        documents="builtin:pydoc",
        max_documents=2,
        chunk_tokens=512,
        instruction_source="list",
        dry_run=True,
        progress=False,
    )
    plan = generate_dataset(config)
    assert plan.native_context == plan.long_context == 16384 and plan.max_rows == 2
    assert capsys.readouterr().out.strip() == plan.format()
    # the same plan from a config copy: the dry run is deterministic
    assert plan_generation(dataclasses.replace(config)).format() == plan.format()


def test_official_preset_resolves_every_choice_and_flags_override_it(tmp_path, tiny_dir, capsys):
    from trl_longpo.data.config import PRESETS
    from trl_longpo.data.filters import OFFICIAL_REFUSAL_PHRASES

    official = PRESETS["official"]
    config = GenerationConfig(preset="official")
    assert {k: getattr(config, k) for k in official} == official
    assert len(OFFICIAL_REFUSAL_PHRASES) == 37 and config.long_turn_context == "independent"
    assert GenerationConfig().drop_identical is True  # the library default differs from the preset's
    # on the command line, a flag given explicitly wins over the preset, even when it names the library default
    out = tmp_path / "out"
    argv = [
        "generate",
        "--model",
        tiny_dir,
        "--documents",
        "builtin:pydoc",
        "--pydoc_doc_chars",
        "6000",
        "--max_documents",
        "2",
        "--output",
        str(out),
        "--preset",
        "official",
        "--instruction_source",
        "list",
        "--chunk_tokens",
        "256",
        "--min_chunk_tokens",
        "64",
        "--max_new_tokens",
        "4",
        "--drop_identical",
        "true",
        "--progress",
        "false",
    ]
    assert main(argv) == 0, capsys.readouterr()
    settings = json.loads((out / "settings.json").read_text())
    recorded = settings["settings"]
    assert recorded["preset"] == "official"
    assert recorded["chunk_tokens"] == 256 and recorded["min_chunk_tokens"] == 64 and recorded["max_new_tokens"] == 4
    assert recorded["drop_identical"] is True  # explicit, equal to the library default: still overrides the preset
    for name in set(official) - {"chunk_tokens", "min_chunk_tokens", "max_new_tokens", "drop_identical"}:
        assert recorded[name] == official[name], name
    # from Python: preset_overrides keeps a library default the preset would change, also through dataclasses.replace
    config = GenerationConfig(preset="official", drop_identical=True, preset_overrides=["drop_identical"])
    assert config.drop_identical is True and dataclasses.replace(config, seed=1).drop_identical is True


def test_rejected_answers_use_their_own_repetition_threshold(tmp_path, tokenizer):
    text = "alpha beta gamma delta alpha beta gamma delta epsilon zeta eta theta"  # ratio 8/12
    backend = ScriptedBackend(tokenizer, lambda p, long: text + (" long" if long else ""), context_length=4096)
    docs = ["\n\n".join(f"Paragraph {i} about the topic number {i} and more words." for i in range(40))]
    common = {"chunk_tokens": 120, "instruction_source": "list", "progress": False, "max_repetition_ratio": 0.6}
    both = generate_dataset(
        GenerationConfig(output=str(tmp_path / "a"), **common), documents=docs, backend=backend, tokenizer=tokenizer
    )
    assert len(both.dataset) == 0  # 0.667 > 0.6 on both sides
    own = generate_dataset(
        GenerationConfig(output=str(tmp_path / "b"), max_repetition_ratio_rejected=0.9, **common),
        documents=docs,
        backend=backend,
        tokenizer=tokenizer,
    )
    assert own.stats["stages"]["short_answers (chosen)"].get("degenerate")
    assert "degenerate" not in own.stats["stages"]["long_answers (rejected)"]
