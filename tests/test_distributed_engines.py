"""FSDP2 and DeepSpeed ZeRO-3 for real: `accelerate launch` with the shipped configs on 2 CPU processes (gloo); the
suite's 2-process `examples/train_mistral.py` runs (the sp = 2 run also checks the saved model reloads as usual).

`examples/train_mistral.py` on `tiny_cpu_sp2.yaml` runs two optimizer steps (constant learning rate, gradient
clipping active) on the same tiny model, rows and seed with the same effective batch of 2 rows: in one process (the
baseline, run once per loss setting and shared by the engines), and under each engine with sp = 2 (dp 1, both ranks
hold the same 2 rows) and with dp = 2 × sp = 1 (1 row per rank). Each step's loss and grad_norm (`trainer_state.json`
log_history) and every parameter of the saved model must equal the baseline's. The runs also print how many
parameters the engine sharded, so a silent fallback to DDP fails the test (tests/accelerate_cpu.py).

Tolerances (fp32): the SP reductions (all-reduced row sums), FSDP2's (reduce-scattered gradient mean, sharded clip
norm) and ZeRO-3's are exact up to summation order; the SP run also uses another attention kernel and the dp run
pads rows differently. Measured: loss and grad_norm rel. diff <= 4.6e-6 (asserted 2e-5), parameters max abs diff
2.1e-7 (asserted 1e-6, a thousandth of one step of lr × Adam's ~unit step; weights are ~0.1). The test can fail:
by hand, the FSDP2 sp = 2 run with `--learning_rate 1.1e-3` differs from the baseline by 5e-4 (rel.) in the step-2
loss and by 1.8e-3 in the parameters; with `--seed 1` (other rows) by 1.6e-3 in the step-1 loss.

ZeRO-3 cases need `pip install deepspeed` (no compiled ops are used: the Trainer's torch AdamW runs inside ZeRO-3)
and are skipped without it; the configs themselves are checked against accelerate's schema either way.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from conftest import ACCELERATE_LAUNCH, ROOT, run_checked, run_here, train_script_command
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

CONFIG = "tiny_cpu_sp2.yaml"
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate_configs"
# Two steps of 2 rows each; constant lr and a clip norm below the measured grad norms (0.77 / 1.8) so that both
# steps move the weights and the engines' sharded gradient-norm clipping is exercised; a checkpoint at step 2 keeps
# trainer_state.json (model only: the parameters are compared on the final saved model).
COMMON = (
    "--build_toy_dataset", "8",
    "--max_steps", "2",
    "--lr_scheduler_type", "constant",
    "--warmup_steps", "0",
    "--max_grad_norm", "0.5",
    "--save_strategy", "steps",
    "--save_steps", "2",
    "--save_only_model", "true",
    "--adam_epsilon", "1e-6",
)  # fmt: skip
# Adam's epsilon 1e-6 instead of 1e-8: with 1e-8 an entry whose gradient is ~1e-8 moves by up to ±lr on a
# rounding-level gradient difference (Adam's step is ~g/|g|; measured 7e-6); 1e-6 bounds that amplification.
SINGLE = ("--sequence_parallel_size", "1", "--per_device_train_batch_size", "2")
# case: (loss overrides shared with its single-process baseline, layout of the 2 processes)
CASES = {
    "sp2": ((), ("--sequence_parallel_size", "2", "--per_device_train_batch_size", "2")),
    # the same split by Ulysses (all-to-all over heads) instead of the ring
    "ulysses2": ((), ("--sequence_parallel_size", "2", "--ulysses_degree", "2", "--per_device_train_batch_size", "2")),
    # preference term only: the NLL is a token mean over each rank's own rows (as under DDP), which for rows of
    # different lengths is not the token mean over the whole batch; LongPO's preference loss is a mean over rows
    "dp2_sp1": (
        ("--nll_weight", "0", "--dpo_weight", "1"),
        ("--sequence_parallel_size", "1", "--per_device_train_batch_size", "1"),
    ),
}
# engine: (shipped accelerate config, fields changed for 2 CPU processes in fp32, training overrides, report pattern)
ENGINES = {
    # the tiny model is a Mistral: each MistralDecoderLayer is its own FSDP unit, as in the shipped config
    "fsdp2": (
        "fsdp2.yaml",
        {"use_cpu": "true", "num_processes": "2", "mixed_precision": '"no"'},
        (),
        r"FSDP2 rank (\d): (\d+)/(\d+) parameters sharded",
    ),
    # use_cpu stays false (accelerate config and training config): with it accelerate skips DeepSpeed and runs
    # DDP; without it DeepSpeed sets up the process group itself, on its CPU accelerator with gloo (`ddp_backend`)
    "zero3": (
        "deepspeed_zero3.yaml",
        {"num_processes": "2", "mixed_precision": '"no"'},
        ("--use_cpu", "false", "--ddp_backend", "gloo"),
        r"DeepSpeed rank (\d): ZeRO stage 3, (\d+)/(\d+) parameters sharded",
    ),
}
LOG_RTOL = 2e-5
PARAM_ATOL = 1e-6


def cpu_config(name: str, changes: dict[str, str], path):
    """A shipped accelerate config with `changes` applied to its top-level fields; every other field as shipped."""
    text = (ACCELERATE_CONFIGS / name).read_text()
    for key, value in changes.items():
        text, n = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text)
    return path


def run(workdir, name, *overrides, launcher=()):
    """The script under `launcher` in new processes, or without one (the baselines) in this process."""
    out = workdir / name
    command = train_script_command(workdir, CONFIG, out, *COMMON, *overrides, launcher=launcher)
    result = run_checked(command, workdir) if launcher else run_here(command, workdir)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [(e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]
    return result, logs, load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Holds the tiny model and toy rows (written by the first run, loaded by the others) and every run's output."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def single_process(workdir):
    """One process (this one), sp = 1, batch 2: the baseline for a loss setting, run once per setting."""
    runs = {}

    def baseline(loss):
        if loss not in runs:
            runs[loss] = run(workdir, f"single{len(runs)}", *loss, *SINGLE)[1:]
        return runs[loss]

    return baseline


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_on_two_cpu_processes_equals_single_process(workdir, single_process, engine, case):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (`pip install deepspeed`)")
    if engine == "zero3" and case == "ulysses2":
        pytest.skip("the attention layout is engine-independent: Ulysses is launched once, with FSDP2")
    config, changes, engine_overrides, report = ENGINES[engine]
    loss, layout = CASES[case]
    base_logs, base_params = single_process(loss)
    accelerate_config = cpu_config(config, changes, workdir / f"{engine}-{case}.yaml")
    launcher = (*ACCELERATE_LAUNCH, "--config_file", str(accelerate_config), str(ROOT / "tests" / "accelerate_cpu.py"))
    result, logs, params = run(workdir, f"{engine}-{case}", *loss, *layout, *engine_overrides, launcher=launcher)
    # the engine really ran (not a DDP fallback): every parameter of the trained model sharded, on both ranks
    sharded = re.findall(report, result.stdout)
    assert {rank for rank, _, _ in sharded} == {"0", "1"}, result.stdout[-2000:]
    assert all(n == total == str(len(base_params)) for _, n, total in sharded), sharded

    assert len(logs) == len(base_logs) == 2
    for step, ((step_loss, norm), (base_loss, base_norm)) in enumerate(zip(logs, base_logs), start=1):
        assert step_loss == pytest.approx(base_loss, rel=LOG_RTOL), f"step {step} loss"
        assert norm == pytest.approx(base_norm, rel=LOG_RTOL), f"step {step} grad_norm"
    assert min(norm for _, norm in base_logs) > 0.5  # clipping was active (grad_norm is logged before clipping)
    assert params.keys() == base_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, base_params[name], rtol=0, atol=PARAM_ATOL, msg=name)
    if case == "sp2":  # share_prompt (the default) under SP: tree attention over all-gathered K/V, said once per rank
        assert result.stderr.count("share_prompt=True under sequence parallelism") == 2
        saved = AutoModelForCausalLM.from_pretrained(workdir / f"{engine}-{case}")
        assert saved.config._attn_implementation not in ("ring_attention", "tree_attention")  # loads as usual
        assert torch.isfinite(saved(torch.tensor([[1, 5, 9, 13, 2]])).logits).all()


@pytest.mark.parametrize(
    "name, distributed_type, machines",
    [("deepspeed_zero3.yaml", "DEEPSPEED", 1), ("multi_node_zero3.yaml", "DEEPSPEED", 2), ("fsdp2.yaml", "FSDP", 1)],
)
def test_accelerate_configs_parse(name, distributed_type, machines):
    """accelerate parses each shipped config (unknown top-level keys are an error there) and knows every engine
    option as a launch option; checked without DeepSpeed installed."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert config.distributed_type.value == distributed_type
    assert (config.num_machines, config.num_processes) == (machines, 8 * machines)
    assert config.mixed_precision == "bf16" and not config.use_cpu
    engine_options = {**config.deepspeed_config, **config.fsdp_config}
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
        assert not config.fsdp_config
    else:
        assert config.fsdp_config["fsdp_version"] == 2 and not config.deepspeed_config
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_model writes a normal checkpoint
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(engine_options) <= launch_options, set(engine_options) - launch_options


def test_models_found_inside_an_engine_with_its_own_config(tiny_model):
    """A DeepSpeed engine (TRL's ZeRO-3 reference model) has a `config` of its own (a dict) and the model at
    `.module`: the model checks must reach the transformers model (a ZeRO-3 run failed there); without deepspeed."""
    from trl_longpo.attention import check_attention_model
    from trl_longpo.modeling import base_model

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    engine = Engine(tiny_model)
    assert base_model(engine) is tiny_model
    check_attention_model(engine)  # reads the model's heads / sliding window, not the engine's dict
    from trl_longpo import LongPOConfig
    from trl_longpo.checks import check_model

    # TRL wraps a ZeRO-3 reference in an engine before LongPOTrainer checks it (issue 19: refused as "a DeepSpeedEngine")
    check_model(engine, LongPOConfig(output_dir="unused", report_to="none"), "reference model", split=False)
