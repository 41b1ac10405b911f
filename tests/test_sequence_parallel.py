"""Sequence parallelism on CPU: real ring-flash-attn kernels over gloo, on the flash-attn stand-in (PyTorch's CPU
flash kernels), through the path that trains: `trl_longpo.scoring.RowScorer` and TRL's fused LM head.

Every multi-process check runs inside one of two process groups launched once per module (2 ranks, 4 ranks); each
rank runs a list of scenarios and reports numbers, which the tests below judge. The reference is the unsplit model
with eager attention and full logits, one row at a time (no padding), in fp64: an independent computation.

Parity is judged as DDP would see it: the SP ranks' gradients are averaged over the whole world (dp x sp ranks) and
compared with the data-parallel average of the unsplit gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import wide_tiny_model
from distributed import init_rank, launch, write_result

VOCAB = 1024
PAD = 2
ROW_LEN = 24
FP64_TOL = 1e-5
INIT_RANGE = 0.2  # the Llama / Qwen2 models below use `conftest.wide_tiny_model`'s wide init


# ----------------------------------------------------------------------------------------------------------------
# Data, models, reference
# ----------------------------------------------------------------------------------------------------------------


def make_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: single-turn (right-padded, 23 tokens) and multi-turn (left-padded, 17 tokens, two answer spans)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (2, ROW_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 23:] = 0
    mask[1, :7] = 0
    ids[mask == 0] = PAD
    labels = torch.full_like(ids, -100)
    labels[0, 9:23] = ids[0, 9:23]  # prompt 0..8, answer 9..22
    labels[1, 12:16] = ids[1, 12:16]  # first assistant turn
    labels[1, 19:24] = ids[1, 19:24]  # second assistant turn
    return ids, labels, mask


def objective(sum_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """A loss using both rows differently plus a per-token-mean NLL term (like LongPO's NLL on the chosen row)."""
    return 0.7 * sum_logps[0] - 1.3 * sum_logps[1] - sum_logps[0] / num_tokens[0]


def mistral() -> torch.nn.Module:
    return wide_tiny_model(vocab_size=VOCAB)


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=INIT_RANGE,
    )
    return LlamaForCausalLM(config).to(torch.float64)


def qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=INIT_RANGE,
    )
    return Qwen2ForCausalLM(config).to(torch.float64)


MODELS = {"mistral": mistral, "llama": llama, "qwen2": qwen2}


