"""LongPOTrainer under sequence parallelism equals the unsplit trainer (issue 3, test 1 at the trainer level).

Each spawned world (2 or 4 gloo ranks, fp64 tiny Mistral) builds LongPOTrainer with `sequence_parallel_size` = sp for
both ring implementations, feeds every dp group its own rows (single- and multi-turn mixed), and reports the loss,
the logged metrics and the parameter gradients averaged over the world (what DDP / FSDP / ZeRO apply). The parent
computes the same quantities with the ordinary unsplit trainer, one dp group's rows at a time, and compares.
"""

from __future__ import annotations

import copy
import hashlib
import traceback
from pathlib import Path

import pytest
import torch
from conftest import make_rows, make_two_turn_row, wide_tiny_model
from datasets import Dataset, load_from_disk
from distributed import init_rank, launch, write_result

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROWS_PER_GROUP = 2
REL_TOL = 1e-5
# name: (ring implementation, extra LongPOConfig options). Shared prompt (the default) and the two-sequence layout
# (ring-flash-attn's ring schedule) are both compared with the unsplit UNSHARED trainer.
SCENARIOS = {
    "zigzag": ("zigzag", {}),
    "llama3": ("llama3", {}),
    "zigzag_local_reference": ("zigzag", {"sequence_parallel_reference": "local"}),
    "llama3_precomputed_reference": ("llama3", {"precompute_ref_log_probs": True}),
    "zigzag_unshared": ("zigzag", {"share_prompt": False}),
    "llama3_unshared": ("llama3", {"share_prompt": False}),
    # Ulysses degree 2: pure Ulysses at sp 2, hybrid 2 x 2 (zigzag ring across) at sp 4, dp 2 x Ulysses 2
    "ulysses": ("zigzag", {"ulysses_degree": 2}),
    "ulysses_unshared": ("zigzag", {"ulysses_degree": 2, "share_prompt": False}),
    "ulysses_qwen_ratio": ("llama3", {"ulysses_degree": 2}),
}
# Qwen2.5-7B's head ratio, 28 query / 4 KV heads (head_dim 8): what caps Ulysses in LongPO's own tracker
MODEL_KWARGS = {"ulysses_qwen_ratio": {"hidden_size": 224, "num_heads": 28, "num_kv_heads": 4}}
TOKEN_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")
LOSS_METRICS = (
    "longpo_loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
    "rewards/accuracies",
)


def _rows(dp_size: int) -> list[dict]:
    """dp_size × ROWS_PER_GROUP rows; each group gets a single-turn and a two-turn row."""
    rows = []
    for g in range(dp_size):
        single = make_rows(1, seed=g + 3)[0]
        rows += [dict(single, short_prompt=[single["short_prompt"]]), make_two_turn_row(seed=g)]
    return rows


def _args(tmp, **overrides):
    from trl_longpo import LongPOConfig

    return LongPOConfig(
        output_dir=str(tmp),
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=ROWS_PER_GROUP,
        disable_tqdm=True,
        beta=0.5,
        dpo_weight=1.0,
        dataloader_num_workers=0,
        seed=0,
        **overrides,
    )


def _step(trainer, batch) -> tuple[float, dict, dict]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return loss.item(), metrics, grads


