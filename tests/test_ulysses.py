"""Ulysses all-to-all pieces on 2 gloo ranks, against unsplit tensors and unsplit attention (fp64)."""

from __future__ import annotations

import traceback

import pytest
import torch
from distributed import init_rank, launch, write_result

from trl_longpo.sequence_parallel.planning import check_ulysses_degree, replicated_kv_heads

TOKENS, HEADS, DIM = 12, 4, 8


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
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        result["error"] = traceback.format_exc()
    write_result(outdir, rank, result)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = launch(_worker, 2, tmp_path_factory.mktemp("ulysses"), timeout=120)
    for r in results:
        assert "error" not in r, r["error"]
    return results


def test_all_to_all_moves_tokens_to_heads_and_back(ranks):
    for r in ranks:
        assert r["seq_to_heads"] and r["round_trip"] and r["seq_to_heads_grad"]


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
