"""`RetentionCallback`: long-context probe accuracy and short-context drift, logged while LongPO trains.

Logged through `trainer.log` (so to `report_to` and `trainer_state.json`) before training (step 0), every
`retention_eval_steps` steps and at the end:
    eval_long/acc@{L}        greedy retrieval accuracy on the probes of L tokens, for each L in retention_probe_lengths
    eval_short/acc@{min L}   the same at the shortest length (short-context probe accuracy)
    eval_short/logp_drift    answer log-prob drift of the policy against the reference on held-out short prompts
    eval_short/kl            KL(policy || reference) per answer token on the same prompts

Distributed runs (DDP, FSDP, ZeRO-3, sequence parallelism): every rank runs every probe UNSPLIT, on the same inputs,
with the model's plain attention (ring attention is switched off for the probes and back on after), and decodes a
fixed number of tokens, so collective engines stay in lockstep. The ranks' numbers are equal; rank 0's are broadcast
and logged.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from trl_longpo.attention.patching import original_attention
from trl_longpo.evaluation.probes import build_retrieval_probes
from trl_longpo.evaluation.retention import (
    evaluate_retrieval,
    reference_answer_log_probs,
    short_retention_metrics,
    short_retention_rows,
)

logger = logging.get_logger(__name__)


def load_retention_documents(path: str, text_column: str = "text") -> list[str]:
    """Haystack documents from a .txt/.jsonl file (or any source `trl-longpo generate --documents` reads)."""
    from trl_longpo.data.documents import load_documents_table

    table, column = load_documents_table(path, text_column, column_option="`retention_documents_text_column`")
    return [text for text in table[column] if isinstance(text, str) and text.strip()]


def _max_positions(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


class RetentionCallback(TrainerCallback):
    """Measures long-context retrieval and short-context retention of `trainer`'s policy (see the module doc)."""

    def __init__(self, trainer):
        args = trainer.args
        self.trainer = trainer
        self.every = args.retention_eval_steps
        self.lengths = sorted(args.retention_probe_lengths)
        self.max_new_tokens = args.retention_max_new_tokens
        policy = trainer.accelerator.unwrap_model(trainer.model)
        max_positions = _max_positions(policy)
        too_long = [n for n in self.lengths if max_positions is not None and n > max_positions]
        if too_long and args.policy_rope_theta is None:
            raise ValueError(
                f"`retention_probe_lengths` {too_long} exceed the model's max_position_embeddings ({max_positions}). "
                "Lower them, or set `policy_rope_theta` to extend the policy's context first."
            )
        self.tokenizer = trainer._tokenizer
        documents = None
        if args.retention_documents:
            documents = load_retention_documents(args.retention_documents, args.retention_documents_text_column)
        self.probes = build_retrieval_probes(
            self.tokenizer, self.lengths, args.retention_probes_per_length, documents=documents, seed=args.seed
        )
        self.rows = self._held_out_rows(trainer, args.retention_short_samples, args.seed)
        self.reference_log_probs = self._reference_scores_if_dropped(trainer)
        self._last_step = None

    def _reference_scores_if_dropped(self, trainer) -> list | None:
        """With `precompute_ref_log_probs=True` and no `ref_model` (nor PEFT), DPOTrainer keeps no reference during
        training; scoring "the reference" then would score the policy against itself (KL and drift exactly 0). The
        policy is still the initial model here (a resume loads its checkpoint later, in `train`), so the reference
        side of the short-retention rows is scored now, once, and kept on the CPU."""
        from accelerate.utils import is_peft_model

        if trainer.ref_model is not None or is_peft_model(trainer.model):
            return None
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "Retention monitoring (`retention_eval_steps`) with `precompute_ref_log_probs=True` under DeepSpeed or "
                "FSDP: the reference model is dropped after the precompute and the policy is not gathered yet, so "
                "short-context KL and drift cannot be measured against it. Pass `ref_model` (kept for the metrics), "
                "use PEFT (the reference is the policy without adapters), or set `precompute_ref_log_probs=False`."
            )
        model = trainer.model
        with original_attention(model), trainer.accelerator.autocast():
            scores = reference_answer_log_probs(
                model, self.tokenizer, self.rows, reference_context=lambda: trainer.reference_context(model)
            )
        size = sum(t.numel() * t.element_size() for t in scores)
        logger.info(
            f"precompute_ref_log_probs: the reference log-probs of {len(scores)} short-retention rows are kept on the "
            f"CPU ({size / 2**20:.1f} MiB) for eval_short/kl and eval_short/logp_drift."
        )
        return scores

    @staticmethod
    def _held_out_rows(trainer, n: int, seed: int) -> list[dict]:
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        if dataset is None:
            logger.warning(
                "No eval_dataset: the short-retention prompts are taken from the training rows, so they are not held "
                "out. Pass an eval_dataset for held-out short prompts."
            )
            dataset = trainer.train_dataset
        return short_retention_rows(dataset, n, seed)

    def measure(self) -> dict[str, float]:
        """All retention metrics now (every rank must call this together in a distributed run)."""
        trainer = self.trainer
        policy = trainer.model
        reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
        with original_attention(policy, reference), trainer.accelerator.autocast():
            accuracy = evaluate_retrieval(policy, self.tokenizer, self.probes, max_new_tokens=self.max_new_tokens)
            short = short_retention_metrics(
                policy,
                reference,
                self.tokenizer,
                self.rows,
                reference_context=lambda: trainer.reference_context(reference),
                reference_log_probs=self.reference_log_probs,
            )
        metrics = {f"eval_long/acc@{n}": accuracy[n] for n in self.lengths}
        metrics[f"eval_short/acc@{self.lengths[0]}"] = accuracy[self.lengths[0]]
        metrics["eval_short/logp_drift"] = short["logp_drift"]
        metrics["eval_short/kl"] = short["kl"]
        return _from_rank_zero(metrics)

    def _log(self, state, control) -> None:
        if self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        should_log = control.should_log  # logging resets it, which would swallow this step's training log
        # transformers' Trainer.log, not DPOTrainer's: that one would merge (and clear) the training metrics
        # accumulated since the last logging step into this entry
        Trainer.log(self.trainer, self.measure())
        control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):
        self._log(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._log(state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self._log(state, control)


def _from_rank_zero(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's numbers on every rank (they are equal; this makes every rank's log history identical)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    values = [metrics]
    dist.broadcast_object_list(values, src=0)
    return values[0]
