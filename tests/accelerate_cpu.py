"""Run a training script under accelerate's FSDP or DeepSpeed engine on CPU processes (gloo), and say which ran.

    accelerate launch --config_file CONFIG tests/accelerate_cpu.py examples/train_mistral.py ARGS

FSDP: accelerate (checked with 1.16) turns an FSDP config into the FSDP engine only for accelerator process groups
(`AcceleratorState`: MULTI_GPU / MULTI_XPU / ...). CPU processes are MULTI_CPU, and there the FSDP plugin built from
the config is silently dropped: the same launch trains with DDP. This wrapper applies the plugin to MULTI_CPU too,
exactly as `AcceleratorState` does for GPUs (distributed type FSDP, plugin stored, `PartialState` updated), so
`Accelerator.prepare` really calls `fully_shard` (FSDP2), clips and saves through FSDP2's paths.

DeepSpeed needs no change (the training config must not set `use_cpu`; see tests/test_distributed_engines.py).

Either way it prints, per rank, how many parameters the engine sharded (FSDP2: DTensors; ZeRO-3: partitioned
`ds_id` parameters, with the ZeRO stage), so a test can tell the engine from a DDP fallback.
"""

from __future__ import annotations

import os
import runpy
import sys

import accelerate.accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__
_fsdp2_prepare_model = accelerate.accelerator.fsdp2_prepare_model


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _fsdp2_prepare_and_report(accelerator, model):
    from torch.distributed.tensor import DTensor

    model = _fsdp2_prepare_model(accelerator, model)
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    print(f"FSDP2 rank {accelerator.process_index}: {sharded}/{len(params)} parameters sharded", flush=True)
    return model


def _report_deepspeed() -> None:
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce kernel (C++, ~40 s on 2 cores, redone in every
    # new environment) on first use; marked incompatible, it uses torch.distributed's gloo collectives, as it does
    # on platforms without the kernel. ZeRO-3's partitioning, the trainer and the compared results do not change.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    initialize = deepspeed.initialize

    def initialize_and_report(*args, **kwargs):
        engine, *rest = initialize(*args, **kwargs)
        params = list(engine.module.parameters())
        sharded = sum(hasattr(p, "ds_id") for p in params)
        rank, stage = os.environ["RANK"], engine.zero_optimization_stage()
        print(f"DeepSpeed rank {rank}: ZeRO stage {stage}, {sharded}/{len(params)} parameters sharded", flush=True)
        return engine, *rest

    deepspeed.initialize = initialize_and_report


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    accelerate.accelerator.fsdp2_prepare_model = _fsdp2_prepare_and_report
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _report_deepspeed()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
