"""The on-disk cache of precomputed reference log-probs (`precompute_ref_log_probs=True`): its key and its integrity.

DPOTrainer caches the reference log-probs next to the dataset under a key made of the dataset's fingerprint and a
hash of the reference WEIGHTS. The same weights under another config (RoPE scaling such as YaRN, a changed
`rope_theta`, `max_position_embeddings`) give other log-probs, so LongPO folds the reference config into the key.
A cache file that exists but cannot be read (a kill while writing it, a full disk) is named in the error with the
fix, instead of surfacing as a bare Arrow exception.
"""

from __future__ import annotations

import json
import os

from datasets import Dataset
from datasets.fingerprint import Hasher

from .tokenization import LongPODataError


def reference_config_key(model_hash: str | None, reference) -> str:
    """`model_hash` (DPOTrainer's hash of the reference weights) combined with the reference's config."""
    config = reference.config.to_dict()
    public = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    return Hasher.hash((model_hash, json.dumps(public, sort_keys=True, default=str)))


def check_cache_file(dataset: Dataset, model_hash: str | None) -> None:
    """Raise `LongPODataError` naming the cache file DPOTrainer would read for `dataset` if it is unreadable."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None or not dataset.cache_files:
        return
    path = dataset._get_cache_file_path(Hasher.hash((fingerprint, model_hash)))
    if not os.path.exists(path):
        return
    try:
        cached = Dataset.from_file(path)
        if len(cached) != len(dataset) or not {"ref_chosen_logps", "ref_rejected_logps"} <= set(cached.column_names):
            raise ValueError(f"it holds {len(cached)} rows with columns {cached.column_names}")
    except Exception as exc:  # Arrow raises several types for a truncated or foreign file
        raise LongPODataError(
            f"The cached reference log-probs {path} cannot be used ({type(exc).__name__}: {exc}). Delete the file to "
            "recompute them (the next run scores the reference again), or set `precompute_ref_log_probs=False`."
        ) from exc
