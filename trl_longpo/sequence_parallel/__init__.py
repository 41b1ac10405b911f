"""Sequence parallelism for LongPO: one long sequence split over an SP group of ranks, with ring attention.

Why: LongPO's long-context preference pairs (128K-512K tokens) do not fit one device's activation memory. Splitting
every sequence over `sp` ranks divides activation memory by ~sp; ring attention (ring-flash-attn) lets each query see
the whole causal context by passing K/V around the group. Data parallelism composes on top: world = dp x sp.

Trainer-facing API (all ranks call everything, collectively):

    mesh = init_sequence_parallel_mesh(sp_size)                 # after torch.distributed is initialised
    context = SequenceParallelContext(mesh, ring_attn_impl="zigzag", heads_k_stride=1)
    scorer = RowScorer(sp=context, share_prompt=False)          # trl_longpo.scoring: per-row sums for this layout
    context.prepare_model(model, scorer.attention_name)         # checks + the switch to ring attention
    sums = scorer.row_sums(model, input_ids, attention_mask, [answer_mask])   # identical on the SP group

Rows: the same (B, L) batch on every rank of an SP group (data sharded over `mesh.dp_rank` only; verified by a
checksum each call). Gradients are right when DDP / FSDP / ZeRO average over all dp x sp ranks (see `collectives`).

Lower-level pieces: `shard_rows` / `PackedShard` (packing, padding, layout, true positions), `shard_trees` (shared
prompt), `sp_all_reduce_sum`, `verify_same_batch`.
"""

from trl_longpo.sequence_parallel.collectives import sp_all_reduce_sum
from trl_longpo.sequence_parallel.context import SequenceParallelContext
from trl_longpo.sequence_parallel.mesh import (
    SequenceParallelMesh,
    check_sp_size,
    init_sequence_parallel_mesh,
    verify_same_batch,
)
from trl_longpo.sequence_parallel.sharding import PackedShard, shard_local_indices, shard_rows
from trl_longpo.sequence_parallel.tree import TreeShard, shard_trees

__all__ = [
    "PackedShard",
    "SequenceParallelContext",
    "SequenceParallelMesh",
    "TreeShard",
    "check_sp_size",
    "init_sequence_parallel_mesh",
    "shard_local_indices",
    "shard_rows",
    "shard_trees",
    "sp_all_reduce_sum",
    "verify_same_batch",
]
