"""flash-attn's four private functions that ring-flash-attn calls, on PyTorch's CPU flash-attention kernels.

Why this exists: ring-flash-attn (the ring / zigzag / llama3 sequence-parallel attention we use) is written against
`flash_attn.flash_attn_interface._flash_attn_{,varlen_}{forward,backward}`, and flash-attn only builds with CUDA.
With this module registered as `flash_attn` (see `trl_longpo.attention.kernels.install_flash_attn`), the *real*
ring code runs on CPU over gloo, which makes the whole sequence-parallel path testable and debuggable without a GPU.

This is a thin adapter: the attention and its gradient are PyTorch's own CPU kernels
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward: fp64/fp32/bf16, GQA natively, out + lse, and a
backward that takes the out/lse it is given). What is written here is only flash-attn's calling convention:
- signatures of flash-attn 2.8.3 (tests check the parameter names); forward returns `(out, softmax_lse, S_dmask,
  rng_state)` with `softmax_lse` float32, (B, H, Sq) dense and (H, total_q) varlen;
- causal masking with Sq != Sk bottom-right aligned (key j visible to query i iff j <= i + Sk - Sq; llama3 varlen
  relies on it), and sliding windows with the same alignment: the kernel's `is_causal` is top-left aligned, so these
  cases pass an explicit mask;
- a query row with no visible key gets `out = 0` and `lse = +inf` (the kernel returns a finite lse there);
- backward from the GIVEN out/lse (ring attention hands every block the globally merged ones), written into the
  caller's dq/dk/dv, which may be strided views of larger buffers; varlen runs one kernel call per segment;
- dropout, softcap, ALiBi, paged KV and returning the softmax matrix are refused with a clear error.
Also provided: the public `flash_attn_varlen_func` (autograd over the functions above), which trl_longpo uses for an
SP group of one (attention without a ring).
"""

from __future__ import annotations

import itertools
import threading
import warnings
from typing import Optional

import torch

__all__ = [
    "SLOW_BACKEND_WARNING",
    "_flash_attn_backward",
    "_flash_attn_forward",
    "_flash_attn_varlen_backward",
    "_flash_attn_varlen_forward",
    "flash_attn_varlen_func",
]

SLOW_BACKEND_WARNING = (
    "attention is running on trl_longpo's CPU flash-attn stand-in (flash_attn is not importable; PyTorch's CPU "
    "attention kernels): exact, but much slower than the CUDA kernels. Use it for debugging and CPU tests only."
)

_warned = False
_warn_lock = threading.Lock()


def _warn_once() -> None:
    global _warned
    if not _warned:
        with _warn_lock:
            if not _warned:
                _warned = True
                warnings.warn(SLOW_BACKEND_WARNING, RuntimeWarning, stacklevel=3)


def _check_unsupported(
    dropout_p: float,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool = False,
    **paged: Optional[torch.Tensor],
) -> None:
    if dropout_p and dropout_p > 0:
        raise NotImplementedError(
            f"the CPU flash-attn stand-in does not implement attention dropout (dropout_p={dropout_p}); "
            "set the model's attention_dropout to 0 for sequence-parallel training"
        )
    if softcap and softcap != 0.0:
        raise NotImplementedError(f"the CPU flash-attn stand-in does not implement logit softcapping ({softcap=})")
    if alibi_slopes is not None:
        raise NotImplementedError("the CPU flash-attn stand-in does not implement ALiBi slopes")
    if return_softmax:
        raise NotImplementedError("the CPU flash-attn stand-in does not return the softmax matrix (return_softmax)")
    for name, value in paged.items():
        if value is not None:
            raise NotImplementedError(f"the CPU flash-attn stand-in does not implement {name}")


