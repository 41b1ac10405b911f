"""`LongPOConfig`: TRL's `DPOConfig` plus the LongPO objective's knobs, with long-context-safe defaults."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from trl import DPOConfig

from .attention.ring import RING_ATTN_IMPLS  # one home: the ring plans that implement them
from .inherited import inherited_field_problems

NLL_SCOPES = ("sequence", "completion")
SP_REFERENCE_MODES = ("ring", "local")
TRUNCATION_MODES = ("error", "drop")
FINITE_FIELDS = ("beta", "dpo_weight", "nll_weight", "policy_rope_theta", "learning_rate")


@dataclass
class LongPOConfig(DPOConfig):
    r"""
    Configuration class for [`LongPOTrainer`] (LongPO, [arXiv 2502.13922](https://huggingface.co/papers/2502.13922)).

    Inherits every field of [`~trl.DPOConfig`] (and so of [`~transformers.TrainingArguments`]); parse it from the
    command line or a YAML file with [`~trl.TrlParser`]. The objective is

        loss = nll_weight · NLL + dpo_weight · L_LongPO,
        L_LongPO = −log σ(β · [(log πθ(y_w|x_L) − log πref(y_w|x_S)) − (log πθ(y_l|x_L) − log πref(y_l|x_S))])

    where the policy πθ sees the long prompt x_L and the frozen reference πref the short prompt x_S.

    Parameters:
        > Parameters that control the data preprocessing

        max_length (`int` or `None`, *optional*, defaults to `None`):
            Maximum tokens of a tokenized sequence (long prompt + answer, and short prompt + answer); `None` means no
            limit. A longer row raises an error naming it, or is dropped with a logged count (`truncation_mode`).
        truncation_mode (`str`, *optional*, defaults to `"error"`):
            What to do with a row longer than `max_length`: `"error"` stops with the row index and its length,
            `"drop"` removes the row and logs how many were removed. DPO's `"keep_start"` is refused.

        > Parameters that control the training

        beta (`float`, *optional*, defaults to `0.1`):
            Inherited from [`~trl.DPOConfig`]. The paper's text uses 0.1; the official code and its README run 0.01.
        dpo_weight (`float`, *optional*, defaults to `0.01`):
            λ, the weight of the LongPO preference term (paper Eq. 14 and official code: 0.01).
        nll_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the NLL term on the chosen long sequence. `0.0` gives the pure short-to-long preference loss.
        nll_scope (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"` (paper): mean token NLL over the whole chosen long sequence — document, instructions and
            answers; pads excluded. `"completion"`: mean over the chosen answer tokens only (TRL's `"sft"` term).
        policy_rope_theta (`float`, *optional*):
            RoPE base θ given to the policy for long inputs (paper: 1e7 for Mistral-7B-Instruct-v0.2). The reference
            keeps the model's original RoPE. The saved model carries the new θ. `None` keeps the model's θ.
        share_prompt (`bool`, *optional*, defaults to `True`):
            Pack chosen and rejected with their shared prompt as one tree-attention sequence (prompt computed once;
            the reference shares each short prompt likewise). Same loss and gradients as `False` (DPOTrainer's
            layout: two sequences), about half the compute and activation memory at long context.

        > Parameters that control sequence parallelism

        sequence_parallel_size (`int`, *optional*, defaults to `1`):
            Ranks that split each sequence with ring attention (world = dp × sp; SP groups are consecutive ranks).
            `1` disables sequence parallelism.
        ulysses_degree (`int`, *optional*, defaults to `1`):
            Ranks of each SP group that split attention heads with an all-to-all (DeepSpeed-Ulysses) instead of
            passing K/V around the ring: `1` = ring only, `sequence_parallel_size` = Ulysses only, in between = hybrid
            (Ulysses inside groups of `ulysses_degree` consecutive ranks, a ring of `sequence_parallel_size /
            ulysses_degree` across them). Must divide `sequence_parallel_size` and the model's query heads; KV heads
            fewer than it are replicated. `trl-longpo plan` recommends a split.
        ring_attn_impl (`str`, *optional*, defaults to `"zigzag"`):
            ring-flash-attn implementation: `"zigzag"` (balanced causal work) or `"llama3"` (all-gathers K/V: better
            precision, no per-row padding to 2·sp).
        ring_heads_k_stride (`int`, *optional*, defaults to `1`):
            `"llama3"` ring: kv heads all-gathered at a time; must divide the kv head count.
        sequence_parallel_reference (`str`, *optional*, defaults to `"ring"`):
            How the reference scores the short inputs under sequence parallelism: `"ring"` (split like the policy) or
            `"local"` (unsplit on every rank; needs a separate reference model and short inputs that fit a device).
        ring_ignore_sliding_window (`bool`, *optional*, defaults to `False`):
            Ring attention cannot apply a sliding window across ranks: a sliding-window model is refused under
            sequence parallelism unless this is set (it then trains with full causal attention and a warning).

        > Parameters that control retention monitoring

        retention_eval_steps (`int`, *optional*, defaults to `0`):
            Measure long-context retrieval and short-context retention before training, every this many steps and at
            the end (logged as `eval_long/acc@L`, `eval_short/*`). `0` disables it.
        retention_probe_lengths (`list[int]`, *optional*, defaults to `[512, 1024, 2048]`):
            Prompt lengths in tokens of the retrieval probes; each is logged as `eval_long/acc@L`, the shortest also
            as `eval_short/acc@L`.
        retention_probes_per_length (`int`, *optional*, defaults to `8`):
            Retrieval probes per length, with the needle at depths spread evenly from 0 to 1.
        retention_short_samples (`int`, *optional*, defaults to `16`):
            Short prompts (from `eval_dataset`, else the training rows) on which the answer log-prob drift and KL of
            the policy against the reference are measured.
        retention_max_new_tokens (`int`, *optional*, defaults to `24`):
            Greedy tokens decoded per retrieval probe (a fixed count, no early stop; a cut answer scores as wrong).
        retention_documents (`str`, *optional*):
            Haystack documents for the probes (a file or directory, as `trl-longpo generate --documents`); `None`
            uses the built-in corpus (CPython's help topics).
        retention_documents_text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the text when `retention_documents` is a table (.jsonl/.json/.parquet/.csv).

    > [!NOTE]
    > These parameters have default values different from [`~trl.DPOConfig`], because DPO's are wrong for long
    > contexts or for the paper:
    > - `max_length`: `None` (no limit) instead of `1024`. DPO silently cuts every sequence to 1,024 tokens, which
    >   would reduce a 128K-token document to its first page.
    > - `truncation_mode`: `"error"` instead of `"keep_start"`. A row longer than `max_length` raises an error naming
    >   the row; `"drop"` removes such rows and logs how many. LongPO never truncates a document silently.
    > - `bf16`: on when a bf16-capable accelerator is present, off on CPU (DPOConfig's unconditional `True` refuses
    >   to start on a CPU-only machine).
    > - `learning_rate`: `5e-7`, `lr_scheduler_type`: `"cosine"`, `warmup_steps`: `0.1` (a ratio), as in the paper.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS

    learning_rate: float = field(
        default=5e-7,
        metadata={"help": "The initial learning rate (paper: 5e-7)."},
    )
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={"help": "The scheduler type to use (paper: cosine)."},
    )
    warmup_steps: float = field(
        default=0.1,
        metadata={
            "help": "Linear warmup over this many steps; a value below 1 is a ratio of the total steps (paper: 0.1)."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum tokens of a tokenized sequence (long prompt + answer, and short prompt + answer). `None` "
            "(default) means no limit. Rows above it raise an error, or are dropped with a logged count when "
            "`truncation_mode='drop'`. Nothing is ever truncated."
        },
    )
    truncation_mode: str = field(
        default="error",
        metadata={
            "help": "What to do with a row longer than `max_length`: `'error'` (default) stops with the row index and "
            "its length; `'drop'` removes the row and logs how many were removed. DPO's `'keep_start'` would cut the "
            "answer (or the document) and is refused.",
            "choices": list(TRUNCATION_MODES),
        },
    )
    dpo_weight: float = field(
        default=0.01,
        metadata={"help": "λ, the weight of the LongPO preference term: loss = nll_weight·NLL + dpo_weight·L_LongPO."},
    )
    nll_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the NLL term on the chosen long sequence."},
    )
    nll_scope: str = field(
        default="sequence",
        metadata={
            "help": "Tokens the NLL averages over: `'sequence'` (paper: the whole chosen long sequence, pads "
            "excluded) or `'completion'` (the chosen answer tokens only).",
            "choices": list(NLL_SCOPES),
        },
    )
    policy_rope_theta: float | None = field(
        default=None,
        metadata={
            "help": "RoPE base θ for the policy on long inputs (paper: 1e7 for Mistral-7B-Instruct-v0.2). The reference "
            "keeps the original θ. `None` keeps the model's θ."
        },
    )

    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Compute each pair's long prompt once: chosen and rejected are packed as one sequence "
            "[prompt][chosen][rejected] with tree attention (rejected never sees chosen; its positions continue from "
            "the prompt end); the reference shares each short prompt likewise. Same loss, metrics and gradients as "
            "the unshared path, about half the compute and activation memory at long context. False: score "
            "prompt+chosen and prompt+rejected as two sequences (DPOTrainer's layout)."
        },
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Number of ranks that split each sequence with ring attention (world = dp × sp; SP groups are "
            "consecutive ranks). 1 disables sequence parallelism."
        },
    )
    ulysses_degree: int = field(
        default=1,
        metadata={
            "help": "Ranks of each SP group that split attention heads (Ulysses all-to-all) instead of the sequence "
            "ring: 1 = ring only (default), sequence_parallel_size = Ulysses only, in between = hybrid (Ulysses within "
            "groups of ulysses_degree consecutive ranks, ring across). Must divide sequence_parallel_size and the "
            "query heads; fewer KV heads are replicated. See `trl-longpo plan`."
        },
    )
    ring_attn_impl: str = field(
        default="zigzag",
        metadata={
            "help": "ring-flash-attn implementation: 'zigzag' (default: balanced causal work, ~0.9× ideal scaling) or "
            "'llama3' (all-gathers K/V: better precision, no per-row padding to 2·sp, ~0.58× ideal).",
            "choices": list(RING_ATTN_IMPLS),
        },
    )
    ring_heads_k_stride: int = field(
        default=1,
        metadata={"help": "llama3 ring: number of kv heads all-gathered at a time; must divide the kv head count."},
    )
    sequence_parallel_reference: str = field(
        default="ring",
        metadata={
            "help": "How the reference scores the short inputs under sequence parallelism: 'ring' (split over the SP "
            "group like the policy) or 'local' (unsplit on every rank, with the reference model's own attention; "
            "needs a separate reference model and short inputs that fit one device).",
            "choices": list(SP_REFERENCE_MODES),
        },
    )
    ring_ignore_sliding_window: bool = field(
        default=False,
        metadata={
            "help": "Ring attention cannot apply a sliding window across ranks. By default a sliding-window model is "
            "refused under sequence parallelism; set this to train it with full causal attention (a warning is "
            "logged)."
        },
    )

    retention_eval_steps: int = field(
        default=0,
        metadata={
            "help": "Measure long-context retrieval and short-context retention before training, every this many "
            "steps and at the end (logged as eval_long/acc@L, eval_short/*). 0 (default) disables it."
        },
    )
    retention_probe_lengths: list[int] = field(
        default_factory=lambda: [512, 1024, 2048],
        metadata={
            "help": "Prompt lengths in tokens (chat template and question included) of the retrieval probes; each is "
            "logged as eval_long/acc@L, the shortest also as eval_short/acc@L."
        },
    )
    retention_probes_per_length: int = field(
        default=8,
        metadata={"help": "Retrieval probes per length, with the needle at depths spread evenly from 0 to 1."},
    )
    retention_short_samples: int = field(
        default=16,
        metadata={
            "help": "Short prompts (from eval_dataset, else the training rows) on which the policy's answer "
            "log-prob drift and KL against the reference are measured."
        },
    )
    retention_max_new_tokens: int = field(
        default=24,
        metadata={
            "help": "Greedy tokens decoded per retrieval probe (a fixed count: no early stop). Instruct models often "
            "restate the question before the number (\"The secret number of the silver fox is 35485.\" is ~16 "
            "tokens for SmolLM2), and a cut answer scores as wrong."
        },
    )
    retention_documents: str | None = field(
        default=None,
        metadata={
            "help": "Documents for the probes' haystack: a .txt/.jsonl file or directory (as `trl-longpo generate "
            "--documents`). None (default) uses the built-in corpus (CPython's help topics)."
        },
    )
    retention_documents_text_column: str = field(
        default="text",
        metadata={"help": "Column holding the text in a `retention_documents` table (.jsonl/.json/.parquet/.csv)."},
    )

    def __post_init__(self):
        problems = [
            f"`{name}` must be a finite number, got {getattr(self, name)}."
            for name in FINITE_FIELDS
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name))
        ]
        if math.isfinite(self.beta) and self.beta <= 0:
            problems.append(
                f"`beta` must be positive, got {self.beta}: β <= 0 removes or reverses the preference (the logged "
                "reward accuracy would still read high)."
            )
        problems += _retention_problems(self)
        if self.sequence_parallel_size < 1:
            problems.append(f"`sequence_parallel_size` must be >= 1, got {self.sequence_parallel_size}.")
        if self.ulysses_degree < 1 or self.sequence_parallel_size % max(self.ulysses_degree, 1):
            problems.append(
                f"`ulysses_degree` ({self.ulysses_degree}) must be a positive divisor of `sequence_parallel_size` "
                f"({self.sequence_parallel_size}): sp = ulysses_degree x ring degree."
            )
        if self.ring_attn_impl not in RING_ATTN_IMPLS:
            problems.append(f"`ring_attn_impl` must be one of {RING_ATTN_IMPLS}, got {self.ring_attn_impl!r}.")
        if self.ring_heads_k_stride < 1:
            problems.append(f"`ring_heads_k_stride` must be >= 1, got {self.ring_heads_k_stride}.")
        if self.sequence_parallel_reference not in SP_REFERENCE_MODES:
            problems.append(
                f"`sequence_parallel_reference` must be one of {SP_REFERENCE_MODES}, got "
                f"{self.sequence_parallel_reference!r}."
            )
        from trl_longpo.sequence_parallel.mesh import accelerate_parallelism_problem

        accelerate_sp = accelerate_parallelism_problem(self.parallelism_config, self.sequence_parallel_size)
        if accelerate_sp:
            problems.append(accelerate_sp)
        if self.nll_scope not in NLL_SCOPES:
            problems.append(f"`nll_scope` must be one of {NLL_SCOPES}, got {self.nll_scope!r}.")
        if self.truncation_mode not in TRUNCATION_MODES:
            problems.append(
                f"`truncation_mode={self.truncation_mode!r}` is not supported by LongPO: DPO's 'keep_start'/'keep_end' "
                "cut the long document or the answer. Use 'error' (default) or 'drop', or raise `max_length`."
            )
        if self.dpo_weight < 0 or self.nll_weight < 0:
            problems.append(
                f"`dpo_weight` ({self.dpo_weight}) and `nll_weight` ({self.nll_weight}) must be non-negative."
            )
        if self.dpo_weight == 0 and self.nll_weight == 0:
            problems.append("`dpo_weight` and `nll_weight` are both 0: the loss would be identically zero.")
        if self.max_length is not None and self.max_length <= 0:
            problems.append(f"`max_length` must be positive or None, got {self.max_length}.")
        if self.policy_rope_theta is not None and self.policy_rope_theta <= 0:
            problems.append(f"`policy_rope_theta` must be positive, got {self.policy_rope_theta}.")
        problems += inherited_field_problems(self)  # DPO options LongPO would otherwise ignore silently
        if problems:
            raise ValueError("Invalid LongPOConfig:\n- " + "\n- ".join(problems))
        if self.bf16 is None:
            # DPOConfig turns bf16 on unconditionally, which makes `TrainingArguments` refuse to start on a CPU-only
            # machine (a notebook, CI). Turn it on only where an accelerator supports it.
            self.bf16 = not self.fp16 and not self.use_cpu and _bf16_accelerator_available()
        super().__post_init__()

    # The Trainer pickles its arguments into `training_args.bin` of the run and of every checkpoint (and
    # `push_to_hub` uploads them): a pickled config never holds the hub token. Copies keep it.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __copy__(self) -> LongPOConfig:
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> LongPOConfig:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def _retention_problems(args: LongPOConfig) -> list[str]:
    problems = []
    if args.retention_eval_steps < 0:
        problems.append(f"`retention_eval_steps` must be >= 0 (0 disables it), got {args.retention_eval_steps}.")
    lengths = args.retention_probe_lengths
    if not lengths:
        problems.append("`retention_probe_lengths` is empty: give at least one probe length in tokens.")
    elif any(not isinstance(n, int) or n <= 0 for n in lengths):
        problems.append(f"`retention_probe_lengths` must be positive token counts, got {lengths}.")
    elif len(set(lengths)) != len(lengths):
        problems.append(f"`retention_probe_lengths` has duplicates: {lengths}.")
    for name in ("retention_probes_per_length", "retention_short_samples", "retention_max_new_tokens"):
        if getattr(args, name) < 1:
            problems.append(f"`{name}` must be >= 1, got {getattr(args, name)}.")
    return problems


def _bf16_accelerator_available() -> bool:
    import torch

    return (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )
