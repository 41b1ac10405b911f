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

from .collator import DataCollatorForLongPO
from .config import LongPOConfig
from .modeling import check_causal_lm, rope_frequencies, set_rope_theta
from .tokenization import TOKENIZED_COLUMNS, LongPODataError, check_columns, row_lengths, tokenize_row

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

        if processing_class is None:
            source = model if isinstance(model, str) else get_config_model_id(model.config)
            revision = (args.model_init_kwargs or {}).get("revision") if isinstance(args.model_init_kwargs, dict) else None
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
        if isinstance(model, str):
            check_causal_lm(self.model)

        # RoPE θ changes only after DPOTrainer built (and, if asked, precomputed) the reference with the original θ
        if args.policy_rope_theta is not None:
            saved = set_rope_theta(self.model, args.policy_rope_theta)
            # Through a PEFT policy with adapters disabled, the reference pass must see the original frequencies
            self._reference_rope = saved if self.ref_model is None else None
            logger.info(f"Policy RoPE theta set to {args.policy_rope_theta:g}; the reference keeps its original θ.")

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
                tokenize_row,
                with_indices=True,
                fn_kwargs={"processing_class": processing_class, "eos_token": self._tokenizer.eos_token},
                **map_kwargs,
            )
            if args.max_length is not None:
                dataset = self._enforce_max_length(dataset, args, dataset_name)
        return dataset

    def _enforce_max_length(self, dataset, args: LongPOConfig, dataset_name: str):
        """Rows over `max_length` are an error (default) or dropped with a logged count; never truncated."""
        max_length = args.max_length

        def too_long(example) -> bool:
            lengths = row_lengths(example)
            return max(lengths["long"], lengths["short"]) > max_length

        if isinstance(dataset, IterableDataset):
            if args.truncation_mode == "drop":
                logger.warning(f"Rows of the streamed {dataset_name} dataset longer than {max_length} tokens are dropped.")
                return dataset.filter(lambda ex: not too_long(ex))

            def check(example, index):
                if too_long(example):
                    raise LongPODataError(_over_length_message(dataset_name, [(index, row_lengths(example))], 1, max_length))
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
    def _reference_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of each row's answers on its SHORT prompt(s), summed over turns."""
        ref_ids, ref_completion = inputs["ref_input_ids"], inputs["ref_completion_mask"]
        labels = ref_ids.masked_fill(ref_completion == 0, -100)
        context = contextlib.nullcontext()
        if self.ref_model is None and _is_peft_model(self.model):
            # Same as DPOTrainer: a new adapter is disabled, an existing one was copied to the "ref" adapter
            unwrapped = self.accelerator.unwrap_model(self.model)
            context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            context,
            rope_frequencies(self._reference_rope if model is self.model else None),
            self.accelerator.autocast(),
        ):
            outputs = model(
                input_ids=ref_ids,
                attention_mask=inputs["ref_attention_mask"],
                labels=labels,
                fused_lm_head=True,
                use_cache=False,
            )
        shift_completion = ref_completion[:, 1:]
        per_sequence = (outputs.log_probs[:, -shift_completion.size(1) :] * shift_completion).sum(dim=1)
        rows = per_sequence.new_zeros(inputs["input_ids"].size(0))
        rows.index_add_(0, inputs["ref_row_index"], per_sequence)
        return rows.chunk(2, dim=0)

    def compute_ref_log_probs(self, model, inputs):
        """Used by DPOTrainer's `precompute_ref_log_probs` pass: reference log-probs on the short prompts."""
        return self._reference_logps(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        args = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        batch_size = input_ids.size(0) // 2

        # Score the answers of both halves; for the sequence-scope NLL also every token of the chosen long sequence
        scored = completion_mask.bool()
        use_nll = args.nll_weight > 0
        if use_nll and args.nll_scope == "sequence":
            scored = scored.clone()
            scored[:batch_size] = attention_mask[:batch_size].bool()
        labels = input_ids.masked_fill(~scored, -100)
        model_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)

        shift_completion = completion_mask[:, 1:]
        per_token_logps = outputs.log_probs[:, -shift_completion.size(1) :]
        chosen_logps, rejected_logps = (per_token_logps * shift_completion).sum(dim=1).chunk(2, dim=0)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self._reference_logps(ref_model, inputs)
        ref_chosen_logps = ref_chosen_logps.to(chosen_logps)
        ref_rejected_logps = ref_rejected_logps.to(rejected_logps)

        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        longpo_losses = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))
        longpo_loss = longpo_losses.mean()
        loss = args.dpo_weight * longpo_loss
        nll_mask = scored[:batch_size, 1:]
        nll_loss = None
        if use_nll:
            nll_loss = -(per_token_logps[:batch_size] * nll_mask).sum() / nll_mask.sum().clamp(min=1)
            loss = loss + args.nll_weight * nll_loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        self._log_metrics(
            mode, inputs, outputs, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            longpo_loss, nll_loss, shift_completion,
        )
        if return_outputs:
            # The fused LM head builds no logits; `compute_metrics` users get them from a plain forward
            with torch.no_grad():
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(
        self, mode, inputs, outputs, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        longpo_loss, nll_loss, shift_completion,
    ) -> None:
        gather = self.accelerator.gather_for_metrics
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
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(gather(outputs.aux_loss.detach()).mean().item())

        # Answer-token entropy and top-1 accuracy of the chosen answers, token-weighted across ranks
        chosen_mask = shift_completion.chunk(2, dim=0)[0].bool()
        tokens = gather(chosen_mask.sum()).sum()
        if outputs.entropy is not None:
            entropy = outputs.entropy[:, -shift_completion.size(1) :].chunk(2, dim=0)[0]
            total = gather((entropy.detach() * chosen_mask).sum()).sum()
            metrics["entropy"].append((total / tokens).item() if tokens > 0 else 0.0)
        if outputs.is_top1 is not None:
            top1 = outputs.is_top1[:, -shift_completion.size(1) :].chunk(2, dim=0)[0]
            correct = gather((top1 & chosen_mask).sum()).sum()
            metrics["mean_token_accuracy"].append((correct / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]


def _over_length_message(dataset_name: str, rows: list, total: int, max_length: int) -> str:
    shown = ", ".join(f"row {i} (long {ln['long']}, short {ln['short']} tokens)" for i, ln in rows)
    return (
        f"{total} row(s) of the {dataset_name} dataset exceed max_length={max_length}: {shown}. LongPO never truncates "
        "a long context silently. Raise `max_length` (or set it to None), or set `truncation_mode='drop'` to drop "
        "these rows with a logged count."
    )
