"""Per-row sums of per-token values over label sets: the one home for scoring rows, for every layout.

A trainer needs, per row, sums of per-token log-probs (and detached metrics such as entropy or top-1) over several
token masks from ONE forward (LongPO: the answer tokens for the preference term, the chosen sequence for the NLL).
`RowScorer` computes them for the layout chosen once at set-up:

    layout                      forward                                                  attention
    padded rows                 (B, L) batch, attention mask                             the model's own
    shared-prompt trees         each pair packed as one tree (`packing`), prompt once    tree (block kernels)
    SP shards of padded rows    rows packed and split over the SP group (`sharding`)     ring (ring-flash-attn)
    SP shards of trees          trees split over the SP group (`sequence_parallel.tree`) tree, K/V all-gathered

Every layout gives the same sums (tests prove parity with the padded layout); all run through TRL's fused LM head
(`fused_lm_head=True`, installed by DPOTrainer), so no (tokens x vocab) logits are materialised. Training, the
reference pass, the precompute pass, the SP parity tests and the benchmarks all call `RowScorer.row_sums`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trl_longpo.attention.interface import AttentionState
from trl_longpo.attention.patching import (
    RING_ATTENTION_NAME,
    TREE_ATTENTION_NAME,
    activation_checkpointing,
    attention_implementation,
)
from trl_longpo.attention.tree import plan_for_trees
from trl_longpo.modeling import base_model, row_sum_dtype
from trl_longpo.packing import IGNORE_INDEX, pack_shared_prompts, pair_groups


@dataclass(frozen=True)
class RowSums:
    """`sums` (fields, masks, rows), differentiable through "log_probs" (and identical on every rank of an SP group);
    `counts` (masks, rows) the scored-token counts; `aux_loss` the MoE router loss when it was asked for."""

    sums: torch.Tensor
    counts: torch.Tensor
    aux_loss: torch.Tensor | None = None


class RowScorer:
    """Per-row sums for one layout: `share_prompt` (pairs packed as trees) and `sp` (a `SequenceParallelContext`, or
    None for an unsplit run). `attention_name` is the attention implementation the layout's forwards need (None: the
    model's own)."""

    def __init__(self, *, share_prompt: bool, sp=None, pad_token_id: int = 0):
        self.share_prompt, self.sp, self.pad_token_id = share_prompt, sp, pad_token_id
        if share_prompt:
            self.attention_name = TREE_ATTENTION_NAME
        else:
            self.attention_name = RING_ATTENTION_NAME if sp is not None else None

    def step_attention(self, *models: torch.nn.Module | None):
        """Around a whole training / prediction step (forward AND backward: gradient checkpointing recomputes layers
        during backward). Split runs switched their models for the run, and padded rows need nothing."""
        if self.attention_name is None or self.sp is not None:
            return contextlib.nullcontext()
        return attention_implementation(*models, name=self.attention_name)

    def row_sums(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        masks: Sequence[torch.Tensor],
        fields: Sequence[str] = ("log_probs",),
        prompt_lengths: Sequence[int] | None = None,
        **model_kwargs,
    ) -> RowSums:
        """Sums over `masks` (each (R, L), Hugging Face convention: mask[r, t] scores token t; `masks[0]` decides which
        tokens are scored and covers the others) of the per-token `fields` of the fused LM head.

        Rows are in DPO's layout (R/2 chosen rows, then R/2 rejected rows); `prompt_lengths[b]` is the prompt that row
        b and row R/2 + b share (read by the shared-prompt layout only).
        """
        if self.sp is not None:
            self.sp.verify([input_ids, attention_mask, *masks])
        if self.attention_name is None:
            return _padded_row_sums(model, input_ids, attention_mask, masks, fields, **model_kwargs)
        if self.share_prompt:
            packed = pack_shared_prompts(input_ids, attention_mask, masks, pair_groups(list(prompt_lengths)))
            if self.sp is None:
                packed, plan = packed, plan_for_trees(packed.trees)
            else:
                packed = self.sp.shard_trees(packed, pad_token_id=self.pad_token_id)
                plan = packed.plan
        else:
            packed = self.sp.shard_rows(input_ids, masks, attention_mask, pad_token_id=self.pad_token_id)
            plan = packed.plan
        state = self.sp.attention_state(plan) if self.sp is not None else AttentionState(group=None, plan=plan)
        return self.packed_row_sums(model, packed, state, fields, **model_kwargs)

    def packed_row_sums(self, model, packed, state: AttentionState, fields: Sequence[str], **model_kwargs) -> RowSums:
        """The forward of a packed sequence (`packed`: flat input_ids, position_ids, targets, row_index, masks (K, T),
        num_rows) under `state`, summed per row and, when split, over the SP group."""
        if (
            torch.is_grad_enabled()
            and activation_checkpointing(model)
            and base_model(model).config._attn_implementation != self.attention_name
        ):
            raise RuntimeError(
                "With gradient checkpointing, a packed loss must be computed inside `training_step` (which keeps the "
                "packed attention on through backward); calling `compute_loss` directly would recompute the layers "
                "with the model's own attention during backward."
            )
        labels = packed.targets.masked_fill(~packed.masks[0], IGNORE_INDEX)
        with attention_implementation(model, name=self.attention_name):  # a no-op inside a step / a split run
            outputs = model(
                input_ids=packed.input_ids[None],
                position_ids=packed.position_ids[None],
                shift_labels=labels[None],  # already shifted on the full rows: scored as given
                fused_lm_head=True,
                use_cache=False,
                attention_state=state,
                **model_kwargs,
            )
        per_token = {name: getattr(outputs, name)[0] for name in fields}
        sums, counts = _sum_per_row(per_token, fields, packed.row_index, packed.masks, packed.num_rows)
        if self.sp is not None:
            sums, counts = self.sp.sum(sums), self.sp.sum(counts)
        return RowSums(sums, counts)


def _padded_row_sums(model, input_ids, attention_mask, masks, fields, **model_kwargs) -> RowSums:
    """One ordinary forward of the (R, L) batch through TRL's fused LM head."""
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids.masked_fill(~masks[0].bool(), IGNORE_INDEX),
        fused_lm_head=True,
        use_cache=False,
        **model_kwargs,
    )
    num_rows, seq_len = input_ids.size(0), input_ids.size(1) - 1
    flat = {name: getattr(outputs, name)[:, -seq_len:].reshape(-1) for name in fields}  # PEFT prompt learning
    row_index = torch.arange(num_rows, device=input_ids.device).repeat_interleave(seq_len)
    shifted = torch.stack([m[:, 1:].bool().reshape(-1) for m in masks])
    sums, counts = _sum_per_row(flat, fields, row_index, shifted, num_rows)
    return RowSums(sums, counts, getattr(outputs, "aux_loss", None))


def _sum_per_row(
    values: dict, fields: Sequence[str], row_index: torch.Tensor, masks: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums (fields, masks, rows) of flat per-token `values[field]`, and the token counts (masks, rows).
    `row_index[t]` is token t's row (-1 for padding, which every mask excludes). Sums are in `row_sum_dtype`
    (fp64: rewards are differences of sums of thousands of terms); only log-probs keep their gradient."""
    rows = row_index.clamp(min=0)
    dtype = row_sum_dtype(rows.device)
    sums = []
    for name in fields:
        value = values[name]
        value = (value if name == "log_probs" else value.detach()).to(dtype)
        sums.append(torch.stack([value.new_zeros(num_rows).index_add(0, rows, value * m) for m in masks]))
    counts = torch.stack([rows.new_zeros(num_rows).index_add(0, rows, m.long()) for m in masks])
    return torch.stack(sums), counts
