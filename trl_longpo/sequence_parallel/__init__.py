"""Sequence parallelism for LongPO: one long sequence split over an SP group of ranks, with ring attention.

Why: LongPO's long-context preference pairs (128K-512K tokens) do not fit one device's activation memory. Splitting
every sequence over `sp` ranks divides activation memory by ~sp; ring attention (ring-flash-attn) lets each query see
the whole causal context by passing K/V around the group. Data parallelism composes on top: world = dp x sp.

Trainer-facing API (all ranks call everything, collectively):

    mesh = init_sequence_parallel_mesh(sp_size)                     # after torch.distributed is initialised
    context = SequenceParallelContext(mesh, ring_attn_impl="zigzag", heads_k_stride=1)
    prepare_model_for_sequence_parallel(model, context)             # checks + attn_implementation="ring_attention"
    out = sp_log_probs(model, input_ids, labels, attention_mask, context=context)
    out.sum_logps  # (B,) differentiable, identical on the SP group; out.num_tokens (B,)

Rows: the same (B, L) batch on every rank of an SP group (data sharded over `mesh.dp_rank` only; verified by a
checksum each call), labels in the Hugging Face convention (aligned with input_ids, -100 = no loss). Gradients are
right when DDP / FSDP / ZeRO average over all dp x sp ranks (see `collectives`).

Lower-level pieces for custom forwards: `shard_rows` / `PackedShard` (packing, padding, layout, true positions),
`RingAttentionState` + `model(..., ring_attention=state)` (see `trl_longpo.attention.ring`), `sp_all_reduce_sum`,
`verify_same_batch`; `unsplit_attention(model)` for unsplit forwards (generation) on a ring-attention model.
"""

from trl_longpo.sequence_parallel.collectives import sp_all_reduce_sum
from trl_longpo.sequence_parallel.log_probs import (
    RowLogProbs,
    SequenceParallelContext,
    check_model_for_sequence_parallel,
    prepare_model_for_sequence_parallel,
    shard_log_probs,
    sp_fused_row_sums,
    sp_log_probs,
    unsplit_attention,
)
from trl_longpo.sequence_parallel.mesh import (
    SequenceParallelMesh,
    check_sp_size,
    init_sequence_parallel_mesh,
    verify_same_batch,
)
from trl_longpo.sequence_parallel.sharding import IGNORE_INDEX, PackedShard, shard_local_indices, shard_rows

__all__ = [
    "IGNORE_INDEX",
    "PackedShard",
    "RowLogProbs",
    "SequenceParallelContext",
    "SequenceParallelMesh",
    "check_model_for_sequence_parallel",
    "check_sp_size",
    "init_sequence_parallel_mesh",
    "prepare_model_for_sequence_parallel",
    "shard_local_indices",
    "shard_log_probs",
    "shard_rows",
    "sp_all_reduce_sum",
    "sp_fused_row_sums",
    "sp_log_probs",
    "unsplit_attention",
    "verify_same_batch",
]