def _mask(sq: int, sk: int, causal: bool, window_left: int, window_right: int, like: torch.Tensor):
    """Boolean (Sq, Sk) mask of visible keys, bottom-right aligned (key j visible to query i iff
    i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right); None when every key is visible."""
    if causal:
        window_right = 0
    if window_left < 0 and window_right < 0:
        return None
    diag = torch.arange(sq, device=like.device).unsqueeze(1) + (sk - sq)
    cols = torch.arange(sk, device=like.device).unsqueeze(0)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=like.device)
    if window_right >= 0:
        visible &= cols <= diag + window_right
    if window_left >= 0:
        visible &= cols >= diag - window_left
    return visible


def _kernel_args(sq: int, sk: int, causal: bool, window_left: int, window_right: int, like: torch.Tensor):
    """(is_causal, additive mask or None, rows without a visible key or None) for PyTorch's CPU flash kernel.

    Its `is_causal` is top-left aligned, which equals flash-attn's bottom-right alignment only when Sq == Sk; every
    other masked case (causal Sq != Sk, sliding windows) gets an explicit additive mask (the kernel then cannot skip
    masked blocks, a cost only llama3's local-vs-gathered blocks and windows pay). The kernel gives rows with no
    visible key out 0 and a finite lse; flash-attn's contract is lse = +inf, set by the caller from `empty`.
    """
    if causal and sq == sk and window_left < 0:
        return True, None, None
    visible = _mask(sq, sk, causal, window_left, window_right, like)
    if visible is None:
        return False, None, None
    additive = torch.zeros(sq, sk, dtype=like.dtype, device=like.device).masked_fill_(~visible, float("-inf"))
    empty = ~visible.any(dim=1)
    return False, additive, empty if bool(empty.any()) else None


def _heads_first(x: torch.Tensor) -> torch.Tensor:  # (S, H, D) -> (1, H, S, D), a view
    return x.transpose(0, 1).unsqueeze(0)


def _segment_forward(q, k, v, out, lse, softmax_scale, causal, window_left, window_right) -> None:
    """Attention of one sequence. q (Sq, H, D), k/v (Sk, Hk, D); writes out (Sq, H, Dv) and lse (H, Sq)."""
    sq, sk = q.shape[0], k.shape[0]
    if sq == 0:
        return  # the kernel aborts on empty queries
    if sk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return
    is_causal, mask, empty = _kernel_args(sq, sk, causal, window_left, window_right, q)
    o, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _heads_first(q), _heads_first(k), _heads_first(v), 0.0, is_causal, attn_mask=mask, scale=softmax_scale
    )
    out.copy_(o[0].transpose(0, 1))
    lse.copy_(log_sum_exp[0] if empty is None else log_sum_exp[0].masked_fill(empty, float("inf")))


def _segment_backward(
    dout, q, k, v, out, lse, dq, dk, dv, softmax_delta, softmax_scale, causal, window_left, window_right
) -> None:
    """Gradient of one sequence from the GIVEN out/lse (ring attention passes the merged ones). Writes dq (Sq, H, D),
    dk/dv (Sk, Hk, D) into the caller's (possibly strided) buffers and delta = rowsum(dO * O) (H, Sq)."""
    sq, sk = q.shape[0], k.shape[0]
    if sq == 0 or sk == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        softmax_delta.zero_()
        return
    is_causal, mask, _ = _kernel_args(sq, sk, causal, window_left, window_right, q)
    # lse is float32 (flash-attn's contract); the kernel wants it in the inputs' dtype for fp64. A row with lse = +inf
    # (no visible key) gets zero probabilities, hence zero gradients.
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(_heads_first(x) for x in (dout, q, k, v, out)),
        lse.to(torch.promote_types(q.dtype, torch.float32)).unsqueeze(0),
        0.0,
        is_causal,
        attn_mask=mask,
        scale=softmax_scale,
    )
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad[0].transpose(0, 1))
    delta = (dout.to(torch.float32 if q.dtype != torch.float64 else q.dtype) * out).sum(-1)  # (Sq, H)
    softmax_delta.copy_(delta.transpose(0, 1))


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads % nheads_k != 0 or v.shape[-2] != nheads_k:
        raise ValueError(f"query heads ({nheads}) must be a multiple of key/value heads ({nheads_k}, {v.shape[-2]})")


