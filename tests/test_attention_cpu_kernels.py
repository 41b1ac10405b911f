"""Contract tests of the flash-attn stand-in (flash-attn's signatures over PyTorch's CPU kernels) against the dense
fp64 reference (`conftest.dense_attention`, autograd for gradients, an explicit bottom-right-aligned mask), and the
installer/loader in a fresh process."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import dense_attention

from trl_longpo.attention import flash_attn_cpu as fa

F64 = torch.float64
SCALE = 0.37


def reference_attention(q, k, v, causal, window=(-1, -1), scale=SCALE):
    """The dense reference with flash-attn's bottom-right-aligned causal / window mask, built here independently."""
    sq, sk = q.shape[0], k.shape[0]
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(sk).unsqueeze(0)
    visible = torch.ones(sq, sk, dtype=torch.bool)
    right = 0 if causal else window[1]
    if right >= 0:
        visible &= j <= i + sk - sq + right
    if window[0] >= 0:
        visible &= j >= i + sk - sq - window[0]
    return dense_attention(q, k, v, visible, scale)


def rand(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_inputs(batch, sq, sk, heads, kv_heads, dim=8, dtype=F64):
    return (
        rand(batch, sq, heads, dim, dtype=dtype, seed=1),
        rand(batch, sk, kv_heads, dim, dtype=dtype, seed=2),
        rand(batch, sk, kv_heads, dim, dtype=dtype, seed=3),
    )


def test_signatures_match_flash_attn_2_8():
    """Parameter names and order of flash-attn 2.8.3's private functions (ring-flash-attn passes them by name)."""
    common_tail = [
        "dropout_p",
        "softmax_scale",
        "causal",
        "window_size_left",
        "window_size_right",
        "softcap",
        "alibi_slopes",
    ]
    expected = {
        "_flash_attn_forward": ["q", "k", "v", *common_tail, "return_softmax"],
        "_flash_attn_varlen_forward": [
            "q",
            "k",
            "v",
            "cu_seqlens_q",
            "cu_seqlens_k",
            "max_seqlen_q",
            "max_seqlen_k",
            *common_tail,
            "return_softmax",
            "block_table",
            "leftpad_k",
            "seqused_k",
            "zero_tensors",
        ],
        "_flash_attn_backward": [
            "dout",
            "q",
            "k",
            "v",
            "out",
            "softmax_lse",
            "dq",
            "dk",
            "dv",
            *common_tail,
            "deterministic",
            "rng_state",
        ],
        "_flash_attn_varlen_backward": [
            "dout",
            "q",
            "k",
            "v",
            "out",
            "softmax_lse",
            "dq",
            "dk",
            "dv",
            "cu_seqlens_q",
            "cu_seqlens_k",
            "max_seqlen_q",
            "max_seqlen_k",
            *common_tail,
            "deterministic",
            "rng_state",
            "zero_tensors",
        ],
    }
    for name, params in expected.items():
        op = getattr(fa, name)
        assert list(inspect.signature(op._init_fn).parameters) == params, name  # custom_op, like flash-attn 2.8
    assert [len(p) for p in expected.values()] == [11, 19, 18, 23]


@pytest.mark.parametrize(
    "sq,sk,causal,window",
    [
        (7, 7, True, (-1, -1)),
        (5, 9, True, (-1, -1)),
        (9, 4, True, (-1, -1)),
        (6, 8, False, (-1, -1)),
        (8, 8, True, (3, -1)),
        (6, 9, False, (2, 1)),
    ],
)
def test_dense_forward_matches_reference(sq, sk, causal, window):
    q, k, v = dense_inputs(2, sq, sk, heads=4, kv_heads=2)  # GQA: 2 query heads per kv head
    out, lse, s_dmask, rng_state = fa._flash_attn_forward(q, k, v, 0.0, SCALE, causal, *window, 0.0, None, False)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, sq)
    assert out.shape == q.shape and out.dtype == q.dtype and s_dmask.numel() == 0 and rng_state.shape == (2,)
    for b in range(2):
        ref_out, ref_lse = reference_attention(q[b], k[b], v[b], causal, window)
        torch.testing.assert_close(out[b], ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[b], ref_lse.float(), rtol=1e-6, atol=1e-6)


def test_rows_without_visible_keys_give_zero_out_and_infinite_lse():
    q, k, v = dense_inputs(1, 6, 2, heads=2, kv_heads=2)  # causal, Sq > Sk: the first 4 rows see no key
    out, lse, _, _ = fa._flash_attn_forward(q, k, v, 0.0, SCALE, True, -1, -1, 0.0, None, False)
    assert torch.all(out[0, :4] == 0)
    assert torch.all(torch.isposinf(lse[0, :, :4]))
    assert torch.isfinite(lse[0, :, 4:]).all() and out[0, 4:].abs().sum() > 0


