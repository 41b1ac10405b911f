"""Retention monitoring for LongPO: long-context retrieval probes and short-context drift (issue 7).

    probes = build_retrieval_probes(tokenizer, lengths=[512, 1024], probes_per_length=8)
    evaluate_retrieval(model, tokenizer, probes)           # {512: 0.75, 1024: 0.5}
    rows = short_retention_rows(eval_dataset, n=16)
    short_retention_metrics(policy, reference, tokenizer, rows)   # {"logp_drift": ..., "kl": ...}

`RetentionCallback` logs both while training; `LongPOTrainer` adds it when `retention_eval_steps > 0`.
"""

from trl_longpo.evaluation.callback import RetentionCallback
from trl_longpo.evaluation.probes import RetrievalProbe, build_retrieval_probes
from trl_longpo.evaluation.retention import (
    evaluate_retrieval,
    score_retrieval,
    short_retention_metrics,
    short_retention_rows,
)

__all__ = [
    "RetentionCallback",
    "RetrievalProbe",
    "build_retrieval_probes",
    "evaluate_retrieval",
    "score_retrieval",
    "short_retention_metrics",
    "short_retention_rows",
]
