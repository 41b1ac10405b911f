"""Pipeline logic with a scripted backend: row format, multi-turn grouping, each filter counted, instruction sources."""

from __future__ import annotations

import re

import pytest

from trl_longpo.data import EmptyPlanError, GenerationConfig, chat_prompt_ids, generate_dataset, plan_generation
from trl_longpo.data.testing import ScriptedBackend

QUESTIONS = "Here are the questions:\n1. What does the passage say about {tag}?\n2. How is {tag} used in practice?\n"
GOOD_SHORT = "The passage explains how alpha and beta interact within {tag} carefully."
GOOD_LONG = "Somewhere the document mentions many different things about various topics."


def make_doc(d: int, paragraphs: int = 6) -> str:
    return "\n\n".join(
        f"DOC{d} paragraph {p}: " + " ".join(f"lorem{(d * 7 + p * 3 + k) % 50}" for k in range(14))
        for p in range(paragraphs)
    )


def doc_of(prompt: str) -> int:
    return int(re.search(r"DOC(\d+)", prompt).group(1))


def base_config(tmp_path, **overrides) -> GenerationConfig:
    settings = {
        "output": str(tmp_path / "out"),
        "chunk_tokens": 120,
        "turns_per_doc": 1,
        "max_new_tokens": 16,
        "instruction_max_new_tokens": 32,
        "batch_size": 4,
        "progress": False,
        "seed": 3,
    }
    return GenerationConfig(**{**settings, **overrides})


def default_respond(prompt: str, long_context: bool):
    tag = f"topic{doc_of(prompt)}"
    if "comprehensive English questions" in prompt:
        return QUESTIONS.format(tag=tag)
    return GOOD_LONG if long_context else GOOD_SHORT.format(tag=tag)


def test_single_turn_rows_have_the_exact_trainer_format(tmp_path, tokenizer):
    docs = [make_doc(d) for d in range(3)]
    backend = ScriptedBackend(tokenizer, default_respond, context_length=4096)
    cfg = base_config(tmp_path, use_lead_in=False, instruction_pick="first")
    result = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert len(result.dataset) == 3
    for d, row in enumerate(result.dataset):
        instr = f"What does the passage say about topic{d}?"
        assert row["prompt"] == [{"role": "user", "content": docs[d] + "\n\n" + instr}]
        (short,) = row["short_prompt"]
        assert short["role"] == "user" and short["content"].endswith("\n\n" + instr)
        chunk = short["content"][: -len("\n\n" + instr)]
        assert chunk in docs[d] and len(chunk) < len(docs[d])
        assert row["chosen"] == [{"role": "assistant", "content": GOOD_SHORT.format(tag=f"topic{d}")}]
        assert row["rejected"] == [{"role": "assistant", "content": GOOD_LONG}]
    # prompts were tokenized exactly as the trainer will: apply_chat_template(..., add_generation_prompt=True)
    long_calls = [c for c in backend.calls if c["long_context"]]
    row = result.dataset[0]
    assert long_calls[0]["ids"] == chat_prompt_ids(tokenizer, row["prompt"])
    assert any(c["ids"] == chat_prompt_ids(tokenizer, row["short_prompt"]) for c in backend.calls)
    assert (result.output_dir / "stats.json").exists() and (result.output_dir / "stats.md").exists()


