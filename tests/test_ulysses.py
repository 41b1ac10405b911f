"""Ulysses all-to-all pieces on 2 gloo ranks, against unsplit tensors and unsplit attention (fp64)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
import torch
from distributed import init_rank, launch, write_result

from trl_longpo.sequence_parallel.planning import ModelShape, check_ulysses_degree, replicated_kv_heads

TOKENS, HEADS, DIM = 12, 4, 8
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # sp_comm: the communication-counting benchmark (also in the rank processes)
COMM_SHAPE = ModelShape("tiny", 128, 1, 1, 4, 2, 32, 1)


def _causal(q, k, v):
    """Unsplit reference / local attention: (T, H, D), GQA by the kernel."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


def _worker(rank: int, world_size: int, port: int, outdir: str) -> None:
    result: dict = {}
    try:
        init_rank(rank, world_size, port)
        import torch.distributed as dist

        from trl_longpo.sequence_parallel.ulysses import heads_to_seq, seq_to_heads, ulysses_attention

        group, n = dist.group.WORLD, TOKENS // world_size
        g = torch.Generator().manual_seed(0)
        full = torch.randn(TOKENS, HEADS, DIM, dtype=torch.float64, generator=g)
        weight = torch.randn(TOKENS, HEADS, DIM, dtype=torch.float64, generator=g)
        mine, heads = slice(rank * n, (rank + 1) * n), slice(rank * HEADS // 2, (rank + 1) * HEADS // 2)

        x = full[mine].clone().requires_grad_()
        y = seq_to_heads(x, group)
        result["seq_to_heads"] = torch.equal(y, full[:, heads])
        result["round_trip"] = torch.equal(heads_to_seq(y, group), x)
        (y * weight[:, heads]).sum().backward()
        result["seq_to_heads_grad"] = torch.equal(x.grad, weight[mine])

        for kv_heads in (2, 1):  # 1: fewer KV heads than ranks -> replicated
            q = torch.randn(TOKENS, HEADS, DIM, dtype=torch.float64, generator=g, requires_grad=True)
            k = torch.randn(TOKENS, kv_heads, DIM, dtype=torch.float64, generator=g, requires_grad=True)
            v = torch.randn(TOKENS, kv_heads, DIM, dtype=torch.float64, generator=g, requires_grad=True)
            out_full = _causal(q, k, v)
            (out_full * weight).sum().backward()
            local = [t[mine].detach().clone().requires_grad_() for t in (q, k, v)]
            out = ulysses_attention(*local, _causal, group)
            (out * weight[mine]).sum().backward()
            errors = [(out - out_full[mine]).abs().max().item()]
            errors += [(t.grad - ref.grad[mine]).abs().max().item() for t, ref in zip(local, (q, k, v))]
            result[f"attention_kv{kv_heads}_max_error"] = max(errors)
            # negative control: without the exchange each rank attends only to its own tokens
            result[f"attention_kv{kv_heads}_local_only_error"] = (
                (_causal(*(t.detach() for t in local)) - out_full[mine]).abs().max().item()
            )
        result.update(_plan_parity(rank, world_size, group))
        import sp_comm

        result["comm"] = sp_comm.count_layouts(sp_comm.make_job(2, 128, COMM_SHAPE))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        result["error"] = traceback.format_exc()
    write_result(outdir, rank, result)


def _plan_parity(rank: int, world_size: int, group) -> dict:
    """UlyssesPlan around the unsplit plans (packed causal rows; a shared-prompt tree) against those plans run on the
    whole packed sequence: outputs and q/k/v gradients of this rank's tokens."""
    from trl_longpo.attention.ring import make_varlen_plan
    from trl_longpo.attention.tree import Tree, plan_for_trees
    from trl_longpo.sequence_parallel.sharding import local_ranges
    from trl_longpo.sequence_parallel.ulysses import UlyssesPlan

    errors = {}
    segments = [12, 16]  # two rows, padded to multiples of 2 x sp
    trees = [Tree(20, (4, 4))]
    cases = {
        "rows": (segments, make_varlen_plan("zigzag", torch.tensor([0, 12, 28], dtype=torch.int32), 0, 1)),
        "tree": ([28], plan_for_trees(trees, backend="cpu")),
    }
    g = torch.Generator().manual_seed(1)
    for name, (lengths, whole) in cases.items():
        q, k, v = (torch.randn(28, h, DIM, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2))
        weight = torch.randn(28, 4, DIM, dtype=torch.float64, generator=g)
        (whole.attend(q, k, v, softmax_scale=0.3, group=None, heads_k_stride=1) * weight).sum().backward()
        mine = torch.cat([torch.arange(a, b) for a, b in local_ranges(lengths, rank, 2, "zigzag", 2)])
        local = [t[mine].detach().clone().requires_grad_() for t in (q, k, v)]
        plan = UlyssesPlan(whole, group, None, len(mine))
        out = plan.attend(*local, softmax_scale=0.3, group=None, heads_k_stride=1)
        (out * weight[mine]).sum().backward()
        ref = whole.attend(q.detach(), k.detach(), v.detach(), softmax_scale=0.3, group=None, heads_k_stride=1)
        errs = [(out - ref[mine]).abs().max().item()]
        errs += [(t.grad - full.grad[mine]).abs().max().item() for t, full in zip(local, (q, k, v))]
        errors[f"plan_{name}_max_error"] = max(errs)
    return errors


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = launch(_worker, 2, tmp_path_factory.mktemp("ulysses"), timeout=120)
    for r in results:
        assert "error" not in r, r["error"]
    return results


@pytest.mark.distributed
def test_all_to_all_moves_tokens_to_heads_and_back(ranks):
    for r in ranks:
        assert r["seq_to_heads"] and r["round_trip"] and r["seq_to_heads_grad"]


@pytest.mark.distributed
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_ulysses_attention_equals_unsplit_attention(ranks, kv_heads):
    for r in ranks:
        assert r[f"attention_kv{kv_heads}_max_error"] < 1e-12
    # rank 1's queries must see rank 0's keys: attention on its own tokens alone is wrong
    assert ranks[1][f"attention_kv{kv_heads}_local_only_error"] > 1e-2


def test_gqa_replication_and_refusal():
    # Qwen2.5-7B: 28 query / 4 KV heads
    assert [replicated_kv_heads(28, 4, u) for u in (1, 2, 4, 7, 14, 28)] == [4, 4, 4, 28, 28, 28]
    assert replicated_kv_heads(32, 8, 16) == 16  # Mistral-7B at Ulysses 16: each KV head twice
    with pytest.raises(ValueError, match="largest valid degree up to it is 7"):
        check_ulysses_degree(28, 4, 8)
    with pytest.raises(ValueError, match="largest valid degree up to it is 4"):
        check_ulysses_degree(28, 4, 6)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["rows", "tree"])
def test_ulysses_plan_runs_the_whole_varlen_or_tree_plan_on_local_heads(ranks, case):
    for r in ranks:
        assert r[f"plan_{case}_max_error"] < 1e-10


@pytest.mark.distributed
def test_counted_bytes_equal_the_planner_formula(ranks):
    """benchmarks/sp_comm.py at sp 2: every layout's counted bytes per rank per layer equal the planner's formula."""
    import sp_comm

    rows = sp_comm.summarise(sp_comm.make_job(2, 128, COMM_SHAPE), [r["comm"] for r in ranks])
    assert {(r["name"], r["shared"]) for r in rows} >= {("ring zigzag", False), ("ulysses", True)}
    for r in rows:
        assert r["measured"] > 0
        assert r["measured"] == pytest.approx(r["formula"], rel=1e-9), r