def reference(model: torch.nn.Module, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsplit per-row sums of shifted-label log-probs, each row alone (no padding, positions 0..n-1)."""
    from trl.trainer.utils import selective_log_softmax

    ids, labels, mask = rows
    sums, counts = [], []
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        row_ids, row_labels = ids[b][real][None], labels[b][real][None]
        logits = model(input_ids=row_ids).logits
        keep = row_labels[:, 1:] != -100
        logps = selective_log_softmax(logits[:, :-1], row_labels[:, 1:].clamp(min=0))
        sums.append((logps * keep).sum())
        counts.append(keep.sum())
    return torch.stack(sums), torch.stack(counts)


def reference_grads(base: torch.nn.Module, dp_size: int) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """Per dp group: unsplit row sums; and the dp-averaged gradient of `objective` (what DDP without SP yields)."""
    model = copy.deepcopy(base)
    model.set_attn_implementation("eager")
    all_sums = []
    for dp_rank in range(dp_size):
        sums, counts = reference(model, make_rows(100 + dp_rank))
        (objective(sums, counts) / dp_size).backward()
        all_sums.append(sums.tolist())
    return all_sums, {n: p.grad.clone() for n, p in model.named_parameters()}


def world_average_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DDP / FSDP do with gradients: average over ALL ranks (dp x sp)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g / dist.get_world_size()
    return grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def global_rel_err(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((grads[n].double() - ref[n]).norm() ** 2) for n in ref)
    den = sum(float(ref[n].norm() ** 2) for n in ref)
    return (num / den) ** 0.5


# ----------------------------------------------------------------------------------------------------------------
# Scenarios (run on every rank of a launched world; return JSON-able numbers)
# ----------------------------------------------------------------------------------------------------------------


def split(base, context, dtype=torch.float64):
    """A copy of `base` with TRL's fused LM head (as DPOTrainer adds it), switched for `context`, and its scorer."""
    from trl.trainer.utils import add_fused_lm_head

    from trl_longpo.scoring import RowScorer

    model = copy.deepcopy(base).to(dtype)
    add_fused_lm_head(model)
    scorer = RowScorer(share_prompt=False, sp=context, pad_token_id=PAD)
    context.prepare_model(model, scorer.attention_name)
    return model, scorer


def row_sums(scorer, model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of the label tokens' log-probs and their counts, as the trainer computes them."""
    ids, labels, mask = rows
    out = scorer.row_sums(model, ids, mask, [labels != -100])
    return out.sums[0, 0], out.counts[0]


def sp_run(
    base, mesh, impl, rows, heads_k_stride=1, attention_dtype=None, dtype=torch.float64, gradient_checkpointing=False
):
    from trl_longpo.sequence_parallel import SequenceParallelContext

    context = SequenceParallelContext(
        mesh, ring_attn_impl=impl, heads_k_stride=heads_k_stride, attention_dtype=attention_dtype
    )
    model, scorer = split(base, context, dtype)
    if gradient_checkpointing:  # layers are recomputed in backward: the attention state must still reach them
        model.train()
        model.gradient_checkpointing_enable()
    sums, counts = row_sums(scorer, model, rows)
    objective(sums, counts).backward()
    return (sums, counts), world_average_grads(model)


def parity(
    sp_size: int, impl: str, model_name: str = "mistral", heads_k_stride: int = 1, gradient_checkpointing: bool = False
) -> dict:
    from trl_longpo.sequence_parallel import init_sequence_parallel_mesh

    mesh = init_sequence_parallel_mesh(sp_size)
    base = MODELS[model_name]()
    ref_sums, ref_grads = reference_grads(base, mesh.dp_size)
    rows = make_rows(100 + mesh.dp_rank)
    (sums, counts), grads = sp_run(
        base, mesh, impl, rows, heads_k_stride, gradient_checkpointing=gradient_checkpointing
    )
    _, ref_counts = reference(base, rows)
    per_param = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
    worst = max(per_param, key=per_param.get)
    return {
        "sums": sums.tolist(),
        "ref_sums": ref_sums[mesh.dp_rank],
        "sum_err": rel_err(sums.detach(), torch.tensor(ref_sums[mesh.dp_rank], dtype=torch.float64)),
        "counts_match": counts.tolist() == ref_counts.tolist(),
        "grad_err": per_param[worst],
        "worst_param": worst,
        "num_params": len(per_param),
        "dp_size": mesh.dp_size,
    }


def long_rows(seed: int, length: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two longer rows with a label on every real token: many tokens, so per-token error statistics are stable."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 7 :] = 0
    ids[mask == 0] = PAD
    return ids, ids.masked_fill(mask == 0, -100), mask


def token_logps(model, context, rows) -> dict[tuple[int, int], float]:
    """Per-token log-probs of the sharded forward through the fused LM head, gathered over the SP group and keyed by
    (row, true position)."""
    ids, labels, mask = rows
    shard = context.shard_rows(ids, [labels != -100], mask, pad_token_id=PAD)
    with torch.no_grad():
        logps = model(
            input_ids=shard.input_ids[None],
            position_ids=shard.position_ids[None],
            shift_labels=shard.targets[None],
            fused_lm_head=True,
            attention_state=context.attention_state(shard.plan),
        ).log_probs[0]
    keep = shard.masks[0]
    local = list(zip(shard.row_index[keep].tolist(), shard.position_ids[keep].tolist(), logps[keep].tolist()))
    gathered = [None] * context.mesh.sp_size
    dist.all_gather_object(gathered, local, group=context.mesh.sp_group)
    return {(row, pos): value for part in gathered for row, pos, value in part}


def reference_token_logps(model, rows) -> dict[tuple[int, int], float]:
    from trl.trainer.utils import selective_log_softmax

    ids, labels, mask = rows
    result = {}
    with torch.no_grad():
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            row_ids, row_labels = ids[b][real][None], labels[b][real][None]
            logps = selective_log_softmax(model(input_ids=row_ids).logits[0, :-1], row_labels[0, 1:].clamp(min=0))
            result.update({(b, p): float(v) for p, v in enumerate(logps) if row_labels[0, p + 1] != -100})
    return result


def bf16_vs_solo(impl: str) -> dict:
    """Ring attention in bf16 vs the same kernel without a ring (an SP group of one), both against fp64.

    Model weights stay fp32 and only attention runs in bf16 (attention_dtype), so the errors measured are the
    attention kernel's. Statistics: RMS of per-token log-prob errors (~120 tokens) and the global relative error of
    the world-averaged gradient.
    """
    from trl_longpo.sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh

    ring_mesh = init_sequence_parallel_mesh(dist.get_world_size())
    solo_mesh = init_sequence_parallel_mesh(1)
    base = mistral()
    ref_model = copy.deepcopy(base)
    ref_model.set_attn_implementation("eager")
    rows = long_rows(7)
    ref_tokens = reference_token_logps(ref_model, rows)
    sums, counts = reference(ref_model, rows)
    objective(sums, counts).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    result = {"num_tokens": len(ref_tokens)}
    for name, mesh in (("ring", ring_mesh), ("solo", solo_mesh)):
        # solo: each rank runs the whole rows alone (an SP group of one, dp = world), so the world-averaged
        # gradient is that full gradient, directly comparable with the reference.
        _, grads = sp_run(base, mesh, impl, rows, attention_dtype=torch.bfloat16, dtype=torch.float32)
        context = SequenceParallelContext(mesh, ring_attn_impl=impl, attention_dtype=torch.bfloat16)
        model, _ = split(base, context, torch.float32)
        tokens = token_logps(model, context, rows)
        assert tokens.keys() == ref_tokens.keys()
        errors = torch.tensor([tokens[k] - ref_tokens[k] for k in ref_tokens], dtype=torch.float64)
        result[f"{name}_token_rms_err"] = float(errors.pow(2).mean().sqrt())
        result[f"{name}_grad_err"] = global_rel_err(grads, ref_grads)
    return result


def negative_local_positions(impl: str) -> dict:
    """Shard correctly but give RoPE the shard-local positions 0..T_local-1: parity must break."""
    from trl_longpo.sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh

    mesh = init_sequence_parallel_mesh(dist.get_world_size())
    base = mistral()
    ref_sums, _ = reference(base, make_rows(100))
    context = SequenceParallelContext(mesh, ring_attn_impl=impl)
    model, scorer = split(base, context)
    ids, labels, mask = make_rows(100)
    with torch.no_grad():
        shard = context.shard_rows(ids, [labels != -100], mask, pad_token_id=PAD)
        state = context.attention_state(shard.plan)
        good = scorer.packed_row_sums(model, shard, state, ("log_probs",)).sums[0, 0]
        local = torch.arange(shard.input_ids.shape[0])
        bad = scorer.packed_row_sums(model, dataclasses.replace(shard, position_ids=local), state, ("log_probs",))
        bad = bad.sums[0, 0]
    return {"good_err": rel_err(good, ref_sums.detach()), "bad_err": rel_err(bad, ref_sums.detach())}


def negative_different_row() -> dict:
    """The last rank gets a row with one changed token: the checksum must raise, naming it; unchecked, parity
    breaks."""
    from trl_longpo.scoring import RowScorer
    from trl_longpo.sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh

    mesh = init_sequence_parallel_mesh(dist.get_world_size())
    base = mistral()
    ids, labels, mask = make_rows(100)
    ref_sums, _ = reference(base, (ids, labels, mask))
    if mesh.rank == dist.get_world_size() - 1:
        ids = ids.clone()
        labels = labels.clone()
        ids[0, 12] = labels[0, 12] = 5 + (int(ids[0, 12]) + 1 - 5) % (VOCAB - 5)
    context = SequenceParallelContext(mesh, ring_attn_impl="zigzag")
    model, scorer = split(base, context)
    result = {}
    try:
        with torch.no_grad():
            row_sums(scorer, model, (ids, labels, mask))
        result["checksum_error"] = None
    except RuntimeError as err:
        result["checksum_error"] = str(err)
    unchecked = RowScorer(share_prompt=False, sp=dataclasses.replace(context, verify_batches=False), pad_token_id=PAD)
    with torch.no_grad():
        sums, _ = row_sums(unchecked, model, (ids, labels, mask))
    result["unchecked_err"] = rel_err(sums, ref_sums.detach())
    return result


def bad_inputs() -> dict:
    """Clear errors for configurations that cannot work; every rank raises before any collective."""
    from trl_longpo.sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh

    def error_of(fn) -> str | None:
        try:
            fn()
        except (ValueError, RuntimeError) as err:
            return f"{type(err).__name__}: {err}"
        return None

    result = {"world_not_divisible": error_of(lambda: init_sequence_parallel_mesh(dist.get_world_size() + 1))}
    mesh = init_sequence_parallel_mesh(dist.get_world_size())
    ids, labels, mask = make_rows(100)

    # heads_k_stride not dividing the kv heads, reaching the attention function itself (prepare would refuse it too).
    context = SequenceParallelContext(mesh, ring_attn_impl="llama3")
    model, scorer = split(mistral(), context)
    shard = context.shard_rows(ids, [labels != -100], mask, pad_token_id=PAD)
    state = context.attention_state(shard.plan)

    def sums_with(state):
        with torch.no_grad():
            return scorer.packed_row_sums(model, shard, state, ("log_probs",)).sums

    result["heads_k_stride"] = error_of(lambda: sums_with(dataclasses.replace(state, heads_k_stride=3)))

    # A sliding-window model at the attention function (config changed after prepare), then the explicit override.
    model.config.sliding_window = 8
    result["sliding_window"] = error_of(lambda: sums_with(state))
    allowed = dataclasses.replace(context, allow_sliding_window=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        allowed.prepare_model(model, scorer.attention_name)
        sums = sums_with(allowed.attention_state(shard.plan))
    result["sliding_window_override_warned"] = any("sliding window" in str(w.message) for w in caught)
    result["sliding_window_override_finite"] = bool(torch.isfinite(sums).all())

    # No state at all: the attention function must say how to provide one.
    model.config.sliding_window = None
    result["no_state"] = error_of(
        lambda: model(input_ids=shard.input_ids[None], position_ids=shard.position_ids[None])
    )
    return result


SCENARIOS_2 = {
    "parity_zigzag": lambda: parity(2, "zigzag"),
    "parity_llama3": lambda: parity(2, "llama3"),
    "parity_llama_model_zigzag": lambda: parity(2, "zigzag", "llama"),
    "parity_qwen2_model_llama3": lambda: parity(2, "llama3", "qwen2"),
    "parity_zigzag_gradient_checkpointing": lambda: parity(2, "zigzag", gradient_checkpointing=True),
    "bf16_zigzag": lambda: bf16_vs_solo("zigzag"),
    "bf16_llama3": lambda: bf16_vs_solo("llama3"),
    "local_positions_zigzag": lambda: negative_local_positions("zigzag"),
    "local_positions_llama3": lambda: negative_local_positions("llama3"),
    "different_row": negative_different_row,
    "bad_inputs": bad_inputs,
}
SCENARIOS_4 = {
    "sp4_zigzag": lambda: parity(4, "zigzag"),
    "sp4_llama3": lambda: parity(4, "llama3"),
    "dp2_sp2_zigzag": lambda: parity(2, "zigzag"),
    "dp2_sp2_llama3": lambda: parity(2, "llama3", heads_k_stride=2),
}


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, outdir: str, scenario_set: str) -> None:
    init_rank(rank, world_size, port)
    scenarios = SCENARIOS_2 if scenario_set == "2" else SCENARIOS_4
    results = {}
    try:
        for name, fn in scenarios.items():
            start = time.perf_counter()
            try:
                results[name] = fn()
            except Exception:  # reported per scenario, so one failure does not hide the others
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = round(time.perf_counter() - start, 2)
    finally:
        write_result(outdir, rank, results)
        dist.destroy_process_group()


def launch_scenarios(world_size: int, scenario_set: str, outdir: Path) -> list[dict]:
    return launch(_worker, world_size, outdir, args=(scenario_set,))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return launch_scenarios(2, "2", tmp_path_factory.mktemp("sp2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return launch_scenarios(4, "4", tmp_path_factory.mktemp("sp4"))


def results_for(world: list[dict], name: str) -> list[dict]:
    per_rank = [r[name] for r in world]
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
    return per_rank


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def assert_parity(per_rank: list[dict], dp_size: int) -> None:
    for rank, r in enumerate(per_rank):
        assert r["dp_size"] == dp_size
        assert r["counts_match"], f"rank {rank}: label-token counts differ from the unsplit run"
        assert r["sum_err"] <= FP64_TOL, f"rank {rank}: per-row log-prob sums {r['sums']} vs {r['ref_sums']}"
        assert r["grad_err"] <= FP64_TOL, f"rank {rank}: gradient of {r['worst_param']} rel err {r['grad_err']:.2e}"
        assert r["num_params"] > 10
    # Every rank of an SP group reports the same sums; different dp groups saw different rows.
    sp_size = len(per_rank) // dp_size
    for g in range(dp_size):
        group = per_rank[g * sp_size : (g + 1) * sp_size]
        assert all(r["sums"] == group[0]["sums"] for r in group)
    if dp_size > 1:
        assert per_rank[0]["ref_sums"] != per_rank[-1]["ref_sums"]


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["zigzag", "llama3"])
def test_sp2_fp64_parity(world2, impl):
    assert_parity(results_for(world2, f"parity_{impl}"), dp_size=1)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["parity_llama_model_zigzag", "parity_qwen2_model_llama3", "parity_zigzag_gradient_checkpointing"]
)
def test_sp2_fp64_parity_other_architectures_and_gradient_checkpointing(world2, name):
    assert_parity(results_for(world2, name), dp_size=1)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["zigzag", "llama3"])
def test_sp4_fp64_parity(world4, impl):
    assert_parity(results_for(world4, f"sp4_{impl}"), dp_size=1)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["zigzag", "llama3"])
def test_dp2_sp2_fp64_parity(world4, impl):
    assert_parity(results_for(world4, f"dp2_sp2_{impl}"), dp_size=2)


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["zigzag", "llama3"])
def test_sp2_bf16_error_within_twice_the_non_ring_error(world2, impl):
    for r in results_for(world2, f"bf16_{impl}"):
        assert r["num_tokens"] > 100
        # bf16 attention must actually have been used (errors far above fp32 round-off) ...
        assert r["solo_grad_err"] > 1e-4 and r["solo_token_rms_err"] > 1e-5, r
        # ... and the ring may not add more than the same kernel's own bf16 error.
        assert r["ring_token_rms_err"] <= 2 * r["solo_token_rms_err"], r
        assert r["ring_grad_err"] <= 2 * r["solo_grad_err"], r