def test_multi_turn_rows_follow_eq13(tmp_path, tokenizer):
    docs = [make_doc(d, paragraphs=9) for d in range(2)]
    counter = {"n": 0}

    def respond(prompt, long_context):
        if "comprehensive English questions" in prompt:
            return default_respond(prompt, long_context)
        counter["n"] += 1
        return f"{'long' if long_context else 'short'} answer number {counter['n']} about {doc_of(prompt)} words"

    backend = ScriptedBackend(tokenizer, respond, context_length=4096)
    cfg = base_config(tmp_path, turns_per_doc=3, use_lead_in=False)
    result = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert len(result.dataset) == 2
    for d, row in enumerate(result.dataset):
        assert [m["role"] for m in row["chosen"]] == ["assistant", "user", "assistant", "user", "assistant"]
        assert [m for m in row["chosen"] if m["role"] == "user"] == [m for m in row["rejected"] if m["role"] == "user"]
        assert len(row["short_prompt"]) == 3 and all(len(p) == 1 for p in row["short_prompt"])
        instructions = [row["prompt"][0]["content"].rsplit("\n\n", 1)[1]] + [
            m["content"] for m in row["chosen"] if m["role"] == "user"
        ]
        chunks = []
        for short, instr in zip(row["short_prompt"], instructions):
            assert short[0]["content"].endswith("\n\n" + instr)
            chunks.append(short[0]["content"][: -len("\n\n" + instr)])
        positions = [docs[d].index(c) for c in chunks]
        assert positions == sorted(positions) and len(set(positions)) == 3  # distinct chunks, document order
        assert row["prompt"][0]["content"] == docs[d] + "\n\n" + instructions[0]
        # the long answer of turn 3 was generated from the long conversation so far
        conversation = row["prompt"] + row["rejected"][:4]
        ids = chat_prompt_ids(tokenizer, conversation)
        assert any(c["ids"] == ids and c["long_context"] for c in backend.calls)
        # the short answer of turn 3 from chunk 3 + instruction 3 alone
        assert any(c["ids"] == chat_prompt_ids(tokenizer, row["short_prompt"][2]) for c in backend.calls)
        assert all(m["content"].startswith("short") for m in row["chosen"][::2])
        assert all(m["content"].startswith("long") for m in row["rejected"][::2])


def test_failed_turn_truncates_conversation(tmp_path, tokenizer):
    docs = [make_doc(0, paragraphs=9)]
    long_answers = iter(["first long answer with enough words", "", "third long answer never generated"])

    def respond(prompt, long_context):
        if "comprehensive English questions" in prompt:
            return default_respond(prompt, long_context)
        return next(long_answers) if long_context else "short answer with several good words"

    backend = ScriptedBackend(tokenizer, respond, context_length=4096)
    result = generate_dataset(
        base_config(tmp_path, turns_per_doc=3), documents=docs, backend=backend, tokenizer=tokenizer
    )
    (row,) = result.dataset
    assert len(row["chosen"]) == 1 and len(row["short_prompt"]) == 1
    stage = result.stats["stages"]["long_answers (rejected)"]
    assert stage == {"requested": 2, "passed": 1, "empty": 1, "skipped_after_failed_turn": 1}
    assert sum(c["long_context"] for c in backend.calls) == 2


def test_independent_single_turn_rows(tmp_path, tokenizer):
    docs = [make_doc(d, paragraphs=9) for d in range(2)]
    backend = ScriptedBackend(tokenizer, default_respond, context_length=4096)
    cfg = base_config(tmp_path, turns_per_doc=2, group_turns=False, long_turn_context="independent")
    result = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert len(result.dataset) == 4
    for row in result.dataset:
        assert isinstance(row["short_prompt"], list) and row["short_prompt"][0]["role"] == "user"
        assert len(row["chosen"]) == len(row["rejected"]) == 1
        assert chat_prompt_ids(tokenizer, row["prompt"]) in [c["ids"] for c in backend.calls if c["long_context"]]


def test_conversation_mode_needs_grouping(tmp_path):
    with pytest.raises(ValueError, match="group_turns"):
        base_config(tmp_path, turns_per_doc=2, group_turns=False).validate()


