"""`LongPOTrainer`: TRL's DPOTrainer with the short-to-long reference and the NLL term of LongPO."""

from __future__ import annotations

import contextlib
import copy
import os
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

from .attention.tree import attn_implementation
from .checkpoints import DataFingerprintCallback, check_resume_data, data_fingerprint, resolve_checkpoint
from .collator import DataCollatorForLongPO
from .config import LongPOConfig
from .modeling import base_model, check_causal_lm, restored_rope, row_sum_dtype, set_rope_theta
from .packing import pack_shared_prompts, packed_row_sums, pair_groups
from .reference_cache import check_cache_file, reference_config_key
from .tokenization import TOKENIZED_COLUMNS, LongPODataError, check_columns, row_lengths, tokenize_row
from .validation import EmptyEpochGuard, check_answer_tokens, check_not_empty, check_pairs, validate_row

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
        self._sp = None  # SequenceParallelContext, set after super().__init__ (the precompute pass runs unsplit)
        if args.use_liger_kernel:
            _check_liger_available()
        _check_launch(args)
        check_not_empty(train_dataset, "train")
        self._data_fingerprint = data_fingerprint(train_dataset, args)  # recorded in checkpoints, checked on resume
        self._reference_cache_keyed = False
        for name, dataset in _eval_datasets(eval_dataset):
            check_not_empty(dataset, name)
        if not isinstance(model, str):
            check_causal_lm(model)
            if (
                ref_model is None
                and peft_config is None
                and not _is_peft_model(model)
                and not args.precompute_ref_log_probs
            ):
                # The reference is the frozen initial model. DPOTrainer reloads it from `config._name_or_path`, which
                # fails for models built in memory and misses in-memory edits; a copy taken now is exact.
                ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if ref_model is not None:
            check_causal_lm(ref_model, role="reference model")
        if args.share_prompt:  # before DPOTrainer's set-up, which may run a long reference precompute
            for candidate in (model, ref_model):
                if isinstance(candidate, torch.nn.Module):
                    _check_shared_prompt_model(candidate, args)

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
        if args.sequence_parallel_size > 1:
            ring_reference = ref_model if args.sequence_parallel_reference == "ring" else None
            reference_is_policy = ref_model is None and (
                peft_config is not None or (not isinstance(model, str) and _is_peft_model(model))
            )
            self._check_sequence_parallel(args, (model, ring_reference), train_dataset, reference_is_policy)
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
        if isinstance(model, str):
            check_causal_lm(self.model)

        # RoPE θ changes only after DPOTrainer built (and, if asked, precomputed) the reference with the original θ
        if args.policy_rope_theta is not None:
            saved = set_rope_theta(self.model, args.policy_rope_theta)
            # Through a PEFT policy with adapters disabled, the reference pass must see the original frequencies
            self._reference_rope = saved if self.ref_model is None else None
            logger.info(f"Policy RoPE theta set to {args.policy_rope_theta:g}; the reference keeps its original θ.")

        if args.share_prompt:
            self._setup_shared_prompt(args)
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
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval)

    def _setup_shared_prompt(self, args: LongPOConfig) -> None:
        """Check that the models can share prompts. They keep their own attention implementation; the packed one
        (tree attention behind the "ring_attention" seam) is switched on around each training / prediction step
        (`_packed_attention`), so that saving, callbacks and user forwards see the model as it was."""
        from .attention import register_ring_attention

        if self.aux_loss_enabled:
            raise ValueError(
                "`share_prompt=True` does not support the MoE router auxiliary loss (it would be computed over the "
                "packed tokens, with the prompt once, and differ from the unshared loss). Set `router_aux_loss_coef=0` "
                "(no auxiliary loss; the shared loss then equals the unshared one exactly), or `share_prompt=False`."
            )
        name = register_ring_attention()
        self._plain_attn_implementation = base_model(self.model).config._attn_implementation
        for model in (self.model, self.ref_model):
            if model is None:
                continue
            _check_shared_prompt_model(model, args)
            try:
                with attn_implementation(model, name):
                    pass
            except (ValueError, NotImplementedError) as err:
                raise ValueError(
                    f"`share_prompt=True` needs a model that takes a custom attention function (transformers' "
                    f"AttentionInterface); {type(base_model(model)).__name__} refused it: {err}. Set "
                    "`share_prompt=False`."
                ) from err

    @contextlib.contextmanager
    def _packed_attention(self):
        """Run the packed attention function inside the block (forward AND backward: gradient checkpointing
        recomputes layers during backward) when prompts are shared."""
        if not self.args.share_prompt or self._sp is not None:  # SP models use it permanently
            yield
            return
        from .attention import register_ring_attention

        name = register_ring_attention()
        with contextlib.ExitStack() as stack:
            for model in (self.model, self.ref_model):
                if model is not None:
                    stack.enter_context(attn_implementation(model, name))
            yield

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._packed_attention():
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._packed_attention():
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _check_sequence_parallel(
        self, args: LongPOConfig, models: tuple, train_dataset, reference_is_policy: bool
    ) -> None:
        """Refuse what sequence parallelism cannot run. Called before DPOTrainer's set-up (which may run a long
        reference precompute) with what is known then, and again once the models are loaded."""
        import torch.distributed as dist

        from .sequence_parallel import check_model_for_sequence_parallel, check_sp_size

        for model in models:
            if isinstance(model, torch.nn.Module):
                check_model_for_sequence_parallel(model, args.ring_heads_k_stride, args.ring_ignore_sliding_window)
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
        _check_launch(args)

    def _setup_sequence_parallel(self, args: LongPOConfig) -> None:
        """Build the dp × sp mesh and switch the policy (and a ring reference) to ring attention."""
        from .sequence_parallel import (
            SequenceParallelContext,
            init_sequence_parallel_mesh,
            prepare_model_for_sequence_parallel,
        )

        ring_reference = self.ref_model if args.sequence_parallel_reference == "ring" else None
        self._check_sequence_parallel(
            args, (self.model, ring_reference), self.train_dataset, reference_is_policy=self.ref_model is None
        )
        if self.aux_loss_enabled:
            raise ValueError("The MoE router auxiliary loss is not supported with sequence parallelism yet.")
        mesh = init_sequence_parallel_mesh(args.sequence_parallel_size, device_type=self.accelerator.device.type)
        self._sp = SequenceParallelContext(
            mesh,
            ring_attn_impl=args.ring_attn_impl,
            heads_k_stride=args.ring_heads_k_stride,
            allow_sliding_window=args.ring_ignore_sliding_window,
        )
        prepare_model_for_sequence_parallel(self.model, self._sp)
        if self.ref_model is not None and args.sequence_parallel_reference == "ring":
            prepare_model_for_sequence_parallel(self.ref_model, self._sp)
        logger.info(
            f"Sequence parallelism: {mesh.dp_size} data-parallel group(s) × {mesh.sp_size} ranks, ring "
            f"'{args.ring_attn_impl}', reference '{args.sequence_parallel_reference}'."
        )
        if args.share_prompt and mesh.sp_size > 1:
            # Said at warning level because it changes the communication pattern the user configured
            logger.warning(
                f"share_prompt=True under sequence parallelism: each layer all-gathers K/V over the SP group and runs "
                f"tree attention on its own queries (ring_attn_impl='{args.ring_attn_impl}' keeps its token layout, "
                "but K/V do not travel by the P2P ring: a ring step's key block would cut across branches). Set "
                "share_prompt=False for ring-flash-attn's ring schedule."
            )

    def get_total_train_batch_size(self, args) -> int:
        # An SP group reads one batch: the effective batch counts dp groups, not ranks. (Trainer's own `get_sp_size`
        # is for accelerate's SP dataloader adapter, which we do not use: our dataloader is already dp-sharded.)
        dp_size = self._sp.mesh.dp_size if self._sp is not None else args.world_size
        return self._train_batch_size * args.gradient_accumulation_steps * dp_size // self.get_tp_size()

    def _get_dataloader(
        self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None
    ):
        dataloader = super()._get_dataloader(
            dataset,
            description,
            batch_size,
            sampler_fn=sampler_fn,
            is_training=is_training,
            dataloader_key=dataloader_key,
        )
        if self._sp is not None:
            # accelerate shards batches over all ranks; under SP, ranks of one SP group must get the same batch, so
            # shard over the dp axis only. `_compute_loss` verifies it with a checksum on every step.
            sharder = getattr(dataloader, "batch_sampler", None)
            if sharder is None or not hasattr(sharder, "process_index"):
                raise ValueError(f"Cannot shard the {description} dataloader by data-parallel rank for SP.")
            sharder.num_processes = self._sp.mesh.dp_size
            sharder.process_index = self._sp.mesh.dp_rank
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
                _prepare_row,
                with_indices=True,
                fn_kwargs={"processing_class": processing_class, "eos_token": self._tokenizer.eos_token},
                **map_kwargs,
            )
            if args.max_length is not None:
                dataset = self._enforce_max_length(dataset, args, dataset_name)
            check_pairs(dataset, dataset_name, args.dataset_num_proc)
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise LongPODataError(
                f"truncation_mode='drop' removed every row of the {dataset_name} dataset (all are longer than "
                f"max_length={args.max_length} tokens); raise `max_length` or set it to None."
            )
        return dataset

    def _enforce_max_length(self, dataset, args: LongPOConfig, dataset_name: str):
        """Rows over `max_length` are an error (default) or dropped with a logged count; never truncated."""
        max_length = args.max_length

        def too_long(example) -> bool:
            lengths = row_lengths(example)
            return max(lengths["long"], lengths["short"]) > max_length

        if isinstance(dataset, IterableDataset):
            if args.truncation_mode == "drop":
                logger.warning(
                    f"Rows of the streamed {dataset_name} dataset longer than {max_length} tokens are dropped."
                )
                return dataset.filter(lambda ex: not too_long(ex))

            def check(example, index):
                if too_long(example):
                    raise LongPODataError(
                        _over_length_message(dataset_name, [(index, row_lengths(example))], 1, max_length)
                    )
                return example

            return dataset.map(check, with_indices=True)

        lengths = dataset.map(
            lambda ex: row_lengths(ex),
            remove_columns=dataset.column_names,
            num_proc=args.dataset_num_proc,
            desc=f"Measuring {dataset_name} rows",
        )
        over = [
            (i, {"long": lg, "short": sh})
            for i, (lg, sh) in enumerate(zip(lengths["long"], lengths["short"]))
            if max(lg, sh) > max_length
        ]
        if not over:
            return dataset
        if args.truncation_mode == "error":
            raise LongPODataError(_over_length_message(dataset_name, over[:5], len(over), max_length))
        keep = sorted(set(range(len(dataset))) - {i for i, _ in over})
        logger.warning(
            f"Dropped {len(over)} of {len(dataset)} rows of the {dataset_name} dataset longer than max_length="
            f"{max_length} tokens (truncation_mode='drop'); first dropped rows: {[i for i, _ in over[:10]]}."
        )
        return dataset.select(keep)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]

    # -------------------------------------------------------------------------------------------- scoring
    def _row_sums(
        self,
        model,
        input_ids,
        attention_mask,
        masks: list[torch.Tensor],
        fields: tuple[str, ...],
        split: bool,
        **model_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-row sums of per-token values (log-probs, entropy, top-1) over several token masks, from one forward.

        `masks[0]` decides which tokens are scored and covers the others. Returns `sums` (fields, masks, rows) and
        `counts` (masks, rows), and the MoE auxiliary loss when `output_router_logits` is passed. With `split`, the rows are split over the SP group with ring attention and the sums
        are reduced across it (autograd-correct); otherwise one ordinary forward through TRL's fused LM head.
        """
        label_sets = [input_ids.masked_fill(~m.bool(), -100) for m in masks]
        if split:
            from .sequence_parallel import sp_fused_row_sums

            sums, counts = sp_fused_row_sums(
                model,
                input_ids,
                label_sets,
                attention_mask,
                context=self._sp,
                pad_token_id=self._tokenizer.pad_token_id,
                fields=fields,
                **model_kwargs,
            )
            return sums, counts, None
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=label_sets[0],
            fused_lm_head=True,
            use_cache=False,
            **model_kwargs,
        )
        seq_len = input_ids.size(1) - 1
        shifted = [m[:, 1:] for m in masks]
        sums = []
        dtype = row_sum_dtype(input_ids.device)
        for name in fields:
            values = getattr(outputs, name)[:, -seq_len:]  # prompt-learning PEFT prepends virtual tokens
            values = (values if name == "log_probs" else values.detach()).to(dtype)
            sums.append(torch.stack([(values * m).sum(dim=1) for m in shifted]))
        counts = torch.stack([m.sum(dim=1) for m in shifted])
        return torch.stack(sums), counts, getattr(outputs, "aux_loss", None)

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

    def _shared_row_sums(
        self,
        model,
        input_ids,
        attention_mask,
        masks: list[torch.Tensor],
        fields: tuple[str, ...],
        groups: list,
        split: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """`_row_sums` with each group's rows packed as one tree: the shared prompt is computed once
        (`trl_longpo.packing`, tree attention). Same sums; `split` shards the trees over the SP group."""
        from .attention import RingAttentionState, register_ring_attention
        from .attention.tree import plan_for_trees

        group, attention_dtype = None, None
        if split:
            from .sequence_parallel import sp_all_reduce_sum, verify_same_batch
            from .sequence_parallel.tree import shard_trees

            group, attention_dtype = self._sp.mesh.sp_group, self._sp.attention_dtype
            if self._sp.verify_batches:
                verify_same_batch([input_ids, attention_mask, *masks], group)
        packed = pack_shared_prompts(input_ids, attention_mask, masks, groups)
        if split:
            local = shard_trees(
                packed,
                sp_rank=self._sp.mesh.sp_rank,
                sp_size=self._sp.mesh.sp_size,
                impl=self._sp.ring_attn_impl,
                group=group,
                pad_token_id=self._tokenizer.pad_token_id,
            )
            plan = local.plan
        else:
            local, plan = packed, plan_for_trees(packed.trees)
        token_masks = local.masks
        labels = local.targets.masked_fill(~token_masks[0], -100)
        name = register_ring_attention()
        if (
            torch.is_grad_enabled()
            and _activation_checkpointing(base_model(model))
            and base_model(model).config._attn_implementation != name
        ):
            raise RuntimeError(
                "With gradient checkpointing, a shared-prompt loss must be computed inside `training_step` (which "
                "keeps the packed attention on through backward); calling `compute_loss` directly would recompute the "
                "layers with the model's own attention during backward."
            )
        with attn_implementation(model, name):  # a no-op inside `training_step` / `prediction_step`
            outputs = model(
                input_ids=local.input_ids[None],
                position_ids=local.position_ids[None],
                shift_labels=labels[None],
                fused_lm_head=True,
                use_cache=False,
                ring_attention=RingAttentionState(group=group, plan=plan, attention_dtype=attention_dtype),
            )
        sums, counts = packed_row_sums(outputs, fields, local.row_index, token_masks, local.num_rows)
        if split:
            sums, counts = sp_all_reduce_sum(sums, group), sp_all_reduce_sum(counts, group)
        return sums, counts, None

    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of each row's answers on its SHORT prompt(s), summed over turns."""
        split = self._sp is not None and self.args.sequence_parallel_reference == "ring"
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.reference_context(model),
            self.accelerator.autocast(),
        ):
            ref_masks = [inputs["ref_completion_mask"]]
            if self.args.share_prompt:  # sequence k (chosen, turn t) shares its short prompt with k + n/2 (rejected)
                lengths = inputs["ref_prompt_length"].tolist()
                groups = pair_groups(lengths[: len(lengths) // 2])
                sums, _, _ = self._shared_row_sums(
                    model, inputs["ref_input_ids"], inputs["ref_attention_mask"], ref_masks, ("log_probs",), groups, split
                )
            else:
                sums, _, _ = self._row_sums(
                    model, inputs["ref_input_ids"], inputs["ref_attention_mask"], ref_masks, ("log_probs",), split
                )
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
        scored = completion_mask | nll_mask
        fields = ("log_probs", "entropy", "is_top1")
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        masks = [scored, completion_mask, nll_mask]
        if args.share_prompt:  # row b and row B + b share prompt b: one tree per pair
            groups = pair_groups(inputs["prompt_length"].tolist())
            sums, counts, aux_loss = self._shared_row_sums(
                model, input_ids, attention_mask, masks, fields, groups, self._sp is not None
            )
        else:
            sums, counts, aux_loss = self._row_sums(
                model, input_ids, attention_mask, masks, fields, self._sp is not None, **extra
            )
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
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self._gather(aux_loss.detach()).mean().item())

        self._log_metrics(
            mode,
            inputs,
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            longpo_loss,
            nll_loss,
            answer_entropy=sums[1, 1, :batch_size].sum(),
            answer_top1=sums[2, 1, :batch_size].sum(),
            answer_tokens=counts[1, :batch_size].sum(),
        )
        if return_outputs:
            # The fused LM head builds no logits; `compute_metrics` users get them from a plain forward
            plain = contextlib.nullcontext()
            if args.share_prompt and self._sp is None:  # inside `prediction_step`'s packed attention
                plain = attn_implementation(model, self._plain_attn_implementation)
            with torch.no_grad(), plain:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return loss, outputs
        return loss

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather a metric across data-parallel ranks. Under SP the ranks of an SP group hold the same values, so only
        the dp axis is gathered (a world gather would count every row and token `sp` times)."""
        if self._sp is None:
            return self.accelerator.gather_for_metrics(tensor)
        import torch.distributed as dist

        tensor = tensor.detach().reshape(-1) if tensor.dim() else tensor.detach().reshape(1)
        parts = [torch.empty_like(tensor) for _ in range(self._sp.mesh.dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._sp.mesh.dp_group)
        return torch.cat(parts)

    def _log_metrics(
        self,
        mode,
        inputs,
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        longpo_loss,
        nll_loss,
        answer_entropy,
        answer_top1,
        answer_tokens,
    ) -> None:
        gather = self._gather
        metrics = self._metrics[mode]
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        metrics["logps/ref_chosen"].append(gather(ref_chosen_logps.detach()).mean().item())
        metrics["logps/ref_rejected"].append(gather(ref_rejected_logps.detach()).mean().item())
        metrics["longpo_loss"].append(gather(longpo_loss.detach()).mean().item())
        if nll_loss is not None:
            metrics["nll_loss"].append(gather(nll_loss.detach()).mean().item())
        # Entropy and top-1 accuracy over the chosen answer tokens, token-weighted across ranks
        tokens = gather(answer_tokens).sum()
        metrics["entropy"].append((gather(answer_entropy).sum() / tokens).item() if tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append((gather(answer_top1).sum() / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]


def _eval_datasets(eval_dataset) -> list[tuple[str, Dataset | IterableDataset]]:
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval ({key!r})", dataset) for key, dataset in eval_dataset.items()]
    return [("eval", eval_dataset)]


def _check_launch(args: LongPOConfig) -> None:
    """Refuse a multi-process launch that accelerate runs as independent single-process jobs: e.g. `accelerate launch
    --multi_gpu` on a machine without GPUs and without `use_cpu`, which would train N unsynchronised copies (and,
    under SP, feed the ring different rows)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        launched = dist.get_world_size()
    else:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerate_processes = args.distributed_state.num_processes
    if launched != accelerate_processes:
        raise ValueError(
            f"{launched} processes were launched but accelerate runs {accelerate_processes} "
            f"({args.distributed_state.distributed_type}): every process would train its own copy of the model "
            "without sharing data or gradients. On a CPU-only machine set `use_cpu: true` in the training config "
            "(`--use_cpu true` on the command line, `use_cpu=True` in Python); accelerate then runs one gloo job."
        )


def _prepare_row(example: dict, index: int, processing_class, eos_token: str) -> dict[str, list]:
    """Validate the messages, tokenize, and check that policy and reference score the same answer tokens."""
    validate_row(example, index)
    tokenized = tokenize_row(example, index, processing_class, eos_token)
    check_answer_tokens(tokenized, index)
    return tokenized


def _activation_checkpointing(model) -> bool:
    """Whether layers are recomputed in backward: `is_activation_checkpointing`, or its older name (which recent
    transformers versions deprecate with a warning)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _check_shared_prompt_model(model, args: LongPOConfig) -> None:
    """Refuse, with the fix, what tree attention cannot run (never fall back to the unshared path silently)."""
    from .sequence_parallel import check_model_for_sequence_parallel

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            "`share_prompt=True` cannot pack pairs for a prompt-learning PEFT adapter (virtual tokens are prepended "
            "to every sequence). Set `share_prompt=False`."
        )
    text_config = base_model(model).config.get_text_config()
    if getattr(text_config, "attn_logit_softcapping", None):
        raise ValueError(
            "`share_prompt=True`: tree attention does not implement attention logit softcapping "
            f"(attn_logit_softcapping={text_config.attn_logit_softcapping}). Set `share_prompt=False`."
        )
    try:
        check_model_for_sequence_parallel(model, allow_sliding_window=args.ring_ignore_sliding_window)
    except ValueError as err:
        raise ValueError(f"`share_prompt=True` (tree attention): {err}. Or set `share_prompt=False`.") from err


def _check_liger_available() -> None:
    """Liger's kernels are Triton GPU kernels: refuse them clearly where they cannot run."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError(
            "`use_liger_kernel=True` needs a CUDA GPU: Liger's kernels are Triton GPU kernels. On CPU leave it False "
            "(LongPO already computes log-probs with TRL's fused, chunked LM head)."
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError("`use_liger_kernel=True` needs the liger-kernel package: pip install 'trl-longpo[gpu]'.")


def _over_length_message(dataset_name: str, rows: list, total: int, max_length: int) -> str:
    shown = ", ".join(f"row {i} (long {ln['long']}, short {ln['short']} tokens)" for i, ln in rows)
    return (
        f"{total} row(s) of the {dataset_name} dataset exceed max_length={max_length}: {shown}. LongPO never truncates "
        "a long context silently. Raise `max_length` (or set it to None), or set `truncation_mode='drop'` to drop "
        "these rows with a logged count."
    )