@pytest.mark.distributed
@pytest.mark.parametrize("impl", ["zigzag", "llama3"])
def test_local_position_ids_break_parity(world2, impl):
    for r in results_for(world2, f"local_positions_{impl}"):
        assert r["good_err"] <= FP64_TOL
        assert r["bad_err"] > 1e-3, r


@pytest.mark.distributed
def test_rank_fed_a_different_row_is_caught(world2):
    per_rank = results_for(world2, "different_row")
    for r in per_rank:
        assert r["checksum_error"] is not None, "the SP checksum let mismatched rows through"
        assert "global rank(s) [1] differ from rank 0" in r["checksum_error"], r["checksum_error"]
        assert r["unchecked_err"] > 1e-3, "a rank with a different row should break parity"


@pytest.mark.distributed
def test_bad_inputs_give_clear_errors(world2):
    for r in results_for(world2, "bad_inputs"):
        assert "ValueError" in r["world_not_divisible"] and "not divisible" in r["world_not_divisible"]
        assert r["heads_k_stride"] and "ring_heads_k_stride=3" in r["heads_k_stride"], r["heads_k_stride"]
        assert r["sliding_window"] and "sliding-window" in r["sliding_window"], r["sliding_window"]
        assert r["sliding_window_override_warned"] and r["sliding_window_override_finite"]
        assert r["no_state"] and "AttentionState" in r["no_state"], r["no_state"]