def test_every_filter_is_counted(tmp_path, tokenizer):
    # doc d exercises one outcome each; doc 7 is far longer than the others (long prompt over the context)
    outcomes = {
        0: ("passed", GOOD_SHORT, GOOD_LONG, "stop"),
        1: ("chosen:empty", "   ", GOOD_LONG, "stop"),
        2: ("chosen:too_short", "ok a", GOOD_LONG, "stop"),
        3: ("rejected:degenerate", GOOD_SHORT, "the the the the the the the the the the", "stop"),
        4: ("rejected:refusal", GOOD_SHORT, "As an AI language model, I cannot discuss this subject at all.", "stop"),
        5: ("rejected:truncated", GOOD_SHORT, GOOD_LONG, "length"),
        6: ("rejected:identical_to_chosen", GOOD_SHORT, GOOD_SHORT, "stop"),
        7: ("rejected:prompt_over_context", GOOD_SHORT, GOOD_LONG, "stop"),
        8: ("instructions:unparsable", GOOD_SHORT, GOOD_LONG, "stop"),
    }
    docs = [make_doc(d, paragraphs=60 if d == 7 else 5) for d in outcomes]

    def respond(prompt, long_context):
        d = doc_of(prompt)
        if "comprehensive English questions" in prompt:
            return "gibberish without any list" if d == 8 else QUESTIONS.format(tag=d)
        _, short, long, reason = outcomes[d]
        return (long.format(tag=d), reason) if long_context else short.format(tag=d)

    backend = ScriptedBackend(tokenizer, respond, context_length=1500)
    cfg = base_config(tmp_path, context_length=900, max_repetition_ratio=0.9)
    result = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    stages = result.stats["stages"]
    assert len(result.dataset) == 1 and result.stats["run"]["rows"] == 1
    assert stages["instructions"] == {"requested": 9, "parsed": 8, "dropped_unparsable": 1}
    assert stages["short_answers (chosen)"] == {"requested": 8, "passed": 6, "empty": 1, "too_short": 1}
    assert stages["long_answers (rejected)"] == {
        "requested": 6,
        "passed": 1,
        "degenerate": 1,
        "refusal": 1,
        "truncated": 1,
        "identical_to_chosen": 1,
        "prompt_over_context": 1,
    }
    assert stages["rows"]["documents_without_valid_turn"] == 8
    # nothing dropped silently: every requested item has exactly one outcome
    for name in ("short_answers (chosen)", "long_answers (rejected)"):
        counts = dict(stages[name])
        assert counts.pop("requested") == sum(counts.values())
    assert not any("DOC7" in c["prompt"] for c in backend.calls if c["long_context"])  # never sent to the engine
    report = (result.output_dir / "stats.md").read_text()
    for reason in ("degenerate", "refusal", "truncated", "identical_to_chosen", "prompt_over_context", "too_short"):
        assert reason in report


def test_disabled_filters_keep_answers(tmp_path, tokenizer):
    docs = [make_doc(0)]
    backend = ScriptedBackend(
        tokenizer, lambda p, long: QUESTIONS.format(tag=0) if "comprehensive" in p else ("the the the the", "length")
    )
    cfg = base_config(
        tmp_path, drop_truncated=False, drop_identical=False, max_repetition_ratio=1.0, min_answer_words=1
    )
    assert len(generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer).dataset) == 1


