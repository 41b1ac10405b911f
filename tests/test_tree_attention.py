"""Tree-attention kernels against an independent dense-mask reference: forward, gradients, GQA, uneven trees."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_attention

from trl_longpo.attention.tree import Tree, block_attention, tree_blocks, tree_mask

TREES = (
    Tree(11, (5, 3)),  # a pair: trunk, chosen, rejected of different lengths
    Tree(0, (4, 2)),  # a one-token prompt: empty trunk
    Tree(7, (1, 6, 2)),  # three branches, one of a single token
    Tree(5),  # a plain causal segment (SP padding)
)


def _inputs(total, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)]


def test_mask_is_the_tree():
    mask = tree_mask([Tree(3, (2, 2))])
    # trunk causal; chosen sees trunk + itself; rejected sees trunk + itself, never chosen
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("backend", ["cpu", "flash_stand_in"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_fp64_forward_and_grads_match_dense(backend, heads, kv_heads):
    total = sum(t.length for t in TREES)
    dtype = torch.float64 if backend == "cpu" else torch.float32  # the stand-in keeps flash-attn's fp32 lse
    q, k, v = _inputs(total, heads, kv_heads, 8, dtype)
    out = block_attention(q, k, v, tree_blocks(TREES), scale=0.3, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_attention(qr, kr, vr, tree_mask(TREES), 0.3)[0]
    want = torch.autograd.grad(ref, (qr, kr, vr), grad.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_bf16_error_is_that_of_a_bf16_kernel():
    """bf16 tree attention is as accurate as bf16 SDPA on the same masked problem (both against fp64)."""
    total = sum(t.length for t in TREES)
    q, k, v = _inputs(total, 4, 2, 16, torch.bfloat16, seed=1)
    mask = tree_mask(TREES)
    ref = dense_attention(q.double(), k.double(), v.double(), mask, 0.25)[0]
    tree = block_attention(q, k, v, tree_blocks(TREES), scale=0.25, backend="cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask, scale=0.25,
    ).transpose(0, 1)  # fmt: skip
    tree_err = (tree.double() - ref).abs().max()
    sdpa_err = (sdpa.double() - ref).abs().max()
    assert tree_err <= 2 * sdpa_err, (tree_err, sdpa_err)


def test_negative_control_rejected_seeing_chosen_differs():
    """The reference is sensitive to the tree: a causal mask over the same packed tokens gives other outputs."""
    trees = [Tree(6, (4, 4))]
    q, k, v = _inputs(14, 2, 2, 8, torch.float64)
    out = block_attention(q, k, v, tree_blocks(trees), backend="cpu")
    causal = dense_attention(q, k, v, torch.ones(14, 14, dtype=torch.bool).tril(), 8**-0.5)[0]
    assert (out[10:] - causal[10:]).abs().max() > 1e-3  # rejected rows would see the chosen branch
    torch.testing.assert_close(out[:10], causal[:10])  # trunk and chosen are plainly causal


@pytest.mark.parametrize("impl", ["llama3", "zigzag"])
@pytest.mark.parametrize("sp_size", [2, 4])
def test_sequence_parallel_blocks_reassemble_the_unsplit_attention(impl, sp_size):
    """Every rank's local blocks over the rank-major gathered K/V give exactly its rows of the unsplit attention
    (forward and gradients summed over ranks); padding as `shard_trees` adds it."""
    from trl_longpo.sequence_parallel.sharding import local_ranges
    from trl_longpo.sequence_parallel.tree import local_tree_blocks

    unit = 2 * sp_size
    trees, segments = [], []
    for tree in TREES[:3]:
        pad = -tree.length % unit if impl == "zigzag" else 0
        trees += [tree, Tree(pad)] if pad else [tree]
        segments.append(tree.length + pad)
    tail = -sum(segments) % unit
    if tail:
        trees.append(Tree(tail))
        segments.append(tail)
    total = sum(segments)
    q, k, v = _inputs(total, 4, 2, 8, torch.float64, seed=3)
    grad = torch.randn(total, 4, 8, dtype=torch.float64)
    full = block_attention(q, k, v, tree_blocks(trees), backend="cpu")
    want = torch.autograd.grad(full, (q, k, v), grad)
    order = torch.cat([torch.arange(a, b) for r in range(sp_size) for a, b in local_ranges(segments, r, sp_size, impl)])
    got = [torch.zeros_like(x) for x in (q, k, v)]
    for rank in range(sp_size):
        local = torch.cat([torch.arange(a, b) for a, b in local_ranges(segments, rank, sp_size, impl)])
        blocks, n = local_tree_blocks(trees, segments, rank, sp_size, impl)
        assert n == len(local) == total // sp_size
        out = block_attention(q[local], k[order], v[order], blocks, backend="cpu")
        torch.testing.assert_close(out, full[local].detach(), rtol=1e-12, atol=1e-12)
        for acc, g in zip(got, torch.autograd.grad(out, (q, k, v), grad[local])):
            acc += g
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