# ----------------------------------------------------------------------------------------------------------------
# Single-process checks (no process group needed)
# ----------------------------------------------------------------------------------------------------------------


def test_sp_size_must_divide_world_size():
    from trl_longpo.sequence_parallel import check_sp_size

    assert check_sp_size(8, 4) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by sequence_parallel_size 4"):
        check_sp_size(6, 4)
    with pytest.raises(ValueError, match=">= 1"):
        check_sp_size(4, 0)


def test_zigzag_shard_layout_positions_and_shifted_labels():
    from trl_longpo.sequence_parallel import shard_rows

    ids, labels, mask = make_rows(100)
    sp = 2
    shards = [
        shard_rows(ids, [labels != -100], mask, sp_rank=r, sp_size=sp, impl="zigzag", pad_token_id=PAD)
        for r in range(sp)
    ]
    # Rows of 23 and 17 real tokens are padded to 24 and 20 (multiples of 2*sp), i.e. chunks of 6 and 5 tokens.
    assert shards[0].global_cu_seqlens.tolist() == [0, 24, 44]
    for r, shard in enumerate(shards):
        # rank r holds chunks r and 2*sp-1-r of each segment, with TRUE positions
        expected = []
        for chunk in (6, 5):
            for c in (r, 2 * sp - 1 - r):
                expected += list(range(c * chunk, (c + 1) * chunk))
        assert shard.position_ids.tolist() == expected
        assert shard.plan.cu_seqlens.tolist() == [0, 12, 22]  # local boundaries handed to the zigzag kernel
    # Labels were shifted on the full row: reassembling all shards gives exactly the shifted targets per row.
    for b in range(2):
        real = mask[b].bool()
        row_ids, row_labels = ids[b][real], labels[b][real]
        want = {p: int(t) for p, t in enumerate(row_labels[1:].tolist() + [-100])}
        got = {}
        for shard in shards:
            for p, t, row, tok in zip(
                shard.position_ids.tolist(),
                shard.targets.tolist(),
                shard.row_index.tolist(),
                shard.input_ids.tolist(),
            ):
                if row == b:
                    got[p] = t
                    assert tok == int(row_ids[p])
                elif row == -1:
                    assert t == -100 and tok == PAD  # padding never enters the loss
        assert got == want


