"""`trl-longpo` console script.

    trl-longpo generate --model M --documents DOCS --output OUT [--backend hf|vllm] [...]   build a LongPO dataset
    trl-longpo generate --model M --documents DOCS --dry_run [...]   its plan only (tokenizer + model config)
    trl-longpo demo [--output DIR] [--model tiny]        SmolLM2 -> data -> LongPOTrainer -> plot, offline on a CPU
    trl-longpo evolve CONFIG.yaml                        self-evolution rounds: generate with round r-1's model, train
    trl-longpo merge OUT                                 join the shards of a --world_size run into OUT/dataset
    trl-longpo tiny-model DIR                            save the tiny offline model and tokenizer to DIR
    trl-longpo convert-gguf FILE DIR                     turn a GGUF checkpoint into a normal model directory
    trl-longpo plot OUTPUT_DIR [--output PNG]            training curves (loss, rewards, retention) into a PNG
    trl-longpo plan --model M --max_length 128K --gpus 8 memory, fit and traffic of every (dp, Ulysses, ring) split

Every `generate` option is a field of `trl_longpo.data.GenerationConfig` (see `trl-longpo generate --help`).
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "generate": "Generate a LongPO preference dataset from long documents (resumable).",
    "demo": "Offline end-to-end demo: SmolLM2 -> generated data -> LongPOTrainer -> plot (a few CPU minutes).",
    "evolve": "Self-evolution rounds from a YAML: each round generates with the previous round's model, then trains.",
    "merge": "Merge the per-rank shards of a multi-process `generate` run.",
    "tiny-model": "Save the tiny offline model and tokenizer to a directory.",
    "convert-gguf": "Dequantise a GGUF checkpoint once into a normal model directory (loads like a hub model).",
    "plot": "Plot a run's training curves (loss terms, rewards, long/short retention) from trainer_state.json.",
    "plan": "How many GPUs and which (dp, Ulysses, ring) split: per-GPU memory, fit, communication per layer.",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except long built-in lists (phrase lists, templates) that would flood the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if (isinstance(default, list) and len(default) > 3) or (isinstance(default, str) and len(default) > 60):
            return action.help or ""
        return super()._get_help_string(action)


def _parser(dataclass_type, prog: str, description: str):
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_type, prog=prog, description=description, formatter_class=_HelpFormatter)


def _explicit_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options present in `argv` (`--name value`, `--name=value`, `--no_name`)."""
    actions = parser._option_string_actions  # argparse keeps no record of which options were given
    return {actions[a.split("=", 1)[0]].dest for a in argv if a.startswith("--") and a.split("=", 1)[0] in actions}


def _generate(argv: list[str]) -> int:
    from trl_longpo.data import GenerationConfig, generate_dataset

    parser = _parser(GenerationConfig, "trl-longpo generate", COMMANDS["generate"])
    namespace = parser.parse_args(argv)
    namespace.preset_overrides = sorted(set(namespace.preset_overrides) | _explicit_options(parser, argv))
    config = GenerationConfig(**vars(namespace))  # --preset fills the fields not given on the command line
    config.joiner = config.joiner.replace("\\n", "\n").replace("\\t", "\t")  # let the shell pass "\n\n"
    required = ("model", "documents") if config.dry_run else ("model", "documents", "output")
    missing = [name for name in required if not getattr(config, name)]
    if missing:
        print(f"trl-longpo generate: missing {', '.join('--' + m for m in missing)}", file=sys.stderr)
        return 2
    result = generate_dataset(config)  # prints the plan; a plan without rows raises EmptyPlanError (exit 2)
    if config.dry_run:
        return 0
    return 0 if len(result.dataset) else 1


def _demo(argv: list[str]) -> int:
    from trl_longpo.demo import DemoConfig, run_demo

    (demo,) = _parser(DemoConfig, "trl-longpo demo", COMMANDS["demo"]).parse_args_into_dataclasses(argv)
    summary = run_demo(demo)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _evolve(argv: list[str]) -> int:
    from trl_longpo.evolve import main as evolve_main

    return evolve_main(argv)


def _merge(argv: list[str]) -> int:
    from trl_longpo.data import merge_shards

    parser = argparse.ArgumentParser(prog="trl-longpo merge", description=COMMANDS["merge"])
    parser.add_argument("output", help="The --output directory of the sharded run.")
    merged = merge_shards(parser.parse_args(argv).output)
    print(f"{len(merged)} rows")
    return 0


def _tiny_model(argv: list[str]) -> int:
    from trl_longpo.tiny import save_tiny_model

    parser = argparse.ArgumentParser(prog="trl-longpo tiny-model", description=COMMANDS["tiny-model"])
    parser.add_argument("directory")
    print(save_tiny_model(parser.parse_args(argv).directory))
    return 0


def _convert_gguf(argv: list[str]) -> int:
    from trl_longpo.gguf import convert_gguf

    parser = argparse.ArgumentParser(prog="trl-longpo convert-gguf", description=COMMANDS["convert-gguf"])
    parser.add_argument("gguf_file", help="The .gguf file (e.g. from llama.cpp or a hub repo).")
    parser.add_argument("output", help="Directory to write (config.json, model.safetensors, tokenizer).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier conversion in OUTPUT.")
    args = parser.parse_args(argv)
    print(convert_gguf(args.gguf_file, args.output, overwrite=args.overwrite))
    return 0


def _plot(argv: list[str]) -> int:
    from trl_longpo.plotting import plot_training

    parser = argparse.ArgumentParser(prog="trl-longpo plot", description=COMMANDS["plot"])
    parser.add_argument("run", help="A training output_dir (or its trainer_state.json).")
    parser.add_argument("--output", default=None, help="PNG path (default: RUN/training_curves.png).")
    args = parser.parse_args(argv)
    try:
        print(plot_training(args.run, args.output))
    except (FileNotFoundError, ValueError) as exc:  # no state file / nothing logged: one line, not a traceback
        print(f"trl-longpo plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _plan(argv: list[str]) -> int:
    from trl_longpo.sequence_parallel.planning import main as plan_main

    try:
        return plan_main(argv)
    except ValueError as exc:  # an unknown model, a bad length: one line, not a traceback
        print(f"trl-longpo plan: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {
        "generate": _generate,
        "demo": _demo,
        "evolve": _evolve,
        "merge": _merge,
        "tiny-model": _tiny_model,
        "convert-gguf": _convert_gguf,
        "plot": _plot,
        "plan": _plan,
    }
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in handlers:
        lines = [f"  {name:<13} {text}" for name, text in COMMANDS.items()]
        print("usage: trl-longpo {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    from trl_longpo.checkpoints import CheckpointError
    from trl_longpo.data import DataConfigError, DocumentsError, OutputDirError, SettingsMismatchError
    from trl_longpo.evolve import EvolveConfigError
    from trl_longpo.gguf import GGUFError
    from trl_longpo.tokenization import LongPODataError

    expected = (
        DataConfigError, DocumentsError, SettingsMismatchError, OutputDirError, GGUFError, LongPODataError,
        EvolveConfigError, CheckpointError,
    )
    try:
        return handlers[argv[0]](argv[1:])
    except (*expected, OSError) as exc:  # OSError: an unwritable or missing path; a message, not a traceback
        print(f"trl-longpo {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
