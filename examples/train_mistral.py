"""Train a model with LongPO (e.g. Mistral-7B-Instruct-v0.2 → 128K), from a YAML config or the command line.

    accelerate launch examples/train_mistral.py --config examples/configs/mistral_7b_128k.yaml
    python examples/train_mistral.py --config examples/configs/tiny_cpu.yaml          # ~1 minute on a CPU

Every `LongPOConfig` field (and so every `DPOConfig` / `TrainingArguments` field), every `trl.ModelConfig` field
and the script arguments below can be set in the YAML file or overridden on the command line (`--beta 0.1`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_longpo import LongPOConfig, LongPOTrainer


@dataclass
class LongPOScriptArguments(ScriptArguments):
    """`trl.ScriptArguments` (dataset_name, dataset_train_split, ...) plus switches for offline CPU runs."""

    build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "If `model_name_or_path` is a directory that does not exist yet, write a tiny randomly initialised "
            "Mistral-architecture model and tokenizer there first (offline demos and CI). It is then loaded by path, "
            "exactly like a hub model."
        },
    )
    build_toy_dataset: int = field(
        default=0,
        metadata={
            "help": "If > 0 and `dataset_name` is a .jsonl path that does not exist yet, write this many synthetic "
            "LongPO rows built from Python's help texts there first (offline demos and CI)."
        },
    )


def load_longpo_dataset(name: str, config: str | None = None, streaming: bool = False) -> DatasetDict | Dataset:
    """A hub dataset name, a directory written by `save_to_disk` (e.g. by `trl-longpo generate`) or a json/parquet file."""
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        return DatasetDict({"train": load_from_disk(name)})
    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(name)[1])
        if kind is None:
            raise ValueError(
                f"Cannot load {name!r}: use a .jsonl, .json or .parquet file, or a `save_to_disk` directory."
            )
        return load_dataset(kind, data_files=name, streaming=streaming)
    return load_dataset(name, name=config, streaming=streaming)


def main(script_args: LongPOScriptArguments, training_args: LongPOConfig, model_args: ModelConfig) -> None:
    model_path = model_args.model_name_or_path
    # The main process builds the offline assets; the others wait, then find them (every rank passes the same
    # barriers whatever the file system shows it)
    with training_args.distributed_state.main_process_first():
        if script_args.build_tiny_model and model_path and not os.path.exists(model_path):
            from trl_longpo.tiny import save_tiny_model

            save_tiny_model(model_path)
        if script_args.build_toy_dataset and script_args.dataset_name and not os.path.exists(script_args.dataset_name):
            from trl_longpo.tiny import toy_longpo_rows

            os.makedirs(os.path.dirname(script_args.dataset_name) or ".", exist_ok=True)
            with open(script_args.dataset_name, "w") as f:
                for row in toy_longpo_rows(script_args.build_toy_dataset, seed=training_args.seed):
                    f.write(json.dumps(row) + "\n")

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    if not script_args.dataset_name:
        raise ValueError(
            "Set `dataset_name`: a hub dataset, a `trl-longpo generate` output directory or a .jsonl file."
        )
    dataset = load_longpo_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"Split {script_args.dataset_train_split!r} not found in {script_args.dataset_name!r} (splits: "
            f"{list(dataset)}); set `dataset_train_split`."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = LongPOTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)  # README.md citing LongPO
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()


if __name__ == "__main__":
    parser = TrlParser((LongPOScriptArguments, LongPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
