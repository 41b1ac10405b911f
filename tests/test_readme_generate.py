"""Every `trl-longpo generate` command in README.md yields rows: each is dry-run on local documents of the lengths
its flags select (the shortest and the longest it accepts) with a local model directory that carries the named
model's context window, RoPE θ and chat template (weights are not needed; the tokenizer is the offline tiny one)."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest

from trl_longpo.cli import main
from trl_longpo.data.documents import corpus_texts
from trl_longpo.tiny import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# What a dry run reads from a hub model: its config (window, θ) and its tokenizer's chat template.
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
KNOWN_MODELS = {
    "mistralai/Mistral-7B-Instruct-v0.2": {
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "chat_template": MISTRAL_V02_TEMPLATE,
    },
}


def readme_generate_commands() -> list[list[str]]:
    """The arguments of every `trl-longpo generate` command in the README's bash blocks (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("trl-longpo generate"):
                commands.append(shlex.split(line)[2:])
    return commands


def _option(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def _replace(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(name) + 1] = value
    return args


def _model_dir(name: str, tmp_path, tokenizer) -> str:
    from transformers import MistralConfig

    assert name in KNOWN_MODELS, f"README names {name}: add its window, θ and chat template to KNOWN_MODELS"
    facts = KNOWN_MODELS[name]
    path = tmp_path / "model"
    MistralConfig(
        max_position_embeddings=facts["max_position_embeddings"],
        rope_theta=facts["rope_theta"],
        sliding_window=None,
        vocab_size=len(tokenizer),
    ).save_pretrained(path)  # the config only: a dry run loads no weights
    tokenizer.chat_template = facts["chat_template"]
    tokenizer.save_pretrained(path)
    return str(path)


@functools.lru_cache(maxsize=4)
def _document(low: int, high: int) -> str:
    """Paragraphs of CPython's help topics making a document of `low` to `high` tokens (measured, not estimated)."""
    tokenizer = build_tiny_tokenizer()
    paragraphs = [p for t in corpus_texts() for p in t.split("\n\n") if p.strip()]
    counts = [len(ids) for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]
    picked, total, i = [], 0, 0
    while total < low:
        budget = low - total  # add about what is missing, then measure the joined text again
        while budget > 0:
            picked.append(paragraphs[i % len(paragraphs)])
            budget -= counts[i % len(paragraphs)] + 1
            i += 1
        total = len(tokenizer("\n\n".join(picked), add_special_tokens=False)["input_ids"])
    assert total <= high, (total, low, high)
    return "\n\n".join(picked)


def _dry_run(args: list[str], tmp_path, capsys) -> tuple[int, str]:
    """`args` with the model, documents and output made local, run with --dry_run."""
    tokenizer = build_tiny_tokenizer()
    low = int(_option(args, "--min_doc_tokens", 0))
    high = int(_option(args, "--max_doc_tokens", 0)) or 2 * low or 65536
    bounds = [(low, low + 2048), (high - 2048, high)]  # the shortest and the longest documents the command selects
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": _document(*b)}) + "\n" for b in bounds))
    args = _replace(args, "--model", _model_dir(_option(args, "--model"), tmp_path, tokenizer))
    args = _replace(args, "--documents", str(docs))
    args = _replace(args, "--output", str(tmp_path / "out"))
    if "--dry_run" not in args:
        args.append("--dry_run")
    code = main(["generate", *args, "--progress", "false"])
    captured = capsys.readouterr()
    assert not (tmp_path / "out").exists()
    return code, captured.out + captured.err


def test_the_readme_has_generate_commands():
    assert len(readme_generate_commands()) >= 2


@pytest.mark.parametrize("index", range(len(readme_generate_commands())))
def test_readme_generate_command_yields_rows(index, tmp_path, capsys):
    code, text = _dry_run(readme_generate_commands()[index], tmp_path, capsys)
    assert code == 0, text
    assert "2 of 2 documents kept" in text and "at most 2 rows" in text, text
    assert "skipped" not in text, text  # no prompt of either document is over a context limit


def test_the_old_readme_command_is_caught(tmp_path, capsys):
    """Negative control: the command the README gave before (chunks as long as Mistral's window, no
    --context_length) yields no rows, and the dry run says which option to change."""
    old = shlex.split(
        "--model mistralai/Mistral-7B-Instruct-v0.2 --documents books.jsonl --output data/round1 --backend vllm "
        "--tensor_parallel_size 4 --min_doc_tokens 65536 --max_doc_tokens 131072 --chunk_tokens 32768 "
        "--turns_per_doc 2 --long_rope_theta 1e7"
    )
    code, text = _dry_run(old, tmp_path, capsys)
    assert code == 2 and "--chunk_tokens 32768 is too long" in text, text
