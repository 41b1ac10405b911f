"""Self-evolution data pipeline for LongPO: long documents + a short-context instruct model -> preference rows.

    from trl_longpo.data import GenerationConfig, generate_dataset
    result = generate_dataset(GenerationConfig(model="...", documents="docs.jsonl", output="out"))
    result.dataset  # prompt / short_prompt / chosen / rejected, ready for LongPOTrainer

The same code runs a tiny model on a CPU (`trl-longpo demo`) and a 7B model on vLLM across many GPUs.
"""

from .backends import (
    Completion,
    GenerationBackend,
    HFBackend,
    Sampling,
    VLLMBackend,
    make_backend,
    rope_theta_override,
)
from .chunking import Chunk, chunk_document, split_units
from .config import DataConfigError, GenerationConfig
from .documents import DocumentsError, load_documents_table, pydoc_documents
from .filters import check_answer, repetition_ratio
from .instructions import parse_instructions
from .pipeline import GenerationResult, generate_dataset, plan_generation
from .plan import EmptyPlanError, GenerationPlan, StagePlan
from .rows import merge_shards
from .stages import chat_prompt_ids
from .store import OutputDirError, SettingsMismatchError

__all__ = [
    "Chunk",
    "Completion",
    "DataConfigError",
    "DocumentsError",
    "EmptyPlanError",
    "GenerationBackend",
    "GenerationConfig",
    "GenerationPlan",
    "GenerationResult",
    "HFBackend",
    "OutputDirError",
    "Sampling",
    "SettingsMismatchError",
    "StagePlan",
    "VLLMBackend",
    "chat_prompt_ids",
    "check_answer",
    "chunk_document",
    "generate_dataset",
    "load_documents_table",
    "make_backend",
    "merge_shards",
    "parse_instructions",
    "plan_generation",
    "pydoc_documents",
    "repetition_ratio",
    "rope_theta_override",
    "split_units",
]
