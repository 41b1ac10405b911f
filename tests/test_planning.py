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


# The README's hand-computed "Which SP size on 80 GB GPUs" table before the planner (commit 670aa0b): ring layouts,
# the tree's K/V gather with fp32 dK/dV over the gathered length. (max_length K, dp, sp) -> (tokens/GPU,
# activations, K/V gather, fixed, total, unshared total) in GiB. Its 55.7 used 672 KiB/token rounded (672.2 here).
HAND_COMPUTED = {
    (128, 4, 2): (66_049, 42.3, 1.5, 20.5, 64.3, 104.5),
    (128, 2, 4): (33_025, 21.2, 1.5, 20.5, 43.2, 62.5),
    (128, 1, 8): (16_513, 10.6, 1.5, 20.5, 32.6, 41.5),
    (256, 2, 4): (65_793, 42.2, 3.0, 20.5, 65.7, 104.5),
    (256, 1, 8): (32_897, 21.1, 3.0, 20.5, 44.6, 62.5),
    (512, 2, 4): (131_329, 84.2, 6.0, 20.5, 110.7, 188.5),
    (512, 1, 8): (65_665, 42.1, 6.0, 20.5, 68.6, 104.5),
    (512, 1, 16): (32_833, 21.0, 6.0, 13.7, 40.8, 55.7),
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
