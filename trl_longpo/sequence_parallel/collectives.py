"""Autograd-aware sum over an SP group, and why its backward is what it is.

Each SP rank computes partial per-row sums (log-probs, NLL) over its own tokens; `sp_all_reduce_sum` adds them so every
rank holds the full-row values and computes the same loss L_i for its dp group i.

Gradient scale. Model gradients are then synchronised by DDP / FSDP / ZeRO over the WHOLE world (all dp x sp ranks
hold a replica or shard of the same model) with an average, i.e. a factor 1 / (dp * sp). The target is the unsplit
data-parallel gradient (1 / dp) * sum_i dL_i/dtheta.
  - If the backward passed the incoming gradient through unchanged (identity), rank r of group i would get
    dL_i/dpartial_r, the sp ranks' parameter gradients would add up to exactly dL_i/dtheta (ring attention's backward
    returns every key/value gradient to the rank that owns it), and the world average would be
    (1 / (dp * sp)) * sum_i dL_i/dtheta: too small by a factor sp.
  - So the backward all-reduces (sums) the incoming gradient over the SP group. Each of the sp ranks computed the same
    L_i, so the gradient arriving at each partial sum is sp * dL_i/dtotal; in other words each rank's own copy of L_i
    is counted as an objective, the world objective is sum over ranks of L_rank = sp * sum_i L_i, and the
    1 / (dp * sp) average gives back (1 / dp) * sum_i dL_i/dtheta. Summing (rather than multiplying by sp) also stays
    right if the ranks' losses differ (e.g. a term only one rank adds).
  tests/test_sequence_parallel.py checks the averaged gradient against the unsplit one for sp = 2, 4 and dp 2 x sp 2.
If a setup averages gradients over the dp group only (SP ranks excluded from the gradient reduction), divide the loss
by sp instead.

Written by hand: torch.distributed.nn.functional.all_reduce has these semantics but is deprecated (FutureWarning) in
the torch versions we support, and its suggested replacement (`_functional_collectives`) is private and only gained an
autograd formula in recent releases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SPAllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sp_all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum `tensor` over the SP group. Differentiable: the backward sums gradients over the group (see module doc).

    Tensors that do not require grad (token counts) take a plain all-reduce.
    """
    if not tensor.requires_grad:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total
    return _SPAllReduceSum.apply(tensor, group)