def _worker(
    rank: int, world_size: int, port: int, outdir: str, sp_size: int, tokenizer_dir: str, data_dir: str
) -> None:
    init_rank(rank, world_size, port)
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from trl_longpo import LongPOTrainer

    results = {}
    dp_rank = rank // sp_size
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # From disk: cache files (tokenization, precomputed reference) then live in one directory shared by the ranks
    dataset = load_from_disk(data_dir)
    for name, (impl, extra) in SCENARIOS.items():
        try:
            trainer = LongPOTrainer(
                model=wide_tiny_model(**MODEL_KWARGS.get(name, {})),
                args=_args(Path(outdir) / name, sequence_parallel_size=sp_size, ring_attn_impl=impl, **extra),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
            mine = range(dp_rank * ROWS_PER_GROUP, (dp_rank + 1) * ROWS_PER_GROUP)
            batch = trainer.data_collator([trainer.train_dataset[i] for i in mine])
            loss, metrics, grads = _step(trainer, batch)
            for param in sorted(grads):  # what DDP does: average over all dp × sp ranks
                dist.all_reduce(grads[param])
                grads[param] /= world_size
            torch.save(grads, Path(outdir) / f"grads_{name}_rank{rank}.pt")

            # Dataloader: the same batch on an SP group, different batches across dp groups; batch size counted once
            loader = trainer.get_train_dataloader()
            first = next(iter(loader))["input_ids"]
            digest = hashlib.sha1(first.numpy().tobytes()).hexdigest()
            digests = [None] * world_size
            dist.all_gather_object(digests, digest)

            # Negative control: a rank of the SP group fed a different row must be caught, on every rank
            wrong = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            if rank % sp_size == sp_size - 1:
                wrong["input_ids"][0, 3] = (wrong["input_ids"][0, 3] + 1) % len(tokenizer)
            try:
                trainer.compute_loss(trainer.model, wrong)
                caught = ""
            except RuntimeError as error:
                caught = str(error)
            results[name] = {
                "loss": loss,
                "metrics": metrics,
                "digests": digests,
                "num_batches": len(loader),
                "total_batch_size": trainer.get_total_train_batch_size(trainer.args),
                "caught": caught,
            }
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    write_result(outdir, rank, results)
    dist.destroy_process_group()


def _unsplit(tokenizer, dp_size: int, tmp_path, **model_kwargs) -> tuple[list[float], dict, dict]:
    """Per dp group: loss, metrics and gradients of the unsplit trainer; gradients averaged as DDP would."""
    from trl_longpo import LongPOTrainer

    dataset = Dataset.from_list(_rows(dp_size))
    trainer = LongPOTrainer(
        model=wide_tiny_model(**model_kwargs),
        args=_args(tmp_path / "unsplit", share_prompt=False),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    initial = copy.deepcopy(trainer.model.state_dict())
    losses, metrics, grads = [], [], {}
    for g in range(dp_size):
        trainer.model.load_state_dict(initial)
        batch = trainer.data_collator(
            [trainer.train_dataset[i] for i in range(g * ROWS_PER_GROUP, (g + 1) * ROWS_PER_GROUP)]
        )
        loss, m, gr = _step(trainer, batch)
        losses.append(loss)
        metrics.append(m)
        for name, value in gr.items():
            grads[name] = grads.get(name, 0) + value / dp_size
    averaged = {k: sum(m[k] for m in metrics) / dp_size for k in LOSS_METRICS}
    # Token-weighted metrics and token counts: all rows in one batch (tokens counted once, not once per SP rank)
    trainer._total_train_tokens = 0
    with torch.no_grad():
        trainer.compute_loss(
            trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        )
    averaged.update({k: trainer._metrics["train"][k][-1] for k in TOKEN_METRICS})
    return losses, averaged, grads


def _close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(b), scale)


def _metric_scale(key: str, metrics: dict) -> float:
    """TRL's fused LM head accumulates log-probs in fp32 by design, so a reward or margin (a difference of log-prob
    sums of ~|logps|) carries fp32 rounding of |logps|, not of itself: judge it relative to the sums it comes from."""
    if key.startswith("rewards/") and key != "rewards/accuracies":
        return 0.5 * max(
            abs(metrics[k]) for k in ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")
        )
    return 1.0


@pytest.mark.parametrize("world_size, sp_size", [(2, 2), (4, 4), (4, 2)], ids=["sp2", "sp4", "dp2xsp2"])
def test_trainer_split_equals_unsplit(tokenizer, tmp_path, world_size, sp_size):
    tokenizer.save_pretrained(tmp_path / "tok")
    dp_size = world_size // sp_size
    Dataset.from_list(_rows(dp_size)).save_to_disk(tmp_path / "data")
    per_rank = launch(
        _worker, world_size, tmp_path, args=(sp_size, str(tmp_path / "tok"), str(tmp_path / "data")), timeout=300
    )
    unsplit = {None: _unsplit(tokenizer, dp_size, tmp_path)}
    for name in SCENARIOS:
        if name in MODEL_KWARGS:
            unsplit[name] = _unsplit(tokenizer, dp_size, tmp_path / name, **MODEL_KWARGS[name])
        losses, metrics, grads = unsplit[name if name in MODEL_KWARGS else None]
        for rank, result in enumerate(per_rank):
            r = result[name]
            assert "error" not in r, f"{name} rank {rank}:\n{r['error']}"
            group = rank // sp_size
            assert _close(r["loss"], losses[group]), (name, rank, r["loss"], losses[group])
            for key in LOSS_METRICS + TOKEN_METRICS:
                assert _close(r["metrics"][key], metrics[key], _metric_scale(key, metrics)), (
                    name,
                    rank,
                    key,
                    r["metrics"][key],
                    metrics[key],
                )
            got = torch.load(tmp_path / f"grads_{name}_rank{rank}.pt")
            assert got.keys() == grads.keys() and len(got) > 10
            for param in grads:
                err = (got[param] - grads[param]).norm() / grads[param].norm().clamp(min=1e-12)
                assert err <= REL_TOL, (name, rank, param, err.item())
            # Data: an SP group reads one batch; dp groups read different ones; effective batch = bs × dp
            digests = r["digests"]
            assert all(digests[i] == digests[(i // sp_size) * sp_size] for i in range(world_size))
            if dp_size > 1:
                assert digests[0] != digests[sp_size]
            assert r["total_batch_size"] == ROWS_PER_GROUP * dp_size
            assert r["num_batches"] == 1
            assert "must hold the same batch" in r["caught"], r["caught"]
