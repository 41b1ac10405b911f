"""The DP x SP process layout, and a run-time check that an SP group really shares one batch.

Layout: world = dp x sp, SP groups are runs of `sp` CONSECUTIVE ranks (rank = dp_rank * sp + sp_rank). Consecutive
ranks share a node whenever sp divides the GPUs per node, so the ring's per-layer K/V traffic stays on NVLink while
only the (much rarer) gradient all-reduce crosses nodes. The groups come from torch's DeviceMesh (row-major (dp, sp)).

Correctness depends on every rank of an SP group holding the same rows: each rank keeps only its shard, so a rank that
got another row silently computes attention over a sequence that does not exist. `verify_same_batch` checks this on
every step with a checksum all-gather (a few int64 per tensor, negligible next to one ring-attention layer) instead of
trusting the data loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_sp_size(world_size: int, sp_size: int) -> int:
    """Validate `sp_size` against the world size and return the data-parallel size."""
    if sp_size < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sp_size}")
    if world_size % sp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"world size {world_size} is not divisible by sequence_parallel_size {sp_size}: the processes must form "
            f"a dp x sp grid (sequence_parallel_size one of {divisors})"
        )
    return world_size // sp_size


@dataclass(frozen=True)
class SequenceParallelMesh:
    """This rank's place in the dp x sp grid, with the process groups for each axis."""

    sp_size: int
    dp_size: int
    rank: int
    sp_rank: int
    dp_rank: int
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    sp_ranks: tuple[int, ...]  # global ranks of this rank's SP group, in ring order
    ulysses_size: int = 1  # Ulysses degree u: sp = u x ring degree (`trl_longpo.sequence_parallel.ulysses`)
    ulysses_group: dist.ProcessGroup | None = None  # u consecutive ranks (None when u = 1)
    ring_group: dist.ProcessGroup | None = None  # one rank of each Ulysses group (the sp group when u = 1)

    @property
    def ring_size(self) -> int:
        return self.sp_size // self.ulysses_size


def init_sequence_parallel_mesh(
    sp_size: int, device_type: str | None = None, ulysses_degree: int = 1
) -> SequenceParallelMesh:
    """Build the dp x sp mesh over the initialised default process group, with Ulysses and ring groups inside each SP
    group when `ulysses_degree` > 1. Collective: call it on every rank."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; launch with torchrun / accelerate launch")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dp_size = check_sp_size(world_size, sp_size)
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    dp_rank, sp_rank = divmod(rank, sp_size)
    sp_group = mesh["sp"].get_group()
    ulysses_group, ring_group = None, sp_group
    if ulysses_degree > 1:
        from trl_longpo.sequence_parallel.ulysses import init_ulysses_groups

        ulysses_group, ring_group = init_ulysses_groups(sp_size, ulysses_degree, dp_size, rank)
    return SequenceParallelMesh(
        sp_size=sp_size,
        dp_size=dp_size,
        rank=rank,
        sp_rank=sp_rank,
        dp_rank=dp_rank,
        sp_group=sp_group,
        dp_group=mesh["dp"].get_group(),
        sp_ranks=tuple(range(dp_rank * sp_size, (dp_rank + 1) * sp_size)),
        ulysses_size=ulysses_degree,
        ulysses_group=ulysses_group,
        ring_group=ring_group,
    )


_CHECKSUM_WIDTH = 8  # per tensor: present, ndim, numel, first 3 dims, plain sum, position-weighted sum
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum(tensor: torch.Tensor | None) -> list[int]:
    if tensor is None:
        return [0] * _CHECKSUM_WIDTH
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():  # compare bit patterns, so equal values give equal sums regardless of reduction order
        flat = flat.contiguous().view(_INT_VIEW[flat.element_size()])
    flat = flat.to(torch.int64)
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1  # catches permutations
    dims = (list(tensor.shape) + [0, 0, 0])[:3]
    # int64 sums wrap around on overflow, deterministically: fine for a checksum.
    return [1, tensor.dim(), tensor.numel(), *dims, int(flat.sum()), int((flat * weights).sum())]


def verify_same_batch(tensors: Sequence[torch.Tensor | None], group: dist.ProcessGroup, what: str = "batch") -> None:
    """Raise on every rank of `group` unless all of them hold identical `tensors` (shapes and values).

    Cheap: one all-gather of 8 int64 per tensor. Every rank sees all checksums, so every rank raises the same error
    (no rank is left waiting in a later collective).
    """
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if dist.get_backend(group) == "nccl" and device.type == "cpu":
        device = torch.device("cuda", torch.cuda.current_device())
    local = torch.tensor([v for t in tensors for v in _checksum(t)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    ranks = dist.get_process_group_ranks(group)
    reference = gathered[0]
    mismatched = [ranks[i] for i, other in enumerate(gathered) if not torch.equal(other, reference)]
    if mismatched:
        raise RuntimeError(
            f"sequence-parallel ranks {ranks} must hold the same {what}, but global rank(s) {mismatched} differ from "
            f"rank {ranks[0]}. Every rank of an SP group must load the same rows (shard the data over the dp axis "
            "only: dp_rank = rank // sequence_parallel_size)."
        )


def accelerate_parallelism_problem(parallelism_config, sequence_parallel_size: int = 1, environ=None) -> str | None:
    """Why LongPO cannot run accelerate's own context / sequence parallelism, or None when it is not requested.

    accelerate 1.16's `ParallelismConfig` has `cp_size` (torch context parallel: SDPA only, attention masks dropped,
    `is_causal` forced: no packed rows, no shared-prompt trees) and `sp_size` (DeepSpeed ALST Ulysses, plain LM loss).
    Either would split sequences without reducing LongPO's per-sequence log-probs over the split (TRL's DPOTrainer
    neither supports nor refuses them), so the loss would be silently wrong. Mapping `sp_size` onto our Ulysses layout
    is not exact (accelerate also shards the batch and owns the dataloader and loss), so it is refused and the
    equivalent LongPOConfig option named. The config comes from `TrainingArguments.parallelism_config` or from
    `accelerate launch` (its `parallelism_config` section becomes PARALLELISM_CONFIG_* environment variables).
    """
    import os

    environ = os.environ if environ is None else environ
    sizes = {}
    if parallelism_config is not None:
        get = parallelism_config.get if isinstance(parallelism_config, dict) else parallelism_config.__getattribute__
        sizes = {name: get(name) for name in ("cp_size", "sp_size")}
    elif str(environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false")).lower() == "true":
        sizes = {name: environ.get(f"PARALLELISM_CONFIG_{name.upper()}") for name in ("cp_size", "sp_size")}
    sizes = {name: int(size) for name, size in sizes.items() if size is not None and int(size) > 1}
    if not sizes:
        return None
    split = max(sizes.values()) * max(sequence_parallel_size, 1)
    given = ", ".join(f"{name}={size}" for name, size in sizes.items())
    ulysses = f", ulysses_degree={sizes['sp_size']}" if "sp_size" in sizes else ""  # sp_size is Ulysses
    return (
        f"accelerate's parallelism_config ({given}) is not supported by LongPOTrainer: trl-longpo's sequence "
        "parallelism replaces it (per-sequence log-probs reduced over the split, packed rows and shared-prompt trees). "
        "Remove cp_size/sp_size from the accelerate config (or TrainingArguments.parallelism_config) and set "
        f"LongPOConfig(sequence_parallel_size={split}{ulysses}) instead."
    )
