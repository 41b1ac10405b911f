"""Shared fixtures: an offline tiny Mistral model/tokenizer and small LongPO rows built from Python's help texts."""

from __future__ import annotations

import copy
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
# pytest-xdist: one worker per core (`pytest_xdist_auto_num_workers`), so each worker gets its share of the cores
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), CORES // WORKERS)))

ROOT = Path(__file__).resolve().parents[1]
# `accelerate launch` as a module of this interpreter; port 0: the launcher picks a free one
ACCELERATE_LAUNCH = ("-m", "accelerate.commands.launch", "--main_process_port", "0")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml): one worker per core, at most 4 (every worker imports torch and builds models, and
    the multi-process tests start up to 4 ranks each). None (the tests run in this process) on one core, or when
    test files are named (`pytest tests/test_x.py -k name`: a few tests gain nothing from workers that each import
    torch); `-n 2` forces workers."""
    if CORES < 2 or any(Path(arg.split("::")[0]).is_file() for arg in config.args):
        return 0
    return min(CORES, 4)


def pytest_collection_modifyitems(config, items) -> None:
    """Modules with a `slow` test first, otherwise in the usual order: xdist (`--dist loadscope`) hands whole modules
    to the workers in this order, so the long ones start first and the many short ones even out the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def tokenizer():
    from trl_longpo.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    from trl_longpo.tiny import build_tiny_model

    return build_tiny_model(seed=0)


def wide_tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> torch.nn.Module:
    """The tiny Mistral with a wider init (0.2 instead of 0.02), fp64 by default: with 0.02 its outputs are nearly
    uniform and barely depend on positions or context, which would make parity checks (and their negative controls)
    weak. A plain function, so that the ranks of multi-process tests build it too."""
    from trl_longpo.tiny import build_tiny_model

    return build_tiny_model(seed=seed, initializer_range=0.2, **kwargs).to(dtype)


@pytest.fixture
def wide_model():
    return wide_tiny_model()


def dense_attention(q, k, v, visible: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The one dense attention reference of the tests: textbook softmax attention, independent of every kernel.

    q (Sq, H, D), k/v (Sk, Hk, D) (GQA: kv heads repeated), `visible` (Sq, Sk) bool -> out (Sq, H, D) and lse
    (H, Sq), with flash-attn's convention for a row without a visible key: out 0, lse +inf. Differentiable.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1).nan_to_num(0.0), v)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def _texts(n: int, start: int = 0, chars: int = 400) -> list[str]:
    from trl_longpo.data.documents import corpus_texts

    texts = corpus_texts()
    return [texts[(start + i) % len(texts)][:chars] for i in range(n)]


def make_rows(n: int = 4, conversational: bool = True, short_equals_long: bool = False, seed: int = 0) -> list[dict]:
    """LongPO rows of varied lengths: long prompt = 3 passages + question; short = the answer's passage + question."""
    rows = []
    for i in range(n):
        passages = _texts(3, start=seed * 7 + 3 * i, chars=150 + 40 * i)
        question = f"Question {i}: what does passage {i % 3} describe?"
        long_text = "\n\n".join(passages) + "\n\n" + question
        short_text = long_text if short_equals_long else passages[i % 3] + "\n\n" + question
        chosen = f"It describes {passages[i % 3][: 20 + 5 * i].strip()}."
        rejected = f"Passage {i} is about something else {'entirely ' * (i + 1)}"
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": long_text}],
                    "short_prompt": [{"role": "user", "content": short_text}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append(
                {"prompt": long_text, "short_prompt": short_text, "chosen": " " + chosen, "rejected": " " + rejected}
            )
    return rows


def make_two_turn_row(seed: int = 0) -> dict:
    p = _texts(4, start=seed, chars=200)
    q1, q2 = "What is the first topic about?", "And the second one?"
    doc = "\n\n".join(p)
    return {
        "prompt": [{"role": "user", "content": doc + "\n\n" + q1}],
        "short_prompt": [
            [{"role": "user", "content": p[0] + "\n\n" + q1}],
            [{"role": "user", "content": p[2] + "\n\n" + q2}],
        ],
        "chosen": [
            {"role": "assistant", "content": "The first is about " + p[0][:30]},
            {"role": "user", "content": q2},
            {"role": "assistant", "content": "The second is about " + p[2][:25]},
        ],
        "rejected": [
            {"role": "assistant", "content": "No idea."},
            {"role": "user", "content": q2},
            {"role": "assistant", "content": "Probably " + p[1][:15]},
        ],
    }


def longpo_args(tmp_path, **overrides):
    from trl_longpo import LongPOConfig

    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        per_device_train_batch_size=4,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    defaults.update(overrides)
    return LongPOConfig(**defaults)


def clone(model):
    return copy.deepcopy(model)


def perturbed(model, scale: float = 0.02, seed: int = 0):
    """A copy of `model` with noise on every weight: a policy that differs from its reference."""
    policy = clone(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return policy


def train_script_command(workdir, config: str, output_dir, *overrides: str, launcher=()) -> list[str]:
    """`examples/train_mistral.py --config examples/configs/CONFIG` on the tiny model and toy rows in `workdir`.

    The configs set `build_tiny_model` / `build_toy_dataset`, so the first run writes both there and later runs in
    the same `workdir` load the same model and rows. `launcher`: arguments between the interpreter and the script
    (e.g. `ACCELERATE_LAUNCH` plus its options); `overrides`: `--field value` pairs after the config.
    """
    return [
        sys.executable,
        *launcher,
        str(ROOT / "examples" / "train_mistral.py"),
        "--config",
        str(ROOT / "examples" / "configs" / config),
        "--model_name_or_path",
        str(Path(workdir) / "tiny-mistral"),
        "--dataset_name",
        str(Path(workdir) / "toy.jsonl"),
        "--output_dir",
        str(output_dir),
        *overrides,
    ]


def run_checked(cmd: list[str], cwd, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run offline with 1 thread per process and this checkout's `trl_longpo` first; fail with the stderr tail."""
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_here(cmd: list[str], cwd) -> None:
    """`cmd` (`[python, script, *args]`, no launcher) run as `__main__` in this process with 1 torch thread, as
    `run_checked` would run it: the same script and arguments without ~8 CPU-s of imports in a new interpreter."""
    assert cmd[0] == sys.executable and cmd[1].endswith(".py"), cmd
    argv, threads, cwd_before = sys.argv, torch.get_num_threads(), os.getcwd()
    sys.argv = cmd[1:]
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        runpy.run_path(cmd[1], run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        os.chdir(cwd_before)