def varlen_inputs(lengths_q, lengths_k, heads=4, kv_heads=2, dim=8):
    q = rand(sum(lengths_q), heads, dim, seed=4)
    k = rand(sum(lengths_k), kv_heads, dim, seed=5)
    v = rand(sum(lengths_k), kv_heads, dim, seed=6)
    cu_q = torch.tensor([0, *lengths_q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths_k]).cumsum(0).to(torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_forward_matches_reference_per_segment(causal):
    lengths_q, lengths_k = [5, 3, 7], [5, 6, 4]  # Sq == Sk, Sq < Sk, Sq > Sk segments
    q, k, v, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k)
    out, lse, _, _ = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 7, 6, 0.0, SCALE, causal)
    assert lse.shape == (4, sum(lengths_q)) and lse.dtype == torch.float32
    for i in range(3):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        ref_out, ref_lse = reference_attention(q[qs], k[ks], v[ks], causal)
        torch.testing.assert_close(out[qs], ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[:, qs], ref_lse.float(), rtol=1e-6, atol=1e-6)


def reference_grads(q, k, v, dout, causal):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, _ = reference_attention(q, k, v, causal)
    out.backward(dout)
    return q.grad, k.grad, v.grad


# The backward recomputes probabilities from the float32 lse it is given (flash-attn's contract), so fp64 gradients
# agree with autograd to ~1e-7 relative, not 1e-12.
GRAD_TOL = {"rtol": 1e-6, "atol": 1e-6}


def test_dense_backward_writes_into_strided_buffers():
    q, k, v = dense_inputs(2, 5, 8, heads=4, kv_heads=2)
    out, lse, _, _ = fa._flash_attn_forward(q, k, v, 0.0, SCALE, True, -1, -1, 0.0, None, False)
    dout = rand(*out.shape, seed=7)
    dq_storage = torch.full((2, 5, 4, 16), 7.0, dtype=F64)
    dq = dq_storage[..., ::2]  # strided view, like ring-flash-attn's buffer slices
    dk_storage = torch.full((2, 10, 2, 8), 7.0, dtype=F64)
    dk = dk_storage[:, 1:9]
    dv = torch.empty_like(v)
    delta = fa._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, SCALE, True, -1, -1, 0.0, None, False)
    assert delta.shape == (2, 4, 5)
    for b in range(2):
        ref = reference_grads(q[b], k[b], v[b], dout[b], causal=True)
        for got, want in zip((dq[b], dk[b], dv[b]), ref):
            torch.testing.assert_close(got, want, **GRAD_TOL)
    assert torch.all(dq_storage[..., 1::2] == 7.0), "wrote outside the dq view"
    assert torch.all(dk_storage[:, 0] == 7.0) and torch.all(dk_storage[:, 9] == 7.0), "wrote outside the dk view"


def test_varlen_backward_matches_reference_with_gqa_and_bottom_right_alignment():
    lengths_q, lengths_k = [4, 6], [7, 6]
    q, k, v, cu_q, cu_k = varlen_inputs(lengths_q, lengths_k)
    out, lse, _, _ = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 6, 7, 0.0, SCALE, True)
    dout = rand(*out.shape, seed=8)
    dq_buffer = torch.zeros(2 * q.shape[0], *q.shape[1:], dtype=F64)
    dq = dq_buffer[: q.shape[0]]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    fa._flash_attn_varlen_backward(
        dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 6, 7, 0.0, SCALE, True, -1, -1, 0.0, None, False
    )
    for i in range(2):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        ref = reference_grads(q[qs], k[ks], v[ks], dout[qs], causal=True)
        for got, want in zip((dq[qs], dk[ks], dv[ks]), ref):
            torch.testing.assert_close(got, want, **GRAD_TOL)
    assert torch.all(dq_buffer[q.shape[0] :] == 0)


def test_backward_uses_the_given_out_and_lse():
    """Ring attention's contract: split the keys in two blocks, merge the blocks' out/lse, run each block's backward
    with the MERGED out/lse, and the summed gradients equal the full attention's gradients."""
    q, k, v = dense_inputs(1, 6, 10, heads=4, kv_heads=2)
    halves = (slice(0, 5), slice(5, 10))
    outs, lses = [], []
    for h in halves:
        # Non-causal blocks against key halves; the full problem is non-causal too.
        block_out, block_lse, _, _ = fa._flash_attn_forward(
            q, k[:, h], v[:, h], 0.0, SCALE, False, -1, -1, 0.0, None, False
        )
        outs.append(block_out)
        lses.append(block_lse)
    lse = torch.logaddexp(lses[0], lses[1])
    weights = [torch.exp(block_lse - lse).transpose(1, 2).unsqueeze(-1) for block_lse in lses]  # (B, Sq, H, 1)
    out = (weights[0] * outs[0] + weights[1] * outs[1]).to(F64)
    dout = rand(*out.shape, seed=9)
    dq_total = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for h in halves:
        dq_block = torch.empty_like(q)
        fa._flash_attn_backward(
            dout,
            q,
            k[:, h],
            v[:, h],
            out,
            lse,
            dq_block,
            dk[:, h],
            dv[:, h],
            0.0,
            SCALE,
            False,
            -1,
            -1,
            0.0,
            None,
            False,
        )
        dq_total += dq_block
    ref = reference_grads(q[0], k[0], v[0], dout[0], causal=False)
    for got, want in zip((dq_total[0], dk[0], dv[0]), ref):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    # Negative control: the blocks' OWN lse (not the merged one) gives wrong gradients.
    dq_wrong = torch.empty_like(q)
    fa._flash_attn_backward(
        dout,
        q,
        k[:, :5],
        v[:, :5],
        out,
        lses[0],
        dq_wrong,
        torch.empty_like(k[:, :5]),
        torch.empty_like(v[:, :5]),
        0.0,
        SCALE,
        False,
        -1,
        -1,
        0.0,
        None,
        False,
    )
    dq_right = torch.empty_like(q)
    fa._flash_attn_backward(
        dout,
        q,
        k[:, :5],
        v[:, :5],
        out,
        lse,
        dq_right,
        torch.empty_like(k[:, :5]),
        torch.empty_like(v[:, :5]),
        0.0,
        SCALE,
        False,
        -1,
        -1,
        0.0,
        None,
        False,
    )
    assert (dq_wrong - dq_right).abs().max() > 1e-3


