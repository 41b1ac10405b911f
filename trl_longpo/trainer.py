"""`LongPOTrainer`: TRL's DPOTrainer with the short-to-long reference and the NLL term of LongPO."""

from __future__ import annotations

import contextlib
import copy
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin, TrainerCallback
from transformers.utils import logging
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from .attention.patching import original_attention
from .checkpoints import DataFingerprintCallback, check_resume_data, data_fingerprint, resolve_checkpoint
from .checks import check_model, check_run
from .collator import DataCollatorForLongPO
from .config import LongPOConfig
from .modeling import restored_rope, set_rope_theta
from .reference_cache import check_cache_file, reference_config_key
from .scoring import RowScorer, RowSums
from .tokenization import TOKENIZED_COLUMNS, LongPODataError, check_columns
from .validation import EmptyEpochGuard, check_not_empty, check_pairs, enforce_max_length, prepare_row

logger = logging.get_logger(__name__)


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


class LongPOTrainer(DPOTrainer):
    r"""
    Trainer for LongPO: Long Context Self-Evolution through Short-to-Long Preference Optimization
    ([arXiv 2502.13922](https://huggingface.co/papers/2502.13922)).

    Same constructor as [`~trl.DPOTrainer`]. Each row holds a long `prompt` (document + instruction), a
    `short_prompt` (the chunk the chosen answer came from + the same instruction), a `chosen` answer (generated from
    the short prompt) and a `rejected` answer (generated from the long prompt). The policy is scored on the long
    prompt, the frozen reference (`ref_model`, or the initial model) on the short prompt:

        r_w = log πθ(chosen | long) − log πref(chosen | short),  r_l likewise for `rejected`
        loss = nll_weight · NLL(chosen long sequence) + dpo_weight · (−log σ(β (r_w − r_l)))

    With `short_prompt == prompt` and `nll_weight=0` this is exactly DPOTrainer's sigmoid loss.

    Example:

    ```python
    from datasets import Dataset
    from trl_longpo import LongPOConfig, LongPOTrainer
    from trl_longpo.tiny import build_tiny_model, build_tiny_tokenizer

    doc = "Chapter one. The cat sat on the mat.\n\nChapter two. The dog slept."
    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": doc + "\n\nWhere did the cat sit?"}],
        "short_prompt": [{"role": "user", "content": "Chapter one. The cat sat on the mat.\n\nWhere did the cat sit?"}],
        "chosen": [{"role": "assistant", "content": "On the mat."}],
        "rejected": [{"role": "assistant", "content": "On the dog."}],
    }] * 4)
    trainer = LongPOTrainer(
        model=build_tiny_model(),
        args=LongPOConfig(output_dir="longpo-tiny", max_steps=2, per_device_train_batch_size=2, report_to="none"),
        train_dataset=dataset,
        processing_class=build_tiny_tokenizer(),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "longpo"]
    _name = "LongPO"
    _paper = {
        "title": "LongPO: Long Context Self-Evolution of Large Language Models through Short-to-Long Preference "
        "Optimization",
        "id": "2502.13922",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{chen2025longpo,
                title        = {{LongPO: Long Context Self-Evolution of Large Language Models through Short-to-Long Preference Optimization}},
                author       = {Guanzheng Chen and Xin Li and Michael Qizhe Shieh and Lidong Bing},
                year         = 2025,
                booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
                url          = {https://openreview.net/forum?id=qTrEq31Shm},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: LongPOConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config) or "model"
            args = LongPOConfig(f"{name.split('/')[-1]}-LongPO")
        elif not isinstance(args, LongPOConfig):
            raise TypeError(
                f"`args` must be a `LongPOConfig`, got {type(args).__name__}. LongPOConfig accepts every DPOConfig field."
            )
        self._reference_rope = None  # set below with `policy_rope_theta`; read by the precompute pass in super()
        # The scorers of the unsplit layout: DPOTrainer's precompute pass (in super().__init__) runs unsplit
        self.scorer = self.reference_scorer = RowScorer(share_prompt=args.share_prompt)
        check_not_empty(train_dataset, "train")
        self._data_fingerprint = data_fingerprint(train_dataset, args)  # recorded in checkpoints, checked on resume
        self._reference_cache_keyed = False
        for name, dataset in _eval_datasets(eval_dataset):
            check_not_empty(dataset, name)
        reference_is_policy = ref_model is None and (
            peft_config is not None or (not isinstance(model, str) and _is_peft_model(model))
        )
        if not isinstance(model, str):
            check_model(model, args, "model", split=args.sequence_parallel_size > 1)
            if ref_model is None and not reference_is_policy and not args.precompute_ref_log_probs:
                # The reference is the frozen initial model. DPOTrainer reloads it from `config._name_or_path`, which
                # fails for models built in memory and misses in-memory edits; a copy taken now is exact.
                ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if ref_model is not None:
            ring_reference = args.sequence_parallel_size > 1 and args.sequence_parallel_reference == "ring"
            check_model(ref_model, args, "reference model", split=ring_reference)
        check_run(args, train_dataset, reference_is_policy)

        if processing_class is None:
            source = model if isinstance(model, str) else get_config_model_id(model.config)
            revision = (
                (args.model_init_kwargs or {}).get("revision") if isinstance(args.model_init_kwargs, dict) else None
            )
            processing_class = AutoProcessor.from_pretrained(
                source, revision=revision, trust_remote_code=args.trust_remote_code
            )
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if data_collator is None:
            data_collator = DataCollatorForLongPO(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of
            )

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if isinstance(model, str):  # loaded by DPOTrainer (with the reference, when it made one): checked now
            check_model(self.model, args, "model", split=args.sequence_parallel_size > 1)
            if self.ref_model is not None and ref_model is None:
                ring_reference = args.sequence_parallel_size > 1 and args.sequence_parallel_reference == "ring"
                check_model(self.ref_model, args, "reference model", split=ring_reference)

        # RoPE θ changes only after DPOTrainer built (and, if asked, precomputed) the reference with the original θ
        if args.policy_rope_theta is not None:
            saved = set_rope_theta(self.model, args.policy_rope_theta)
            # Through a PEFT policy with adapters disabled, the reference pass must see the original frequencies
            self._reference_rope = saved if self.ref_model is None else None
            logger.info(f"Policy RoPE theta set to {args.policy_rope_theta:g}; the reference keeps its original θ.")

        if (args.share_prompt or args.sequence_parallel_size > 1) and self.aux_loss_enabled:
            raise ValueError(
                "The MoE router auxiliary loss needs `share_prompt=False` and no sequence parallelism (it would be "
                "computed over packed tokens, with the prompt once or split over ranks, and differ from the padded "
                "loss). Set `router_aux_loss_coef=0` (no auxiliary loss; the packed loss then equals the padded one "
                "exactly), or `share_prompt=False` (and `sequence_parallel_size=1`)."
            )
        if args.sequence_parallel_size > 1:
            self._setup_sequence_parallel(args)
        if isinstance(train_dataset, IterableDataset):
            self.add_callback(EmptyEpochGuard())
        self.add_callback(DataFingerprintCallback(self._data_fingerprint))
        if args.retention_eval_steps > 0:
            from .evaluation import RetentionCallback

            self.add_callback(RetentionCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """`Trainer.train`, with `resume_from_checkpoint` True/"True"/"latest" meaning the newest complete checkpoint
        in `output_dir` and the chosen checkpoint's files checked first (see `trl_longpo.checkpoints`)."""
        checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            check_resume_data(checkpoint, self._data_fingerprint)
        self._log_global_batch()
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.scorer.step_attention(self.model, self.ref_model):  # the packed attention through backward
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self.scorer.step_attention(self.model, self.ref_model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _setup_sequence_parallel(self, args: LongPOConfig) -> None:
        """Build the dp x sp mesh, choose the split scorers and switch the models that run split (for the run)."""
        from .sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh

        mesh = init_sequence_parallel_mesh(
            args.sequence_parallel_size, device_type=self.accelerator.device.type, ulysses_degree=args.ulysses_degree
        )
        sp = SequenceParallelContext(
            mesh,
            ring_attn_impl=args.ring_attn_impl,
            heads_k_stride=args.ring_heads_k_stride,
            allow_sliding_window=args.ring_ignore_sliding_window,
        )
        pad = self._tokenizer.pad_token_id
        self.scorer = RowScorer(share_prompt=args.share_prompt, sp=sp, pad_token_id=pad)
        sp.prepare_model(self.model, self.scorer.attention_name)
        if args.sequence_parallel_reference == "ring":
            self.reference_scorer = self.scorer
            if self.ref_model is not None:
                sp.prepare_model(self.ref_model, self.scorer.attention_name)
        logger.info(
            f"Sequence parallelism: {mesh.dp_size} data-parallel group(s) × {mesh.sp_size} ranks (Ulysses "
            f"{mesh.ulysses_size} × ring {mesh.ring_size}), ring '{args.ring_attn_impl}', reference "
            f"'{args.sequence_parallel_reference}'."
        )
        if args.share_prompt and mesh.ring_size > 1:
            # Said at warning level because it changes the communication pattern the user configured
            logger.warning(
                f"share_prompt=True under sequence parallelism: each layer brings every ring rank's K/V to every rank "
                "(broadcast one shard at a time, the bytes of an all-gather) and runs tree attention on its own "
                f"queries (ring_attn_impl='{args.ring_attn_impl}' keeps its token layout, "
                "but K/V do not travel by the P2P ring: a ring step's key block would cut across branches). Set "
                "share_prompt=False for ring-flash-attn's ring schedule."
            )

    def _log_global_batch(self) -> None:
        """Say once, at start, how many pairs one optimizer step sees (the paper's is 8). At warning level because it
        is the setting most easily got wrong: it grows with the number of GPUs, except those an SP group shares."""
        args, mesh = self.args, self.scorer.sp.mesh if self.scorer.sp is not None else None
        sp, dp = (mesh.sp_size, mesh.dp_size) if mesh is not None else (1, args.world_size)
        if self.is_world_process_zero():
            logger.warning(
                f"Global batch: {self.get_total_train_batch_size(args)} pairs per optimizer step = per-device "
                f"{self._train_batch_size} × accumulation {args.gradient_accumulation_steps} × data-parallel {dp}"
                + (f" (each row split over an SP group of {sp} ranks)" if sp > 1 else "")
                + "; the paper trains with 8."
            )

    def get_total_train_batch_size(self, args) -> int:
        # An SP group reads one batch: the effective batch counts dp groups, not ranks. (Trainer's own `get_sp_size`
        # is for accelerate's SP dataloader adapter, which we do not use: our dataloader is already dp-sharded.)
        dp_size = self.scorer.sp.mesh.dp_size if self.scorer.sp is not None else args.world_size
        return self._train_batch_size * args.gradient_accumulation_steps * dp_size // self.get_tp_size()

    def _get_dataloader(self, dataset, description, batch_size, *args, **kwargs):
        dataloader = super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)
        if self.scorer.sp is not None:  # the ranks of an SP group read the same batch
            dataloader = self.scorer.sp.shard_dataloader(dataloader, description)
        return dataloader

    # ----------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        column_names = dataset.column_names
        if column_names is not None and all(c in column_names for c in TOKENIZED_COLUMNS):
            return dataset  # already prepared (DPOTrainer's `evaluate` calls this again)
        check_columns(column_names, dataset_name)
        map_kwargs = {}
        if isinstance(dataset, Dataset):  # IterableDataset.map supports neither num_proc nor desc
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {dataset_name} dataset"}
        with global_then_local_main_first():
            dataset = dataset.map(
                prepare_row,
                with_indices=True,
                fn_kwargs={"processing_class": processing_class, "eos_token": self._tokenizer.eos_token},
                **map_kwargs,
            )
            if args.max_length is not None:
                dataset = enforce_max_length(dataset, args, dataset_name)
            check_pairs(dataset, dataset_name, args.dataset_num_proc)
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise LongPODataError(
                f"truncation_mode='drop' removed every row of the {dataset_name} dataset (all are longer than "
                f"max_length={args.max_length} tokens); raise `max_length` or set it to None."
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]

    # -------------------------------------------------------------------------------------------- scoring
    @contextlib.contextmanager
    def reference_context(self, model):
        """Makes a forward through `model` a reference forward: with PEFT and no `ref_model`, the policy with its
        adapters disabled and its original RoPE θ (when `policy_rope_theta` changed it). Nothing for a separate
        reference model. Shared by the loss and the retention callback, so both score the same reference."""
        with contextlib.ExitStack() as stack:
            if self.ref_model is None and _is_peft_model(self.model):
                # Same as DPOTrainer: a new adapter is disabled, an existing one was copied to the "ref" adapter
                unwrapped = self.accelerator.unwrap_model(self.model)
                stack.enter_context(
                    use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
                )
            stack.enter_context(restored_rope(self._reference_rope if model is self.model else None))
            yield

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of each row's answers on its SHORT prompt(s), summed over turns. Sequence k (chosen,
        turn t) shares its short prompt with sequence k + n/2 (rejected)."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.reference_context(model),
            self.accelerator.autocast(),
        ):
            lengths = inputs["ref_prompt_length"].tolist()
            sums = self.reference_scorer.row_sums(
                model,
                inputs["ref_input_ids"],
                inputs["ref_attention_mask"],
                [inputs["ref_completion_mask"]],
                prompt_lengths=lengths[: len(lengths) // 2],
            ).sums
        rows = sums.new_zeros(inputs["input_ids"].size(0))
        rows.index_add_(0, inputs["ref_row_index"], sums[0, 0])
        return rows.chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """DPOTrainer's cached precompute, keyed on the reference config as well as its weights, and with a clear
        error for an unreadable cache file (`trl_longpo.reference_cache`)."""
        if not self._reference_cache_keyed:
            reference = self.accelerator.unwrap_model(self.ref_model if self.ref_model is not None else self.model)
            self._precompute_model_hash = reference_config_key(self._precompute_model_hash, reference)
            self._reference_cache_keyed = True
        check_cache_file(dataset, self._precompute_model_hash)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model, inputs):
        """Used by DPOTrainer's `precompute_ref_log_probs` pass: reference log-probs on the short prompts."""
        return self._reference_logps(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"].bool()
        batch_size = input_ids.size(0) // 2

        # Token sets scored in the one policy forward: the answers of both halves (preference term) and, for the
        # sequence-scope NLL, every token of the chosen long sequences.
        use_nll = args.nll_weight > 0
        nll_mask = completion_mask.clone()
        nll_mask[batch_size:] = False
        if use_nll and args.nll_scope == "sequence":
            nll_mask[:batch_size] = attention_mask[:batch_size].bool()
        scored: RowSums = self.scorer.row_sums(
            model,
            input_ids,
            attention_mask,
            [completion_mask | nll_mask, completion_mask, nll_mask],
            fields=("log_probs", "entropy", "is_top1"),
            prompt_lengths=inputs["prompt_length"].tolist(),
            **({"output_router_logits": True} if self.aux_loss_enabled else {}),
        )
        sums, counts = scored.sums, scored.counts
        chosen_logps, rejected_logps = sums[0, 1].chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self._reference_logps(ref_model, inputs)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps)
        ref_rejected_logps = ref_rejected_logps.to(rejected_logps)

        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        longpo_loss = (-F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))).mean()
        loss = args.dpo_weight * longpo_loss
        nll_loss = None
        if use_nll:  # token mean over the batch, like TRL's "sft" term
            nll_loss = -sums[0, 2].sum() / counts[2].sum().clamp(min=1)
            loss = loss + args.nll_weight * nll_loss
        if scored.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * scored.aux_loss
            self._metrics[mode]["aux_loss"].append(self._gather(scored.aux_loss.detach()).mean().item())

        logps = {"chosen": chosen_logps, "rejected": rejected_logps}
        logps.update(ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps)
        answers = {"entropy": sums[1, 1, :batch_size].sum(), "top1": sums[2, 1, :batch_size].sum()}
        self._log_metrics(mode, inputs, logps, longpo_loss, nll_loss, answers, counts[1, :batch_size].sum())
        if return_outputs:
            # The fused LM head builds no logits; `compute_metrics` users get them from a plain forward
            with torch.no_grad(), original_attention(model):
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return loss, outputs
        return loss

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather a metric across data-parallel ranks (under SP, over the dp axis only)."""
        if self.scorer.sp is not None:
            return self.scorer.sp.gather_metric(tensor)
        return self.accelerator.gather_for_metrics(tensor)

    def _log_metrics(self, mode, inputs, logps: dict, longpo_loss, nll_loss, answers: dict, answer_tokens) -> None:
        gather = self._gather
        metrics = self._metrics[mode]
        chosen_rewards = self.beta * (logps["chosen"] - logps["ref_chosen"]).detach()
        rejected_rewards = self.beta * (logps["rejected"] - logps["ref_rejected"]).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        for name, value in logps.items():
            metrics[f"logps/{name}"].append(gather(value.detach()).mean().item())
        metrics["longpo_loss"].append(gather(longpo_loss.detach()).mean().item())
        if nll_loss is not None:
            metrics["nll_loss"].append(gather(nll_loss.detach()).mean().item())
        # Entropy and top-1 accuracy over the chosen answer tokens, token-weighted across ranks
        tokens = gather(answer_tokens).sum()
        for key, name in (("entropy", "entropy"), ("mean_token_accuracy", "top1")):
            metrics[key].append((gather(answers[name]).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]


def _eval_datasets(eval_dataset) -> list[tuple[str, Dataset | IterableDataset]]:
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval ({key!r})", dataset) for key, dataset in eval_dataset.items()]
    return [("eval", eval_dataset)]
