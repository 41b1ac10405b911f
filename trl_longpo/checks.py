"""Set-up checks of `LongPOTrainer`, in one place and run once per model: what the configuration cannot run is
refused with the fix before DPOTrainer's set-up (which may load models and run a long reference precompute)."""

from __future__ import annotations

import importlib.util
import os

import torch
from datasets import IterableDataset

from .attention.patching import check_attention_model
from .config import LongPOConfig
from .modeling import check_causal_lm, unwrap_engine


def check_launch(args: LongPOConfig) -> None:
    """Refuse a multi-process launch that accelerate runs as independent single-process jobs: e.g. `accelerate launch
    --multi_gpu` on a machine without GPUs and without `use_cpu`, which would train N unsynchronised copies (and,
    under SP, feed the ring different rows)."""
    import torch.distributed as dist

    launched = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    launched = launched or int(os.environ.get("WORLD_SIZE", "1"))
    accelerate_processes = args.distributed_state.num_processes
    if launched != accelerate_processes:
        raise ValueError(
            f"{launched} processes were launched but accelerate runs {accelerate_processes} "
            f"({args.distributed_state.distributed_type}): every process would train its own copy of the model "
            "without sharing data or gradients. On a CPU-only machine set `use_cpu: true` in the training config "
            "(`--use_cpu true` on the command line, `use_cpu=True` in Python); accelerate then runs one gloo job."
        )


def check_run(args: LongPOConfig, train_dataset, reference_is_policy: bool) -> None:
    """Liger, launch and sequence-parallel settings that do not depend on the models."""
    if args.use_liger_kernel:  # Liger's kernels are Triton GPU kernels
        if not torch.cuda.is_available():
            raise ValueError(
                "`use_liger_kernel=True` needs a CUDA GPU: Liger's kernels are Triton GPU kernels. On CPU leave it "
                "False (LongPO already computes log-probs with TRL's fused, chunked LM head)."
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("`use_liger_kernel=True` needs the liger-kernel package: pip install 'trl-longpo[gpu]'.")
    check_launch(args)
    if args.sequence_parallel_size <= 1:
        return
    import torch.distributed as dist

    from .sequence_parallel import check_sp_size

    if args.sequence_parallel_reference == "local" and reference_is_policy and not args.precompute_ref_log_probs:
        raise ValueError(
            "`sequence_parallel_reference='local'` scores the short inputs with a separate reference model, but "
            "the reference here is the policy itself (PEFT with disabled adapters). Use 'ring', pass `ref_model`, "
            "or set `precompute_ref_log_probs=True`."
        )
    if isinstance(train_dataset, IterableDataset):
        raise ValueError(
            "Sequence parallelism needs a map-style `Dataset`: every rank of an SP group must read the same rows, "
            "which an `IterableDataset` split by accelerate does not guarantee."
        )
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_sp_size(world_size, args.sequence_parallel_size)  # clear error for world % sp != 0 (incl. world 1)


def check_model(model: torch.nn.Module, args: LongPOConfig, role: str, split: bool) -> None:
    """A causal LM that the configured layout can run: tree attention (`share_prompt`), ring attention (`split`: the
    policy, and the reference when it runs on the ring). A ZeRO-3 reference arrives as a DeepSpeed engine: the
    model inside it is checked."""
    check_causal_lm(unwrap_engine(model), role=role)
    if args.share_prompt:
        check_attention_model(model, allow_sliding_window=args.ring_ignore_sliding_window, tree=True)
    if split:
        check_attention_model(model, args.ring_heads_k_stride, args.ring_ignore_sliding_window, args.ulysses_degree)
