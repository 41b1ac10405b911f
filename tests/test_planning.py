"""`trl-longpo plan`: shapes from configs, the memory arithmetic against the README's earlier hand-computed table, and
the README's planner tables equal to what the command prints."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest

from trl_longpo.cli import main as cli_main
from trl_longpo.sequence_parallel.planning import (
    BUILTIN_SHAPES,
    GIB,
    LM_HEAD_TOKEN_TILE,
    LM_HEAD_VOCAB_TILE,
    MEASURED_INVENTORY,
    MEASURED_SHAPE,
    PlanOptions,
    load_shape,
    plan,
    token_bytes,
)

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(argv)
    return code, out.getvalue()


@pytest.mark.parametrize("architecture", ["mistral", "qwen2"])
def test_shape_from_config_counts_the_real_parameters(tmp_path, architecture):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        architecture, vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    shape = load_shape(str(tmp_path))
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.layers) == (6, 2, 16, 3)
    model = AutoModelForCausalLM.from_config(config)
    assert shape.num_parameters == sum(p.numel() for p in model.parameters())


def test_builtin_shapes_have_their_published_sizes():
    sizes = {name: round(shape.num_parameters / 1e9, 2) for name, shape in BUILTIN_SHAPES.items()}
    assert sizes == {
        "Mistral-7B": 7.24, "Llama-3-8B": 8.03, "Qwen2.5-7B": 7.62, "Qwen2.5-14B": 14.77, "Qwen2.5-72B": 72.71,
    }  # fmt: skip


def test_scaling_the_measured_model_to_itself_is_the_measurement():
    measured = sum(sum(slot.values()) for slot in MEASURED_INVENTORY.values())
    per_token = token_bytes(MEASURED_SHAPE)
    assert per_token.per_layer + per_token.outside_layers == pytest.approx(measured)


# Mistral-7B per token, by hand from the probe's inventory (README "Which SP size on 80 GB GPUs"): one layer 200,840 B
# (MLP 4,096 x 14336/512 + hidden bf16 3,072 x 16 + hidden fp32 2,048 x 16 + kv 512 x 8 + heads 16 x 8 + 8), outside
# the layers 33,322 B (ids 8, RoPE 256 x 2, final norm 1,024 x 16 + 512 x 16 + 4, LM-head input 512 x 16, targets,
# lse, masks 30), checkpointed layer inputs 32 x 8,192 B, the LM head's input gradient 6 x 4,096 B.
MISTRAL_BYTES_PER_TOKEN = 32 * 8_192 + 200_840 + 33_322 + 24_576  # 520,882 B = 508.7 KiB


def test_mistral_bytes_per_token_is_the_hand_computation():
    assert token_bytes(BUILTIN_SHAPES["Mistral-7B"]).total() == MISTRAL_BYTES_PER_TOKEN


def test_lm_head_tiles_are_trls():
    """The planner's fused-LM-head buffers follow TRL's tile sizes; a TRL release that changes them must fail here."""
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    assert (LM_HEAD_TOKEN_TILE, LM_HEAD_VOCAB_TILE) == (
        chunked_logprob.TOKEN_CHUNK_SIZE,
        utils._CHUNKED_LOGPROB_CHUNK_SIZE,
    )


# The README's ring table with the tree's buffers before issue 17 (K/V + fp32 dK/dV over the gathered length),
# computed by hand: tokens per group L + 1,025, tokens/GPU = ceil(group / sp), activations = tokens/GPU x 520,882 B,
# K/V gather = group x 1,024 x 12 B, fixed = 16 B x 7,241,732,096 params / GPUs + the LM head's backward buffers
# (4,096 x 32,768 x 2 B tile + 32,000 x 4,096 x (4 + 2) B weight gradient = 0.98 GiB) + 7 GiB, unshared =
# ceil(2L / sp) x 520,882 B + fixed. (max_length K, dp, sp) -> (tokens/GPU, activations, K/V gather, fixed, total,
# unshared total) in GiB, one decimal.
HAND_COMPUTED = {
    (128, 4, 2): (66_049, 32.0, 1.5, 21.5, 55.0, 85.1),
    (128, 2, 4): (33_025, 16.0, 1.5, 21.5, 39.0, 53.3),
    (128, 1, 8): (16_513, 8.0, 1.5, 21.5, 31.0, 37.4),
    (256, 2, 4): (65_793, 31.9, 3.0, 21.5, 56.4, 85.1),
    (256, 1, 8): (32_897, 16.0, 3.0, 21.5, 40.4, 53.3),
    (512, 2, 4): (131_329, 63.7, 6.0, 21.5, 91.2, 148.6),
    (512, 1, 8): (65_665, 31.9, 6.0, 21.5, 59.3, 85.1),
    (512, 1, 16): (32_833, 15.9, 6.0, 14.7, 36.7, 46.5),
}


@pytest.mark.parametrize("key", list(HAND_COMPUTED))
def test_planner_reproduces_the_hand_computed_table(key):
    length, dp, sp = key
    options = PlanOptions(max_length=length * 1024, gpus=dp * sp, gpu_memory_gib=74.5, tree_chunked_grads=False)
    (row,) = [p for p in plan(BUILTIN_SHAPES["Mistral-7B"], options) if (p.dp, p.ulysses, p.ring) == (dp, 1, sp)]
    tokens, *gib = HAND_COMPUTED[key]
    got = [row.activations, row.attention_buffers, row.fixed, row.total, row.unshared_total]
    assert row.tokens_per_gpu == tokens
    assert [g / GIB for g in got] == pytest.approx(gib, abs=0.06)  # the table's one decimal


def test_ulysses_degree_is_capped_by_query_heads_only():
    options = PlanOptions(max_length=256 * 1024, gpus=8)
    splits = {(p.ulysses, p.ring) for p in plan(BUILTIN_SHAPES["Qwen2.5-7B"], options) if p.sp == 8}
    assert splits == {(1, 8), (2, 4), (4, 2)}  # 8 does not divide 28 query heads; 4 KV heads are no cap


def test_recommendation_is_the_smallest_sp_with_headroom():
    options = PlanOptions(max_length=512 * 1024, gpus=8)
    plans = plan(BUILTIN_SHAPES["Mistral-7B"], options)
    (best,) = [p for p in plans if p.recommended]
    assert best.headroom >= 10 * GIB
    assert all(p.headroom < 10 * GIB for p in plans if p.sp < best.sp)


def test_plan_command_errors_are_one_line():
    code, _ = _run_cli(["plan", "--model", "no-such-model", "--max_length", "128K", "--gpus", "8"])
    assert code == 2
    code, out = _run_cli(["plan", "--model", "Mistral-7B", "--max_length", "64K", "--gpus", "2", "--json"])
    assert code == 0 and {row["layout"] for row in json.loads(out)} == {"none", "ring", "ulysses"}


def _tables_after_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, table rows) for every `trl-longpo plan ...` line followed (after blank lines) by a markdown table."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip().startswith("trl-longpo plan "):
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        rows = []
        while j < len(lines) and lines[j].startswith("|"):
            rows.append(lines[j])
            j += 1
        found.append((line.strip(), rows))
    return found


def test_readme_planner_tables_are_what_the_command_prints():
    tables = _tables_after_commands((ROOT / "README.md").read_text())
    assert tables, "the README shows no `trl-longpo plan` table"
    for command, rows in tables:
        code, out = _run_cli(shlex.split(command)[1:])
        assert code == 0
        printed = [line for line in out.splitlines() if line.startswith("|")]
        assert rows == printed, f"README table differs from `{command}`"
        assert re.search(r"recommended", "\n".join(rows))