def test_shard_rows_refuses_too_long_and_bad_masks():
    from trl_longpo.sequence_parallel import shard_rows

    ids, labels, mask = make_rows(100)
    with pytest.raises(ValueError, match="more than the configured maximum 40"):
        shard_rows(ids, [labels != -100], mask, sp_rank=0, sp_size=2, impl="zigzag", max_length=40)
    holes = mask.clone()
    holes[0, 5] = 0
    with pytest.raises(ValueError, match="contiguous"):
        shard_rows(ids, [labels != -100], holes, sp_rank=0, sp_size=2, impl="zigzag")
    with pytest.raises(ValueError, match="ring_attn_impl must be one of"):
        shard_rows(ids, [labels != -100], mask, sp_rank=0, sp_size=2, impl="stripe")


def test_prepare_model_refuses_sliding_window_and_bad_heads_stride():
    from trl_longpo.attention import RING_ATTENTION_NAME
    from trl_longpo.sequence_parallel import SequenceParallelContext, SequenceParallelMesh

    mesh = SequenceParallelMesh(
        sp_size=2, dp_size=1, rank=0, sp_rank=0, dp_rank=0, sp_group=None, dp_group=None, sp_ranks=(0, 1)
    )
    model = mistral()
    with pytest.raises(ValueError, match="ring_heads_k_stride=3 must be a positive divisor .* \\(2\\)"):
        SequenceParallelContext(mesh, heads_k_stride=3).prepare_model(model, RING_ATTENTION_NAME)
    model.config.sliding_window = 4096  # Mistral's default
    with pytest.raises(ValueError, match="sliding-window attention"):
        SequenceParallelContext(mesh).prepare_model(model, RING_ATTENTION_NAME)
    with pytest.raises(ValueError, match="ring_attn_impl must be one of"):
        SequenceParallelContext(mesh, ring_attn_impl="ring")
    assert model.config._attn_implementation != RING_ATTENTION_NAME  # refused before switching
