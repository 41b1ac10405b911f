"""The one object a trainer holds for sequence parallelism: mesh, run-wide settings and the SP plumbing.

Everything that depends on the dp x sp layout goes through `SequenceParallelContext`: preparing models (checks and
the switch to ring / tree attention), building this rank's shard of a batch (rows or shared-prompt trees) with its
attention state, summing partial row sums over the SP group, gathering metrics over the dp axis, and sharding a
dataloader so that the ranks of an SP group read the same batch. Per-row sums themselves live in
`trl_longpo.scoring`, which takes this context when the run is split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_longpo.attention.interface import AttentionPlan, AttentionState
from trl_longpo.attention.patching import check_attention_model, switch_attention
from trl_longpo.attention.ring import DEFAULT_RING_ATTN_IMPL, check_ring_attn_impl
from trl_longpo.packing import PackedTrees
from trl_longpo.sequence_parallel.collectives import sp_all_reduce_sum
from trl_longpo.sequence_parallel.mesh import SequenceParallelMesh, verify_same_batch
from trl_longpo.sequence_parallel.sharding import PackedShard, shard_rows
from trl_longpo.sequence_parallel.tree import TreeShard, shard_trees
from trl_longpo.sequence_parallel.ulysses import UlyssesPlan


@dataclass(frozen=True)
class SequenceParallelContext:
    """Run-wide sequence-parallel settings (one per training run), plus this rank's mesh.

    `ring_attn_impl`: "zigzag" (default, fastest) or "llama3" (better precision, no per-row padding to 2*sp); see
    `trl_longpo.attention.ring.DEFAULT_RING_ATTN_IMPL`. `heads_k_stride`: llama3 all-gathers this many kv heads at a
    time (must divide the kv head count). `attention_dtype`: see `AttentionState`. `verify_batches`: checksum the
    inputs across the SP group on every call. `max_length`: refuse packed batches longer than this (after padding).
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

    # ------------------------------------------------------------------------------------------------ models
    def prepare_model(self, model: torch.nn.Module, attention_name: str) -> torch.nn.Module:
        """Check the model can run split attention and switch it (in place, for the run) to `attention_name`."""
        check_attention_model(model, self.heads_k_stride, self.allow_sliding_window, self.mesh.ulysses_size)
        switch_attention(model, attention_name)
        return model

    # ------------------------------------------------------------------------------------------------ batches
    def verify(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Raise on every rank unless the SP group holds identical `tensors` (when `verify_batches`)."""
        if self.verify_batches:
            verify_same_batch(tensors, self.mesh.sp_group)

    def shard_rows(
        self,
        input_ids: torch.Tensor,
        masks: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pad_token_id: int = 0,
    ) -> PackedShard:
        """This rank's shard of padded rows packed as causal segments (`sharding.shard_rows`)."""
        shard = shard_rows(
            input_ids,
            masks,
            attention_mask,
            position_ids,
            sp_rank=self.mesh.sp_rank,
            sp_size=self.mesh.sp_size,
            impl=self.ring_attn_impl,
            pad_token_id=pad_token_id,
            max_length=self.max_length,
            ulysses=self.mesh.ulysses_size,
        )
        return self._with_ulysses(shard)

    def shard_trees(self, packed: PackedTrees, pad_token_id: int = 0) -> TreeShard:
        """This rank's shard of packed shared-prompt trees (`sequence_parallel.tree.shard_trees`)."""
        shard = shard_trees(
            packed,
            sp_rank=self.mesh.sp_rank,
            sp_size=self.mesh.sp_size,
            impl=self.ring_attn_impl,
            group=self.mesh.ring_group,
            pad_token_id=pad_token_id,
            ulysses=self.mesh.ulysses_size,
        )
        return self._with_ulysses(shard)

    def _with_ulysses(self, shard):
        """Under Ulysses (degree > 1) the shard's plan covers the tokens the all-to-all delivers: wrap it."""
        if self.mesh.ulysses_size == 1:
            return shard
        ring_group = self.mesh.ring_group if self.mesh.ring_size > 1 else None
        plan = UlyssesPlan(shard.plan, self.mesh.ulysses_group, ring_group, int(shard.input_ids.numel()))
        return dataclasses.replace(shard, plan=plan)

    def attention_state(self, plan: AttentionPlan) -> AttentionState:
        return AttentionState(
            group=self.mesh.sp_group,
            plan=plan,
            heads_k_stride=self.heads_k_stride,
            allow_sliding_window=self.allow_sliding_window,
            attention_dtype=self.attention_dtype,
        )

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum partial per-rank values over the SP group (autograd-correct, see `collectives`)."""
        return sp_all_reduce_sum(tensor, self.mesh.sp_group)

    # ------------------------------------------------------------------------------------------ data, metrics
    def gather_metric(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather a metric over the dp axis only: the ranks of an SP group hold the same values (a world gather would
        count every row and token `sp` times)."""
        tensor = tensor.detach().reshape(-1) if tensor.dim() else tensor.detach().reshape(1)
        parts = [torch.empty_like(tensor) for _ in range(self.mesh.dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.mesh.dp_group)
        return torch.cat(parts)

    def shard_dataloader(self, dataloader, description: str):
        """accelerate shards batches over all ranks; under SP the ranks of one SP group must get the same batch, so
        shard over the dp axis only (`verify` checks it with a checksum on every step)."""
        sharder = getattr(dataloader, "batch_sampler", None)
        if sharder is None or not hasattr(sharder, "process_index"):
            raise ValueError(f"Cannot shard the {description} dataloader by data-parallel rank for SP.")
        sharder.num_processes = self.mesh.dp_size
        sharder.process_index = self.mesh.dp_rank
        return dataloader