def _grad_buffer(buffer: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if buffer is None:
        return torch.empty_like(like)
    if buffer.shape != like.shape:
        raise ValueError(f"gradient buffer has shape {tuple(buffer.shape)}, expected {tuple(like.shape)}")
    return buffer


def _segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q has {len(bounds_q)} entries but cu_seqlens_k has {len(bounds_k)}")
    return list(zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k), strict=True))


def _empty_softmax(q: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _rng_state(q: torch.Tensor) -> torch.Tensor:
    return torch.zeros((2,), dtype=torch.int64, device=q.device)


# --- the four flash-attn 2.8.3 entry points (signatures copied exactly; bodies call the segment functions above) ---
# fmt: off


def _flash_attn_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_softmax)
    _check_heads(q, k, v)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        _segment_forward(q[b], k[b], v[b], out[b], lse[b], softmax_scale, causal, window_size_left, window_size_right)
    return out, lse, _empty_softmax(q), _rng_state(q)


def _flash_attn_varlen_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None, return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None, leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None, zero_tensors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _warn_once()
    _check_unsupported(
        dropout_p, softcap, alibi_slopes, return_softmax, block_table=block_table, leftpad_k=leftpad_k,
        seqused_k=seqused_k,
    )
    _check_heads(q, k, v)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k):
        _segment_forward(
            q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1], softmax_scale, causal, window_size_left,
            window_size_right,
        )
    return out, lse, _empty_softmax(q), _rng_state(q)


def _flash_attn_backward_impl(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    _check_heads(q, k, v)
    dq, dk, dv = _grad_buffer(dq, q), _grad_buffer(dk, k), _grad_buffer(dv, v)
    delta = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        _segment_backward(
            dout[b], q[b], k[b], v[b], out[b], softmax_lse[b], dq[b], dk[b], dv[b], delta[b], softmax_scale, causal,
            window_size_left, window_size_right,
        )
    return delta


def _flash_attn_varlen_backward_impl(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None, zero_tensors: bool = False,
) -> torch.Tensor:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    _check_heads(q, k, v)
    dq, dk, dv = _grad_buffer(dq, q), _grad_buffer(dk, k), _grad_buffer(dv, v)
    # Tokens outside every segment get zero gradient (flash-attn leaves them untouched; zero is the safe choice).
    for buffer in (dq, dk, dv):
        buffer.zero_()
    delta = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k):
        _segment_backward(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], softmax_lse[:, q0:q1], dq[q0:q1], dk[k0:k1],
            dv[k0:k1], delta[:, q0:q1], softmax_scale, causal, window_size_left, window_size_right,
        )
    return delta


# fmt: on
def _as_custom_op(name: str, fn, mutates_args: tuple[str, ...]):
    """Wrap like flash-attn 2.8 does (torch.library.custom_op), so ring-flash-attn's default-argument introspection
    takes the same `_init_fn` path it takes with the real kernels, and torch.compile treats the calls as opaque ops."""
    return torch.library.custom_op(f"trl_longpo_flash_attn_cpu::{name}", fn, mutates_args=mutates_args)


_flash_attn_forward = _as_custom_op("_flash_attn_forward", _flash_attn_forward_impl, ())
_flash_attn_varlen_forward = _as_custom_op("_flash_attn_varlen_forward", _flash_attn_varlen_forward_impl, ())
_flash_attn_backward = _as_custom_op("_flash_attn_backward", _flash_attn_backward_impl, ("dq", "dk", "dv"))
_flash_attn_varlen_backward = _as_custom_op(
    "_flash_attn_varlen_backward", _flash_attn_varlen_backward_impl, ("dq", "dk", "dv")
)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window):
        args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal, *window)
        out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, *args)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, *ctx.args, 0.0, None, False)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
    block_table=None,
):  # fmt: skip
    """flash-attn 2.8.3's public varlen attention (same signature), differentiable; see the module notes."""
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs, block_table=block_table)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return _VarlenAttention.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, tuple(window_size)
    )
