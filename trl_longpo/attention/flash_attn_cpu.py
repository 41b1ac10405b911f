"""A pure-PyTorch stand-in for the four private flash-attn 2.8 functions that ring-flash-attn calls.

Why this exists: ring-flash-attn (the ring / zigzag / llama3 sequence-parallel attention we use) is written against
`flash_attn.flash_attn_interface._flash_attn_{,varlen_}{forward,backward}`, and flash-attn only builds with CUDA.
With this module registered as `flash_attn` (see `trl_longpo.attention.kernels.install_flash_attn`), the *real*
ring code runs on CPU over gloo, which makes the whole sequence-parallel path testable and debuggable without a GPU.
It is a supported debugging backend, not a fast one: it materialises score blocks densely (bounded by query
chunking) and warns once on first use.

Contract reproduced from flash-attn 2.8.3 (exact signatures; tests check the parameter names):
- forward returns `(out, softmax_lse, S_dmask, rng_state)`; `softmax_lse` is float32, shaped (B, H, Sq) for the dense
  functions and (H, total_q) for varlen ones. A query row with no visible key gets `out = 0` and `lse = +inf`.
- causal masking with Sq != Sk is bottom-right aligned: key j is visible to query i iff j <= i + Sk - Sq (llama3
  varlen relies on this). Sliding windows use the same alignment.
- backward recomputes the softmax from the `out` and `softmax_lse` it is GIVEN (ring attention hands every block the
  globally merged out/lse, so recomputing from local scores would be wrong), and writes into the caller's dq/dk/dv,
  which may be strided views of larger buffers.
- GQA natively: k/v may have fewer heads than q (H % Hk == 0); no repeat_kv copy.
- dropout, softcap, ALiBi, paged KV and returning the softmax matrix are refused with a clear error.
Also provided: the public `flash_attn_varlen_func` (autograd over the functions above), which trl_longpo uses for an
SP group of one (attention without a ring).

The math is the textbook attention forward and its gradient (dS = P * (dP - rowsum(dO * O))); nothing here is copied
from flash-attn, which has no CPU code to reuse.
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
    "attention is running on trl_longpo's pure-PyTorch flash-attn stand-in (flash_attn is not importable): exact, "
    "but much slower than the CUDA kernels. Use it for debugging and CPU tests only."
)

# Query rows are processed in chunks so that one chunk's score block holds at most this many elements. This bounds
# the stand-in's memory at O(chunk * Sk * H) instead of O(Sq * Sk * H).
_MAX_SCORE_ELEMENTS = 1 << 24

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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like flash-attn, accumulate in fp32; fp64 inputs (tight-tolerance tests) stay fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _visible(
    rows: torch.Tensor,
    sq: int,
    sk: int,
    causal: bool,
    window_left: int,
    window_right: int,
) -> Optional[torch.Tensor]:
    """Boolean (len(rows), sk) mask of visible keys, bottom-right aligned; None when every key is visible."""
    if causal:
        window_right = 0
    if window_left < 0 and window_right < 0:
        return None
    diag = rows.unsqueeze(1) + (sk - sq)  # the key index aligned with each query row
    cols = torch.arange(sk, device=rows.device).unsqueeze(0)
    mask = torch.ones(rows.numel(), sk, dtype=torch.bool, device=rows.device)
    if window_right >= 0:
        mask &= cols <= diag + window_right
    if window_left >= 0:
        mask &= cols >= diag - window_left
    return mask


def _chunk_size(sq: int, sk: int, nheads: int) -> int:
    return max(1, min(sq, _MAX_SCORE_ELEMENTS // max(1, sk * nheads)))


def _segment_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
) -> None:
    """Attention of one sequence. q (Sq, H, D), k/v (Sk, Hk, D); writes out (Sq, H, Dv) and lse (H, Sq)."""
    sq, nheads, _ = q.shape
    sk, nheads_k, _ = k.shape
    if sq == 0:
        return
    if sk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return
    groups = nheads // nheads_k
    cdt = _compute_dtype(q.dtype)
    # (Hk, G, S, D) views for queries, (Hk, 1, S, D) for keys/values: GQA by broadcasting, not by copying.
    kh = k.to(cdt).permute(1, 0, 2).unsqueeze(1)
    vh = v.to(cdt).permute(1, 0, 2).unsqueeze(1)
    step = _chunk_size(sq, sk, nheads)
    for start in range(0, sq, step):
        stop = min(sq, start + step)
        qh = q[start:stop].to(cdt).reshape(stop - start, nheads_k, groups, -1).permute(1, 2, 0, 3)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale  # (Hk, G, b, Sk)
        mask = _visible(torch.arange(start, stop, device=q.device), sq, sk, causal, window_left, window_right)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
        empty = torch.isneginf(block_lse)
        probs = torch.exp(scores - block_lse.masked_fill(empty, 0.0).unsqueeze(-1))  # exp(-inf) = 0 for empty rows
        block_out = torch.matmul(probs, vh)  # (Hk, G, b, Dv)
        out[start:stop] = block_out.permute(2, 0, 1, 3).reshape(stop - start, nheads, -1).to(out.dtype)
        lse[:, start:stop] = block_lse.masked_fill(empty, float("inf")).reshape(nheads, stop - start).to(lse.dtype)


def _segment_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    softmax_delta: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
) -> None:
    """Gradient of one sequence from the given out/lse. Writes dq (Sq, H, D), dk/dv (Sk, Hk, D), delta (H, Sq)."""
    sq, nheads, head_dim = q.shape
    sk, nheads_k, _ = k.shape
    if sq == 0 or sk == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        softmax_delta.zero_()
        return
    groups = nheads // nheads_k
    cdt = _compute_dtype(q.dtype)
    kh = k.to(cdt).permute(1, 0, 2).unsqueeze(1)  # (Hk, 1, Sk, D)
    vh = v.to(cdt).permute(1, 0, 2).unsqueeze(1)
    dk_acc = torch.zeros(nheads_k, sk, head_dim, dtype=cdt, device=q.device)
    dv_acc = torch.zeros(nheads_k, sk, v.shape[-1], dtype=cdt, device=q.device)

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (b, H, D) -> (Hk, G, b, D)
        return x.to(cdt).reshape(x.shape[0], nheads_k, groups, -1).permute(1, 2, 0, 3)

    step = _chunk_size(sq, sk, nheads)
    for start in range(0, sq, step):
        stop = min(sq, start + step)
        qh, doh, oh = heads_first(q[start:stop]), heads_first(dout[start:stop]), heads_first(out[start:stop])
        row_lse = lse[:, start:stop].to(cdt).reshape(nheads_k, groups, stop - start, 1)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
        mask = _visible(torch.arange(start, stop, device=q.device), sq, sk, causal, window_left, window_right)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.exp(scores - row_lse)  # the GIVEN lse; +inf (no visible key) gives 0
        delta = (doh * oh).sum(-1, keepdim=True)  # rowsum(dO * O) with the GIVEN out
        dscores = probs * (torch.matmul(doh, vh.transpose(-1, -2)) - delta)
        dq[start:stop] = (
            (torch.matmul(dscores, kh) * softmax_scale).permute(2, 0, 1, 3).reshape(stop - start, nheads, -1)
        ).to(dq.dtype)
        dk_acc += (torch.matmul(dscores.transpose(-1, -2), qh) * softmax_scale).sum(1)
        dv_acc += torch.matmul(probs.transpose(-1, -2), doh).sum(1)
        softmax_delta[:, start:stop] = delta.reshape(nheads, stop - start).to(softmax_delta.dtype)
    dk.copy_(dk_acc.permute(1, 0, 2))
    dv.copy_(dv_acc.permute(1, 0, 2))


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


# --- the four flash-attn 2.8.3 entry points (signatures copied exactly; bodies are ours) ---


def _flash_attn_forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    return_softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_softmax)
    _check_heads(q, k, v)
    batch, sq, nheads, _ = q.shape
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, nheads, sq, dtype=torch.float32, device=q.device)
    for b in range(batch):
        _segment_forward(q[b], k[b], v[b], out[b], lse[b], softmax_scale, causal, window_size_left, window_size_right)
    return out, lse, _empty_softmax(q), _rng_state(q)


def _flash_attn_varlen_forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int = -1,
    window_size_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax: bool = False,
    block_table: Optional[torch.Tensor] = None,
    leftpad_k: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _warn_once()
    _check_unsupported(
        dropout_p,
        softcap,
        alibi_slopes,
        return_softmax,
        block_table=block_table,
        leftpad_k=leftpad_k,
        seqused_k=seqused_k,
    )
    _check_heads(q, k, v)
    total_q, nheads, _ = q.shape
    out = torch.zeros(total_q, nheads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((nheads, total_q), float("inf"), dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k):
        _segment_forward(
            q[q0:q1],
            k[k0:k1],
            v[k0:k1],
            out[q0:q1],
            lse[:, q0:q1],
            softmax_scale,
            causal,
            window_size_left,
            window_size_right,
        )
    return out, lse, _empty_softmax(q), _rng_state(q)


def _flash_attn_backward_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    _check_heads(q, k, v)
    dq, dk, dv = _grad_buffer(dq, q), _grad_buffer(dk, k), _grad_buffer(dv, v)
    batch, sq, nheads, _ = q.shape
    delta = torch.empty(batch, nheads, sq, dtype=torch.float32, device=q.device)
    for b in range(batch):
        _segment_backward(
            dout[b],
            q[b],
            k[b],
            v[b],
            out[b],
            softmax_lse[b],
            dq[b],
            dk[b],
            dv[b],
            delta[b],
            softmax_scale,
            causal,
            window_size_left,
            window_size_right,
        )
    return delta


def _flash_attn_varlen_backward_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: Optional[torch.Tensor],
    dk: Optional[torch.Tensor],
    dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
    zero_tensors: bool = False,
) -> torch.Tensor:
    _warn_once()
    _check_unsupported(dropout_p, softcap, alibi_slopes)
    _check_heads(q, k, v)
    dq, dk, dv = _grad_buffer(dq, q), _grad_buffer(dk, k), _grad_buffer(dv, v)
    # Tokens outside every segment get zero gradient (flash-attn leaves them untouched; zero is the safe choice).
    dq.zero_()
    dk.zero_()
    dv.zero_()
    nheads = q.shape[1]
    delta = torch.zeros(nheads, q.shape[0], dtype=torch.float32, device=q.device)
    for (q0, q1), (k0, k1) in _segments(cu_seqlens_q, cu_seqlens_k):
        _segment_backward(
            dout[q0:q1],
            q[q0:q1],
            k[k0:k1],
            v[k0:k1],
            out[q0:q1],
            softmax_lse[:, q0:q1],
            dq[q0:q1],
            dk[k0:k1],
            dv[k0:k1],
            delta[:, q0:q1],
            softmax_scale,
            causal,
            window_size_left,
            window_size_right,
        )
    return delta


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
        out, lse, _, _ = _flash_attn_varlen_forward(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            0.0,
            softmax_scale,
            causal,
            window[0],
            window[1],
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window = ctx.args
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            0.0,
            softmax_scale,
            causal,
            window[0],
            window[1],
            0.0,
            None,
            False,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn 2.8.3's public varlen attention (same signature), differentiable; see the module notes."""
    _check_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs, block_table=block_table)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return _VarlenAttention.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, tuple(window_size)
    )