def test_bf16_inputs_accumulate_in_fp32():
    q, k, v = dense_inputs(1, 16, 16, heads=4, kv_heads=2, dtype=torch.bfloat16)
    out, lse, _, _ = fa._flash_attn_forward(q, k, v, 0.0, SCALE, True, -1, -1, 0.0, None, False)
    ref_out, _ = reference_attention(q[0].double(), k[0].double(), v[0].double(), True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out[0].double(), ref_out, rtol=2e-2, atol=2e-2)


def test_unsupported_features_are_refused():
    q, k, v = dense_inputs(1, 4, 4, heads=2, kv_heads=2)
    with pytest.raises(NotImplementedError, match="dropout"):
        fa._flash_attn_forward(q, k, v, 0.1, SCALE, True, -1, -1, 0.0, None, False)
    with pytest.raises(NotImplementedError, match="softcap"):
        fa._flash_attn_forward(q, k, v, 0.0, SCALE, True, -1, -1, 5.0, None, False)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fa._flash_attn_forward(rand(1, 4, 3, 8), k, v, 0.0, SCALE, True, -1, -1, 0.0, None, False)


INSTALLER_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    from trl_longpo.attention import load_ring_flash_attn, flash_attn_backend
    assert "flash_attn" not in sys.modules
    kernels = load_ring_flash_attn()
    assert kernels.backend == "cpu_stand_in" == flash_attn_backend(), kernels.backend
    import flash_attn, flash_attn.flash_attn_interface as fi
    assert flash_attn.__spec__ is not None and fi.__spec__ is not None
    from trl_longpo.attention import flash_attn_cpu
    assert fi._flash_attn_varlen_forward is flash_attn_cpu._flash_attn_varlen_forward
    import transformers  # must not fail on the stand-in's spec
    from transformers.utils import is_flash_attn_2_available
    assert not is_flash_attn_2_available()
    import ring_flash_attn  # the adapter-free parent package
    assert ring_flash_attn.zigzag_ring_flash_attn_varlen_func is kernels.zigzag_varlen
    assert not hasattr(ring_flash_attn, "substitute_hf_flash_attn")
    assert "ring_flash_attn.adapters" not in sys.modules
    from ring_flash_attn.utils import get_default_args
    assert "zero_tensors" in get_default_args(fi._flash_attn_varlen_forward)  # custom_op -> _init_fn path
    assert load_ring_flash_attn() is kernels  # idempotent
    import torch
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fi._flash_attn_varlen_forward(q, q, q, cu, cu, 4, 4, 0.0, 0.3, True)
    slow = [w for w in caught if "stand-in" in str(w.message)]
    assert len(slow) == 1, [str(w.message) for w in caught]
    print("OK")
    """
)


def test_installer_and_loader_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", INSTALLER_SCRIPT], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_public_varlen_func_is_differentiable():
    """`flash_attn_varlen_func` (used for an SP group of one) against autograd through the reference."""
    lengths = [5, 7]
    q, k, v, cu, _ = varlen_inputs(lengths, lengths)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, softmax_scale=SCALE, causal=True)
    dout = rand(*out.shape, seed=11)
    out.backward(dout)
    for i in range(2):
        s = slice(cu[i], cu[i + 1])
        ref_out, _ = reference_attention(q[s].detach(), k[s].detach(), v[s].detach(), True)
        torch.testing.assert_close(out[s].detach(), ref_out, rtol=1e-12, atol=1e-12)
        ref = reference_grads(q[s].detach(), k[s].detach(), v[s].detach(), dout[s], causal=True)
        for got, want in zip((q.grad[s], k.grad[s], v.grad[s]), ref):
            torch.testing.assert_close(got, want, **GRAD_TOL)
    with pytest.raises(NotImplementedError, match="dropout"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, dropout_p=0.1)