def test_short_prompt_limit_and_document_length_filters(tmp_path, tokenizer):
    docs = [make_doc(0), make_doc(1, paragraphs=2), "", make_doc(3, paragraphs=40)]
    backend = ScriptedBackend(tokenizer, default_respond, context_length=4096)
    cfg = base_config(tmp_path, min_doc_tokens=200, max_doc_tokens=1000, max_short_prompt_tokens=60)
    plan = plan_generation(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert plan.documents == {"in_source": 4, "empty": 1, "too_short": 1, "too_long": 1, "kept": 1}
    assert plan.stats["stages"]["short_answers (chosen)"] == {"requested": 1, "prompt_over_limit": 1}
    assert plan.stage("short answers (chosen)").skipped == {"prompt_over_limit": 1} and plan.max_rows == 0
    # the real run stops on that plan before the model is asked anything, naming the option
    with pytest.raises(EmptyPlanError, match="--max_short_prompt_tokens 60"):
        generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert backend.calls == []


def test_a_run_whose_answers_are_all_filtered_writes_an_empty_dataset(tmp_path, tokenizer):
    backend = ScriptedBackend(tokenizer, lambda p, long: QUESTIONS.format(tag=0) if "comprehensive" in p else "no")
    result = generate_dataset(base_config(tmp_path), documents=[make_doc(0)], backend=backend, tokenizer=tokenizer)
    assert result.stats["stages"]["short_answers (chosen)"] == {"requested": 1, "too_short": 1}
    assert len(result.dataset) == 0 and "prompt" in result.dataset.column_names  # empty, but with the schema


def test_fallback_and_list_instruction_sources(tmp_path, tokenizer):
    docs = [make_doc(d) for d in range(2)]
    fallback = ["Summarize the text in two sentences."]
    gibberish = ScriptedBackend(
        tokenizer, lambda p, long: "qwe zxc" if "comprehensive" in p else default_respond(p, long)
    )
    cfg = base_config(tmp_path, on_parse_failure="fallback", fallback_instructions=fallback, use_lead_in=False)
    result = generate_dataset(cfg, documents=docs, backend=gibberish, tokenizer=tokenizer)
    assert result.stats["stages"]["instructions"] == {"requested": 2, "fallback_used": 2}
    assert all(row["prompt"][0]["content"].endswith("\n\n" + fallback[0]) for row in result.dataset)

    listed = ScriptedBackend(tokenizer, default_respond)
    cfg = base_config(
        tmp_path, output=str(tmp_path / "list"), instruction_source="list", fallback_instructions=fallback
    )
    result = generate_dataset(cfg, documents=docs, backend=listed, tokenizer=tokenizer)
    assert result.stats["stages"]["instructions"] == {"requested": 2, "from_list": 2}
    assert not any("comprehensive English questions" in c["prompt"] for c in listed.calls)
    lead_ins = cfg.lead_in_phrases
    lowered = "s" + fallback[0][1:]
    assert all(any(row["prompt"][0]["content"].endswith(f"{p} {lowered}") for p in lead_ins) for row in result.dataset)


def test_instruction_before_context_and_custom_joiner(tmp_path, tokenizer):
    docs = [make_doc(0)]
    backend = ScriptedBackend(tokenizer, default_respond)
    cfg = base_config(
        tmp_path, instruction_position="before", joiner="\n---\n", use_lead_in=False, instruction_pick="first"
    )
    (row,) = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer).dataset
    assert row["prompt"][0]["content"] == "What does the passage say about topic0?\n---\n" + docs[0]


def test_rank_sharding_and_merge(tmp_path, tokenizer):
    from trl_longpo.data import merge_shards
    from trl_longpo.data.rows import ShardsError

    docs = [make_doc(d) for d in range(5)]
    backend = ScriptedBackend(tokenizer, default_respond)
    results = []
    for rank in range(2):
        cfg = base_config(tmp_path, rank=rank, world_size=2)
        if rank == 1:
            with pytest.raises(ShardsError, match=r"rank\(s\) \[1\] of --world_size 2 are missing"):
                merge_shards(tmp_path / "out")
        results.append(generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer))
    assert [r.output_dir.name for r in results] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    assert [len(r.dataset) for r in results] == [3, 2]
    merged = merge_shards(tmp_path / "out")
    assert len(merged) == 5
    assert sorted(doc_of(row["prompt"][0]["content"]) for row in merged) == list(range(5))


def test_merge_refuses_shards_of_other_settings_or_world_sizes(tmp_path, tokenizer):
    """Each shard's settings file records its settings: shards made with another seed (or chunk size, documents)
    are refused by name, as are shards of two world sizes (issue 19: merged without a word)."""
    from trl_longpo.data import merge_shards
    from trl_longpo.data.rows import ShardsError

    docs = [make_doc(d) for d in range(4)]
    backend = ScriptedBackend(tokenizer, default_respond)

    def shard(rank, world_size, **overrides):
        cfg = base_config(tmp_path, rank=rank, world_size=world_size, **overrides)
        generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)

    shard(0, 2)
    shard(1, 2, seed=4)
    with pytest.raises(ShardsError, match=r"different settings \(seed: rank-00000-of-00002=3, rank-00001-of-00002=4"):
        merge_shards(tmp_path / "out")
    shard(1, 2, overwrite=True)
    assert len(merge_shards(tmp_path / "out")) == 4
    shard(0, 3)
    with pytest.raises(ShardsError, match="different --world_size"):
        merge_shards(tmp_path / "out")
