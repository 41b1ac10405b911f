"""Per-row log-probability sums of a causal LM whose sequences are split over an SP group with ring attention.

This is the one call a trainer needs: give it the same (B, L) rows on every rank of an SP group, get back on every
rank the per-row sums of shifted-label log-probs and label-token counts, equal to what the unsplit model computes, with
gradients that are correct under world-wide gradient averaging (see `collectives`). Everything the ring needs per
batch (the sharding plan, the SP group, options) is built here and passed to the model as the `ring_attention`
keyword, which survives gradient-checkpoint recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trl_longpo.attention.ring import (
    DEFAULT_RING_ATTN_IMPL,
    RING_ATTENTION_NAME,
    RingAttentionState,
    check_heads_k_stride,
    check_ring_attn_impl,
    check_sliding_window,
    register_ring_attention,
)
from trl_longpo.modeling import unwrap_engine
from trl_longpo.packing import packed_row_sums
from trl_longpo.sequence_parallel.collectives import sp_all_reduce_sum
from trl_longpo.sequence_parallel.mesh import SequenceParallelMesh, verify_same_batch
from trl_longpo.sequence_parallel.sharding import IGNORE_INDEX, PackedShard, shard_rows


@dataclass(frozen=True)
class SequenceParallelContext:
    """Run-wide sequence-parallel settings (one per training run), plus this rank's mesh.

    `ring_attn_impl`: "zigzag" (default, fastest) or "llama3" (better precision, no per-row padding to 2*sp); see
    `trl_longpo.attention.ring.DEFAULT_RING_ATTN_IMPL`. `heads_k_stride`: llama3 all-gathers this many kv heads at a
    time (must divide the kv head count). `attention_dtype`: see `RingAttentionState`. `verify_batches`: checksum
    the inputs across the SP group on every call.
    `max_length`: refuse packed batches longer than this (after padding).
    """

    mesh: SequenceParallelMesh
    ring_attn_impl: str = DEFAULT_RING_ATTN_IMPL
    heads_k_stride: int = 1
    allow_sliding_window: bool = False
    verify_batches: bool = True
    attention_dtype: torch.dtype | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        check_ring_attn_impl(self.ring_attn_impl)
        if self.heads_k_stride < 1:
            raise ValueError(f"ring_heads_k_stride must be >= 1, got {self.heads_k_stride}")

    def shard(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pad_token_id: int = 0,
    ) -> PackedShard:
        """Verify (optionally) that the SP group shares these rows, then pack and shard them for this rank."""
        if self.verify_batches:
            verify_same_batch([input_ids, labels, attention_mask, position_ids], self.mesh.sp_group)
        return shard_rows(
            input_ids,
            labels,
            attention_mask,
            position_ids,
            sp_rank=self.mesh.sp_rank,
            sp_size=self.mesh.sp_size,
            impl=self.ring_attn_impl,
            pad_token_id=pad_token_id,
            max_length=self.max_length,
        )

    def attention_state(self, shard: PackedShard) -> RingAttentionState:
        return RingAttentionState(
            group=self.mesh.sp_group,
            plan=shard.plan,
            heads_k_stride=self.heads_k_stride,
            allow_sliding_window=self.allow_sliding_window,
            attention_dtype=self.attention_dtype,
        )


def check_model_for_sequence_parallel(
    model: torch.nn.Module, heads_k_stride: int = 1, allow_sliding_window: bool = False
) -> None:
    """Refuse what ring attention cannot run: a sliding window (unless explicitly allowed, then warn), a kv head count
    the heads stride does not divide, attention dropout. Needs no process group, so it can run before the mesh."""
    config = unwrap_engine(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_sliding_window(_effective_sliding_window(text_config), allow_sliding_window)
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    check_heads_k_stride(num_kv_heads, heads_k_stride)
    if getattr(text_config, "attention_dropout", 0.0):
        raise ValueError(f"ring attention does not support attention dropout ({text_config.attention_dropout})")


def prepare_model_for_sequence_parallel(model: torch.nn.Module, context: SequenceParallelContext) -> torch.nn.Module:
    """Check the model can run ring attention, register it with transformers and switch the model to it (in place).

    Raises on a sliding-window config (unless `context.allow_sliding_window`), a kv head count the heads stride does
    not divide, or attention dropout.
    """
    check_model_for_sequence_parallel(model, context.heads_k_stride, context.allow_sliding_window)
    inner = unwrap_engine(model)
    if inner.config._attn_implementation != RING_ATTENTION_NAME:
        inner._longpo_unsplit_attn_implementation = inner.config._attn_implementation
    inner.set_attn_implementation(register_ring_attention())
    return model


@contextlib.contextmanager
def unsplit_attention(*models: torch.nn.Module | None) -> Iterator[None]:
    """Run the models with the attention they had before `prepare_model_for_sequence_parallel` (e.g. sdpa) inside
    the block, then switch them back to ring attention: for unsplit forwards such as generation, where every rank runs
    whole sequences and no packing plan exists. Models not on ring attention (or None) are left as they are."""
    switched = []
    try:
        for model in models:
            inner = unwrap_engine(model) if model is not None else None
            if inner is None or inner.config._attn_implementation != RING_ATTENTION_NAME or inner in switched:
                continue
            inner.set_attn_implementation(getattr(inner, "_longpo_unsplit_attn_implementation", "sdpa"))
            switched.append(inner)
        yield
    finally:
        for inner in switched:
            inner.set_attn_implementation(RING_ATTENTION_NAME)


def _effective_sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps a window but disables it
        return None
    return window


@dataclass(frozen=True)
class RowLogProbs:
    """Per-row sums over label tokens, identical on every rank of the SP group.

    `sum_logps` (B,) is differentiable; `num_tokens` (B,) counts label tokens (NLL mean = -sum_logps / num_tokens).
    """

    sum_logps: torch.Tensor
    num_tokens: torch.Tensor


def sp_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    context: SequenceParallelContext,
    pad_token_id: int = 0,
    **model_kwargs,
) -> RowLogProbs:
    """Per-row sums of log p(label_{t+1} | tokens <= t) over an SP group; see `shard_rows` for the input conventions.

    Call it on every rank of the SP group with the same rows (checked when `context.verify_batches`). The model must
    have been switched to ring attention (`prepare_model_for_sequence_parallel`). Works under torch.no_grad() too
    (reference model).
    """
    shard = context.shard(input_ids, labels, attention_mask, position_ids, pad_token_id=pad_token_id)
    return shard_log_probs(model, shard, context, **model_kwargs)


def shard_log_probs(
    model: torch.nn.Module, shard: PackedShard, context: SequenceParallelContext, **model_kwargs
) -> RowLogProbs:
    """The forward half of `sp_log_probs` for an already built shard (custom packing, tests, later layouts)."""
    from trl.trainer.utils import selective_log_softmax

    config = unwrap_engine(model).config
    if getattr(config, "_attn_implementation", None) != RING_ATTENTION_NAME:
        raise ValueError(
            f"the model uses attn_implementation={getattr(config, '_attn_implementation', None)!r}; call "
            "prepare_model_for_sequence_parallel(model, context) first"
        )
    outputs = model(
        input_ids=shard.input_ids,
        position_ids=shard.position_ids,
        use_cache=False,
        ring_attention=context.attention_state(shard),
        **model_kwargs,
    )
    logits = outputs.logits[0]  # (T_local, V)
    targets = shard.labels[0]
    in_loss = targets != IGNORE_INDEX
    # A batch dimension keeps TRL's CPU fallback from looping over tokens one at a time
    token_logps = selective_log_softmax(logits[None], targets.clamp(min=0)[None])[0].masked_fill(~in_loss, 0.0)
    rows = shard.row_index.clamp(min=0)  # padding has in_loss False, so its row does not matter
    # Accumulate in at least fp32: summing 100K+ bf16 log-probs in bf16 would lose most of the precision.
    zeros = torch.zeros(
        shard.num_rows, dtype=torch.promote_types(token_logps.dtype, torch.float32), device=rows.device
    )
    partial = zeros.index_add(0, rows, token_logps.to(zeros.dtype))
    counts = torch.zeros_like(zeros, dtype=torch.long).index_add(0, rows, in_loss.long())
    group = context.mesh.sp_group
    return RowLogProbs(sum_logps=sp_all_reduce_sum(partial, group), num_tokens=sp_all_reduce_sum(counts, group))


def sp_fused_row_sums(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    label_sets: list[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    *,
    context: SequenceParallelContext,
    pad_token_id: int = 0,
    fields: tuple[str, ...] = ("log_probs",),
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of per-token values over several label sets, from ONE ring forward through TRL's fused LM head.

    A trainer often needs several sums from the same forward (LongPO: answer log-probs for the preference term and
    log-probs of the whole chosen sequence for the NLL). `label_sets[0]` decides which positions are scored and must
    cover every other set; each set k contributes sums over its own label positions. The model must carry TRL's fused
    LM head (`trl.trainer.utils.add_fused_lm_head`, which DPOTrainer installs), so no (tokens × vocab) logits are
    materialised: only the per-token `fields` of its output ("log_probs", and detached metrics such as "entropy" or
    "is_top1").

    Returns `sums` (len(fields), len(label_sets), B) — differentiable through "log_probs", identical on every rank of
    the SP group — and `counts` (len(label_sets), B), the label-token counts.
    """
    shards = [context.shard(input_ids, label_sets[0], attention_mask, pad_token_id=pad_token_id)]
    for labels in label_sets[1:]:  # same rows, so the same packing; only the labels differ
        shards.append(
            shard_rows(
                input_ids, labels, attention_mask, None, sp_rank=context.mesh.sp_rank, sp_size=context.mesh.sp_size,
                impl=context.ring_attn_impl, pad_token_id=pad_token_id, max_length=context.max_length,
            )
        )
    shard = shards[0]
    config = unwrap_engine(model).config
    if getattr(config, "_attn_implementation", None) != RING_ATTENTION_NAME:
        raise ValueError("call prepare_model_for_sequence_parallel(model, context) before sp_fused_row_sums")
    outputs = model(
        input_ids=shard.input_ids,
        position_ids=shard.position_ids,
        shift_labels=shard.labels,  # already shifted on the full rows: scored as given
        fused_lm_head=True,
        use_cache=False,
        ring_attention=context.attention_state(shard),
        **model_kwargs,
    )
    masks = [s.labels[0] != IGNORE_INDEX for s in shards]  # padding is outside every label set
    sums, counts = packed_row_sums(outputs, fields, shard.row_index, masks, shard.num_rows)
    group = context.mesh.sp_group
    return sp_all_reduce_sum(sums, group), sp_all_reduce_sum(counts, group)
