#!/usr/bin/env python
"""LongPOTrainer vs TRL's DPOTrainer: training-step time and memory on the same LongPO rows (a script, not a test).

    python benchmarks/longpo_vs_dpo.py                    # L_long in {1K, 2K, 4K} x batch {1, 2} (~4-5 min, 2 cores)
    python benchmarks/longpo_vs_dpo.py --quick            # smoke run (~35 s)
    python benchmarks/longpo_vs_dpo.py --lengths 2K,8K --short 512 --batch 1 --reps 5 --layers 2 --json out.json

What runs. A randomly initialised Mistral-architecture model (`trl_longpo.tiny.build_tiny_model`; default hidden 256,
MLP 512, 1 layer, 8 heads / 2 kv heads of 32, vocab 1024, fp32, `attn_implementation="sdpa"`: at these lengths
attention and MLP dominate the step; more layers scale every forward and backward alike and only make the run longer)
and the offline tiny tokenizer. For each (L_long, batch) the script builds `batch` conversational LongPO rows from the
help texts that ship with Python (`trl_longpo.tiny.corpus_texts()`), with exact token counts as DPOTrainer tokenizes
them: the long prompt L_long tokens (document + instruction, chat template included), the short prompt --short tokens
(the chunk the chosen answer quotes + the same instruction), both answers --answer tokens (EOS included). All
sequences of a batch then have the same length: no padding (with padding transformers passes an explicit attention
mask and CPU SDPA stops skipping the causal upper triangle, ~5x slower attention at 4K; --ragged shows that case).
Every trainer gets copies of the SAME initial weights:

  * DPOTrainer (`prompt`/`chosen`/`rejected`; `ref_model=copy.deepcopy(model)`, since DPOTrainer cannot reload a model
    built in memory): its reference scores the answers on the LONG prompt, i.e. re-runs the policy's long sequences
    without gradients;
  * LongPOTrainer (the same rows plus `short_prompt`; `ref_model=copy.deepcopy(model)`): its reference scores the
    answers on the SHORT prompt. Configurations: `nll_weight=0` (pure preference term: isolates the short-reference
    saving) and the default (`nll_scope="sequence"`, `nll_weight=1`: adds the NLL of the whole chosen long sequence);
  * the same three trainers with `precompute_ref_log_probs=True` (no reference model and no reference forward in the
    step; the reference log-probs are computed once, in the constructor: DPO over long inputs, LongPO over short ones).

Before anything is measured, the policy batches of all six trainers are checked to be token-for-token identical.

What is measured, per trainer, on one fixed collated batch (`trainer.data_collator([...])`):
  * step time: wall seconds of `trainer.training_step(trainer.model, batch)` = forward + backward (+ the reference
    forward when not precomputed), no optimizer step; gradients are reset (set to None) before each step, outside the
    timed region; the heap is not trimmed between timed steps, so they reuse memory as a training loop does. One
    warm-up step per trainer, then --reps rounds INTERLEAVED: each round runs every trainer's step and the two
    reference forwards below once, in an order rotated by one position per round, so slow phases of a shared machine
    hit all of them alike. A sample is dropped as contended when the process got less than 70% of its
    threads' CPU (process CPU seconds / wall seconds / torch threads; uncontended: ~95%): on this 2-core VM the host
    sometimes takes a core away for minutes, the two OpenMP threads then share one and small ops get up to 15x slower.
    Extra rounds (up to 2 x --reps) replace dropped samples; cells whose rounds are quick get extra rounds until they
    took --min-seconds (short steps are the noisiest). Reported: medians; ratio = median(LongPO) / median(DPO);
    paired range = min..max of the per-round ratios LongPO_i / DPO_i; process CPU seconds too.
  * reference forward: `trainer.compute_ref_log_probs(trainer.ref_model, batch)` of the trainers without precompute,
    interleaved with the steps: exactly the reference forward their step runs (DPO on the long sequences, LongPO on
    the short ones). And the one-off precompute pass (DPOTrainer's `_precompute_ref_logps` over the whole train
    dataset = the `batch` rows, timed once inside the trainer's constructor, cache write included; without a
    reference model it scores with the policy, whose fused LM head also computes entropy and top-1 metrics).
  * saved activations: bytes of the tensors autograd holds for backward when the backward starts (the policy forward's;
    the reference forward runs under no_grad and saves nothing), seen through `torch.autograd.graph.saved_tensors_hooks`
    (weak references, counted right before `accelerator.backward`), once per unique storage, parameters excluded: what
    benchmarks/sp_memory.py calls activations.
  * peak RSS delta: the process's peak resident set size during the step minus its RSS right before it (Linux VmHWM,
    reset through /proc/self/clear_refs after gc.collect() and malloc_trim(0); falls back to sampling RSS every 5 ms).
    It includes everything the step holds at once: the policy's saved activations, the transient working memory of
    the reference forward (which runs while those activations are alive), the backward's buffers and the gradients.

The two memory numbers come from a separate memory phase that runs first, one step per trainer (plus a warm-up and an
A/A repeat of DPO's step), in a process (re-)started with glibc malloc serving every block of 128 KiB or more by its
own mmap, returned on free: the peak RSS is then the peak of live bytes, reproducible to ~0.1 MiB (with the default
heap reuse the same step varies by +-10 MiB; switching this on later in a process does not help, old heap blocks get
reused). That mode page-faults on every large allocation (steps 30-70% slower), so the timing phase switches malloc
(mallopt) to a fixed 32 MiB mmap threshold: no page faults on reuse, as glibc's default ends up after warm-up.
CPU-specific: a GPU caching allocator behaves differently, and nothing here is a GPU number.

CPU caveat: TRL's fused LM head compacts to the labelled positions only on CUDA/XPU with Triton; on CPU it scores every
position, so DPO already pays the LM head over the whole sequence and LongPO's sequence-scope NLL costs almost nothing
extra here. On a GPU the NLL adds LM-head work over the chosen long sequences (not measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

# Shared with the sequence-parallel benchmark (same folder; scripts run with it on sys.path)
from sp_memory import PeakRSS, _malloc_trim, fmt_len, parse_length  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20

# (key, label, LongPOConfig overrides, precompute). Every LongPO configuration is compared with DPOTrainer on the same
# batch and the same `precompute_ref_log_probs`.
CONFIGS = [
    ("nll0", "nll_weight=0 (preference only)", {"nll_weight": 0.0, "dpo_weight": 1.0}, False),
    ("default", "default (nll_scope=sequence, nll_weight=1)", {}, False),
    ("nll0+pre", "nll_weight=0 + precompute", {"nll_weight": 0.0, "dpo_weight": 1.0}, True),
    ("default+pre", "default + precompute", {}, True),
]
QUESTION = "\n\nQuote, word for word, the passage of the text above that explains this topic."


# ------------------------------------------------------------------------------------------------------------------
# Memory helpers
# ------------------------------------------------------------------------------------------------------------------


class SavedActivations:
    """Bytes of the tensors autograd holds for backward when the backward starts, once per storage, parameters excluded.

    The pack hook keeps only a weak reference to each saved tensor; `snapshot()`, called right before
    `accelerator.backward`, counts the storages still alive then, i.e. those the autograd graph holds at the end of the
    forward (saved tensors of branches dropped during the forward are gone by then and not counted). Holding no strong
    reference, it does not change the step's memory, so the peak RSS is measured on the same step.
    """

    def __init__(self, *models):
        import torch

        self.torch = torch
        self.param_ptrs = {p.untyped_storage().data_ptr() for m in models if m is not None for p in m.parameters()}
        self.packed: list[weakref.ref] = []
        self.total: int | None = None

    def _pack(self, tensor):
        if (
            isinstance(tensor, self.torch.Tensor)
            and tensor.device.type != "meta"
            and tensor.untyped_storage().data_ptr() not in self.param_ptrs
        ):
            self.packed.append(weakref.ref(tensor))
        return tensor

    @staticmethod
    def _unpack(tensor):
        return tensor

    def hooks(self):
        return self.torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def snapshot(self) -> None:
        storages = {}
        for ref in self.packed:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        self.total = sum(storages.values())
        self.packed.clear()

    @contextlib.contextmanager
    def around(self, trainer):
        """Hooks on for the step; snapshot when the trainer calls `accelerator.backward` (end of the forward)."""
        accelerator = trainer.accelerator
        backward = accelerator.backward

        def snapshot_then_backward(loss, **kwargs):
            self.snapshot()
            return backward(loss, **kwargs)

        accelerator.backward = snapshot_then_backward
        try:
            with self.hooks():
                yield self
        finally:
            del accelerator.backward  # back to the class's method
        if self.total is None:
            raise RuntimeError("the step never called accelerator.backward")


# A timed sample is "clean" when the process got at least this share of its threads' CPU time (process CPU seconds
# >= CLEAN_UTILISATION x torch threads x wall seconds). Uncontended steps here use 1.8-2.0 CPU-s per wall-s with 2
# threads; when the host takes a core away, the two OpenMP threads share one (1.0 CPU-s per wall-s) and spin-wait on
# each other, and small ops get up to 15x slower: such samples would turn ratios into noise.
CLEAN_UTILISATION = 0.7

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Memory phase: the process starts (re-executed by __main__) with every malloc block of 128 KiB or more served by its
# own mmap and returned on free, so the peak RSS of a step is its peak of live bytes (plus small-block heap),
# reproducible to ~0.1 MiB. Set at startup on purpose: switched on later, blocks freed earlier into the heap are reused
# and the same step varies by +-10 MiB. That mode page-faults on every large allocation (steps 30-70% slower).
MEMORY_MODE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}
REEXEC_MARK = "LONGPO_VS_DPO_MALLOC"
# Timing phase: blocks below 32 MiB come from the heap and are reused without page faults, as glibc's default
# dynamic threshold ends up doing after warm-up, but fixed so that every trainer and cell runs under the same setting.
TIMING_MODE = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def memory_mode_active() -> bool:
    return os.environ.get(REEXEC_MARK) == "1" and all(os.environ.get(k) == v for k, v in MEMORY_MODE_ENV.items())


def set_timing_allocator() -> bool:
    """Switch glibc malloc to the timing setting; False where mallopt is unavailable (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in TIMING_MODE.items())
    except (OSError, AttributeError):
        return False


def _clean() -> None:
    gc.collect()
    _malloc_trim()


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------


class RowBuilder:
    """Conversational LongPO rows with exact lengths in tokens, as DPOTrainer tokenizes them (chat template included)."""

    def __init__(self, tokenizer):
        from trl_longpo.tiny import corpus_texts

        self.tokenizer = tokenizer
        self.ids = tokenizer("\n\n".join(corpus_texts()), add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]

    def prompt_tokens(self, content: str) -> int:
        return len(self._render([{"role": "user", "content": content}], True))

    def answer_tokens(self, content: str) -> int:
        """Completion tokens of an assistant answer (EOS included), as DPOTrainer splits prompt and completion."""
        prompt = [{"role": "user", "content": QUESTION}]
        full = self._render(prompt + [{"role": "assistant", "content": content}], False)
        return len(full) - len(self._render(prompt, True))

    def _text(self, start: int, n: int) -> str:
        return self.tokenizer.decode(self.ids[start : start + n])

    @staticmethod
    def _fit(make, measure, target: int, n: int) -> tuple[str, int]:
        """Adjust n (corpus tokens taken) until measure(make(n)) == target (or the closest seen)."""
        best, tried = None, set()

        def attempt(n: int) -> bool:
            nonlocal best
            tried.add(n)
            content = make(n)
            got = measure(content)
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (content, got, n)
            return got == target

        for _ in range(8):  # Newton-like steps: one corpus token is about one rendered token
            if attempt(n):
                return best[:2]
            n = max(1, n + (target - best[1]))
            if n in tried:
                break
        for delta in (1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6):  # merges at the seams can skip a count: scan nearby
            n = best[2] + delta
            if n >= 1 and n not in tried and attempt(n):
                break
        return best[:2]

    def _fit_shifted(self, make, measure, target: int, n: int) -> tuple[str, int, int]:
        """`_fit` of make(shift, n), trying later start positions in the corpus until one renders exactly."""
        best = None
        for shift in range(24):
            content, got = self._fit(lambda k, shift=shift: make(shift, k), measure, target, n)
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (content, got, shift)
            if got == target:
                break
        return best

    def row(self, long_tokens: int, short_tokens: int, chosen_tokens: int, rejected_tokens: int, index: int) -> dict:
        overhead = self.prompt_tokens(QUESTION)  # template + instruction
        need = long_tokens + 4 * max(chosen_tokens, rejected_tokens)
        start = (index * 104_729) % (len(self.ids) - need - 1)  # a different place in the corpus for each row
        chunk_start = start + (long_tokens - short_tokens) // 2  # the chunk sits in the middle of the document
        chunk, short_got, shift = self._fit_shifted(
            lambda sh, n: self._text(chunk_start + sh, n) + QUESTION,
            self.prompt_tokens,
            short_tokens,
            short_tokens - overhead,
        )
        chunk = chunk[: -len(QUESTION)]
        before = self._text(start, chunk_start + shift - start)
        after_start = chunk_start + shift + short_tokens
        long_text, long_got, _ = self._fit_shifted(
            lambda sh, n: before + chunk + self._text(after_start + sh, n) + QUESTION,
            self.prompt_tokens,
            long_tokens,
            max(1, long_tokens - (chunk_start - start) - short_tokens),
        )
        # chosen: a quote from the chunk (what the short prompt supports); rejected: from elsewhere in the document
        chosen, chosen_got, _ = self._fit_shifted(
            lambda sh, n: self._text(chunk_start + shift + 8 + sh, n),
            self.answer_tokens,
            chosen_tokens,
            chosen_tokens - 1,
        )
        rejected, rejected_got, _ = self._fit_shifted(
            lambda sh, n: self._text(start + 8 + sh, n), self.answer_tokens, rejected_tokens, rejected_tokens - 1
        )
        return {
            "prompt": [{"role": "user", "content": long_text}],
            "short_prompt": [{"role": "user", "content": chunk + QUESTION}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "_tokens": {"long": long_got, "short": short_got, "chosen": chosen_got, "rejected": rejected_got},
        }


# ------------------------------------------------------------------------------------------------------------------
# Trainers
# ------------------------------------------------------------------------------------------------------------------


class _TimedPrecompute:
    """Records the wall time of the precompute pass that the trainer's constructor runs (cache write included)."""

    precompute_s: float | None = None

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.precompute_s = time.perf_counter() - start
        return out


def build_trainers(base_model, tokenizer, rows: list[dict], batch: int, workdir: str) -> tuple[dict, dict]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_longpo import LongPOConfig, LongPOTrainer

    class TimedDPOTrainer(_TimedPrecompute, DPOTrainer):
        pass

    class TimedLongPOTrainer(_TimedPrecompute, LongPOTrainer):
        pass

    common = {
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "max_length": None,  # DPOConfig's 1024 would cut the long prompts
        "per_device_train_batch_size": batch,
        "disable_tqdm": True,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    long_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    dpo_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in long_rows]
    trainers, build_s = {}, {}
    for precompute in (False, True):
        key = "dpo+pre" if precompute else "dpo"
        start = time.perf_counter()
        trainers[key] = TimedDPOTrainer(
            model=copy.deepcopy(base_model),
            # DPOTrainer cannot reload a model built in memory: the reference is a copy. With precompute the copy is
            # not needed (TRL then keeps no reference model; the policy's initial weights score the pass).
            ref_model=None if precompute else copy.deepcopy(base_model),
            args=DPOConfig(output_dir=f"{workdir}/{key}", precompute_ref_log_probs=precompute, **common),
            train_dataset=Dataset.from_list(dpo_rows),
            processing_class=tokenizer,
        )
        build_s[key] = time.perf_counter() - start
    for name, _, overrides, precompute in CONFIGS:
        key = f"longpo:{name}"
        start = time.perf_counter()
        trainers[key] = TimedLongPOTrainer(
            model=copy.deepcopy(base_model),
            ref_model=None if precompute else copy.deepcopy(base_model),
            args=LongPOConfig(
                output_dir=f"{workdir}/{name}", precompute_ref_log_probs=precompute, **common, **overrides
            ),
            train_dataset=Dataset.from_list(long_rows),
            processing_class=tokenizer,
        )
        build_s[key] = time.perf_counter() - start
    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`; `training_step` divides the loss by it
    return trainers, build_s


def collate(trainer, dataset=None) -> dict:
    dataset = trainer.train_dataset if dataset is None else dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


# ------------------------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------------------------


def step_fn(trainer, batch):
    def run():
        return trainer.training_step(trainer.model, batch)

    return run


def ref_fn(trainer, batch):
    """The reference forward exactly as the trainer's step runs it: its reference model on the step's batch."""

    def run():
        return trainer.compute_ref_log_probs(trainer.ref_model, batch)

    return run


def measure(fn, trainer, meter: SavedActivations | None = None, trim: bool = False) -> dict:
    """Run fn once: wall and process CPU seconds, peak RSS delta, and the saved activations with a meter. `trim`
    (memory phase) returns free heap memory to the OS first, so the RSS delta counts every byte the step touches; the
    timing phase does not trim: steps then reuse the heap as in a training loop, without page faults."""
    trainer.model.zero_grad(set_to_none=True)
    gc.collect()
    if trim:
        _malloc_trim()
    rss = PeakRSS()
    wall, cpu = time.perf_counter(), time.process_time()
    with meter.around(trainer) if meter is not None else contextlib.nullcontext():
        fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss.stop()
    out = {"wall_s": wall, "cpu_s": cpu, "rss_delta_bytes": peak, "rss_method": "VmHWM" if rss.use_hwm else "sampled"}
    if meter is not None:
        out["saved_bytes"] = meter.total
    trainer.model.zero_grad(set_to_none=True)
    return out


@contextlib.contextmanager
def cell_setup(base_model, tokenizer, builder: RowBuilder, long_tokens: int, batch: int, args):
    """Rows, the six trainers and their batches for one (L_long, batch), with the input checks; yields the items to
    run: every trainer's step and the two reference forwards."""
    import torch

    rejected_tokens = args.answer - (4 if args.ragged else 0)
    rows = [builder.row(long_tokens, args.short, args.answer, rejected_tokens, index=i) for i in range(batch)]
    with tempfile.TemporaryDirectory(prefix="longpo_vs_dpo_") as workdir:
        trainers, build_s = build_trainers(base_model, tokenizer, rows, batch, workdir)
        batches = {key: collate(t) for key, t in trainers.items()}

        # Same policy inputs, token for token, in every trainer
        for key, b in batches.items():
            if not torch.equal(b["input_ids"], batches["dpo"]["input_ids"]) or not torch.equal(
                b["completion_mask"], batches["dpo"]["completion_mask"]
            ):
                raise AssertionError(f"{key}: policy inputs differ from DPOTrainer's")
        for key in ("dpo+pre", "longpo:nll0+pre", "longpo:default+pre"):
            if "ref_chosen_logps" not in batches[key] or trainers[key].ref_model is not None:
                raise AssertionError(f"{key}: expected precomputed reference log-probs and no reference model")
        policy, short = batches["dpo"]["attention_mask"], batches["longpo:nll0"]["ref_attention_mask"]
        lengths = {
            "dpo_ref_seq": tuple(policy.shape),  # DPO's reference scores the policy's own batch
            "longpo_ref_seq": tuple(short.shape),
            "policy_padding": int(policy.numel() - policy.sum()),
            "reference_padding": int(short.numel() - short.sum()),
            "long_prompt": [r["_tokens"]["long"] for r in rows],
            "short_prompt": [r["_tokens"]["short"] for r in rows],
            "chosen": [len(x) for x in trainers["longpo:nll0"].train_dataset["chosen_ids"]],
            "rejected": [len(x) for x in trainers["longpo:nll0"].train_dataset["rejected_ids"]],
        }
        items = {key: (step_fn(t, batches[key]), t) for key, t in trainers.items()}
        items["ref:dpo"] = (ref_fn(trainers["dpo"], batches["dpo"]), trainers["dpo"])
        items["ref:longpo"] = (ref_fn(trainers["longpo:nll0"], batches["longpo:nll0"]), trainers["longpo:nll0"])
        precompute_s = {key: t.precompute_s for key, t in trainers.items() if t.precompute_s is not None}
        # Objects alive now (models, datasets, tokenizer, modules) are never garbage: freezing them keeps the
        # gc.collect() before each measurement cheap (~1 ms instead of ~0.2 s)
        gc.collect()
        gc.freeze()
        try:
            yield {"items": items, "lengths": lengths, "build_s": build_s, "precompute_s": precompute_s}
        finally:
            del trainers, items, batches
            gc.unfreeze()
    _clean()


def memory_cell(base_model, tokenizer, builder, long_tokens: int, batch: int, args) -> dict:
    """One run of every item with saved-activation and peak-RSS measurement (process in memory allocator mode)."""
    with cell_setup(base_model, tokenizer, builder, long_tokens, batch, args) as cell:
        items = cell["items"]
        measure(*items["dpo"], trim=True)  # warm-up: one-off allocations of the first step at these shapes
        memory = {}
        for key, (fn, trainer) in items.items():
            meter = None if key.startswith("ref:") else SavedActivations(trainer.model, trainer.ref_model)
            memory[key] = measure(fn, trainer, meter, trim=True)
        # A/A control: DPO's step once more; its difference from the first measurement is the noise floor
        fn, trainer = items["dpo"]
        memory["dpo:again"] = measure(fn, trainer, SavedActivations(trainer.model, trainer.ref_model), trim=True)
    return {"long_tokens": long_tokens, "batch": batch, "lengths": cell["lengths"], "memory": memory}


def is_clean(sample: dict) -> bool:
    """Whether the process got (almost) all its threads' worth of CPU during the sample (see CLEAN_UTILISATION)."""
    return sample["cpu_s"] >= CLEAN_UTILISATION * sample["threads"] * sample["wall_s"]


def timing_cell(base_model, tokenizer, builder, long_tokens: int, batch: int, args) -> dict:
    """One warm-up per item, then interleaved rounds (order rotated by one per round): `args.reps` rounds, plus up to
    2 x `args.reps` more while some item has fewer than `args.reps` clean samples (machine contention, see is_clean)
    or the rounds took less than `args.min_seconds` in all (short steps: more samples for the same cost)."""
    import torch

    threads = torch.get_num_threads()
    with cell_setup(base_model, tokenizer, builder, long_tokens, batch, args) as cell:
        items = cell["items"]
        results = {key: {"warmup": measure(fn, trainer), "reps": []} for key, (fn, trainer) in items.items()}
        order = list(items)
        rounds, started = 0, time.monotonic()

        def more() -> bool:
            if rounds < args.reps:
                return True
            if rounds >= 3 * args.reps:
                return False
            short_of_clean = any(sum(is_clean(r) for r in results[key]["reps"]) < args.reps for key in items)
            return short_of_clean or time.monotonic() - started < args.min_seconds

        while more():
            shift = rounds % len(order)
            for key in order[shift:] + order[:shift]:
                fn, trainer = items[key]
                results[key]["reps"].append({**measure(fn, trainer), "round": rounds, "threads": threads})
            rounds += 1
    return {
        "long_tokens": long_tokens,
        "batch": batch,
        "lengths": cell["lengths"],
        "build_s": cell["build_s"],
        "precompute_s": cell["precompute_s"],
        "results": results,
    }


# ------------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------------


def samples(cell: dict, key: str) -> list[dict]:
    """The clean timed samples of an item (all of them if none is clean)."""
    reps = cell["results"][key]["reps"]
    return [r for r in reps if is_clean(r)] or reps


def med(cell: dict, key: str, field: str = "wall_s") -> float:
    return statistics.median(r[field] for r in samples(cell, key))


def paired(cell: dict, key: str, base: str, field: str = "wall_s") -> list[float]:
    """Per-round ratios key/base over the rounds where both samples are clean (all rounds if there is none)."""
    pairs = list(zip(cell["results"][key]["reps"], cell["results"][base]["reps"]))
    clean = [(a, b) for a, b in pairs if is_clean(a) and is_clean(b)] or pairs
    return [a[field] / b[field] for a, b in clean]


def clean_count(cell: dict, keys) -> str:
    counts = [sum(is_clean(r) for r in cell["results"][k]["reps"]) for k in keys]
    return f"{min(counts)}/{len(cell['results'][keys[0]]['reps'])}"


def summarise(cell: dict) -> list[dict]:
    ref_dpo, ref_longpo = med(cell, "ref:dpo"), med(cell, "ref:longpo")
    rows = []
    for name, label, _, precompute in CONFIGS:
        key, base = f"longpo:{name}", "dpo+pre" if precompute else "dpo"
        pr = paired(cell, key, base)
        row = {
            "L_long": cell["long_tokens"],
            "batch": cell["batch"],
            "config": name,
            "label": label,
            "precompute": precompute,
            "dpo_step_s": med(cell, base),
            "longpo_step_s": med(cell, key),
            "ratio": med(cell, key) / med(cell, base),
            "paired_min": min(pr),
            "paired_max": max(pr),
            "cpu_ratio": med(cell, key, "cpu_s") / med(cell, base, "cpu_s"),
            "clean": clean_count(cell, [key, base]),
            "dpo_saved_bytes": cell["memory"][base]["saved_bytes"],
            "longpo_saved_bytes": cell["memory"][key]["saved_bytes"],
            "dpo_rss_bytes": cell["memory"][base]["rss_delta_bytes"],
            "longpo_rss_bytes": cell["memory"][key]["rss_delta_bytes"],
            "dpo_ref_pass_s": ref_dpo,
            "longpo_ref_pass_s": ref_longpo,
            "ref_pass_ratio": ref_longpo / ref_dpo,
        }
        if precompute:
            row.update(
                dpo_precompute_s=cell["precompute_s"][base],
                longpo_precompute_s=cell["precompute_s"][key],
                precompute_ratio=cell["precompute_s"][key] / cell["precompute_s"][base],
            )
        else:
            # What the step ratio would be if the only difference were the reference forward, measured alone
            row["expected_ratio"] = 1 - (ref_dpo - ref_longpo) / row["dpo_step_s"]
        rows.append(row)
    return rows


def _table(header: list[str], align: str, body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "–"


def time_table(rows: list[dict]) -> str:
    header = [
        "L_long",
        "batch",
        "config",
        "DPO step s (median)",
        "LongPO step s (median)",
        "ratio LongPO/DPO",
        "paired range",
        "clean rounds",
        "CPU-s ratio",
        "expected from the reference forwards",
        "precompute one-off DPO s",
        "LongPO s",
        "one-off ratio",
    ]
    body = []
    for r in rows:
        tail = ["–", "–", "–", "–"]
        if r["precompute"]:
            tail = [
                "–",
                f"{r['dpo_precompute_s']:.3f}",
                f"{r['longpo_precompute_s']:.3f}",
                f"**{r['precompute_ratio']:.3f}**",
            ]
        else:
            tail[0] = f"{r['expected_ratio']:.3f}"
        body.append(
            [
                fmt_len(r["L_long"]),
                str(r["batch"]),
                r["label"],
                f"{r['dpo_step_s']:.3f}",
                f"{r['longpo_step_s']:.3f}",
                f"**{r['ratio']:.3f}**",
                f"{r['paired_min']:.3f}–{r['paired_max']:.3f}",
                r["clean"],
                f"{r['cpu_ratio']:.3f}",
                *tail,
            ]
        )
    return _table(header, "rrlrrrlrrrrrr", body)


def memory_table(rows: list[dict]) -> str:
    header = [
        "L_long",
        "batch",
        "config",
        "saved activations DPO MiB",
        "LongPO MiB",
        "ratio",
        "peak RSS Δ DPO MiB",
        "LongPO MiB",
        "ratio",
    ]
    body = [
        [
            fmt_len(r["L_long"]),
            str(r["batch"]),
            r["label"],
            f"{r['dpo_saved_bytes'] / MIB:.1f}",
            f"{r['longpo_saved_bytes'] / MIB:.1f}",
            f"**{_ratio(r['longpo_saved_bytes'], r['dpo_saved_bytes'])}**",
            f"{r['dpo_rss_bytes'] / MIB:.1f}",
            f"{r['longpo_rss_bytes'] / MIB:.1f}",
            f"**{_ratio(r['longpo_rss_bytes'], r['dpo_rss_bytes'])}**",
        ]
        for r in rows
    ]
    return _table(header, "rrlrrrrrr", body)


def reference_table(cells: list[dict]) -> str:
    header = [
        "L_long",
        "batch",
        "long prompt tokens",
        "short prompt tokens",
        "chosen / rejected tokens",
        "policy batch = DPO reference batch",
        "LongPO reference batch",
        "padding tokens (policy / LongPO ref.)",
        "reference tokens LongPO/DPO",
        "reference forward DPO s",
        "LongPO s",
        "ratio",
        "reference forward peak RSS Δ DPO MiB",
        "LongPO MiB",
        "ratio",
        "DPO reference forward / DPO step",
    ]
    body = []
    for c in cells:
        ln = c["lengths"]
        p, q = ln["dpo_ref_seq"], ln["longpo_ref_seq"]
        rd, rl = med(c, "ref:dpo"), med(c, "ref:longpo")
        md, ml = (c["memory"][k]["rss_delta_bytes"] for k in ("ref:dpo", "ref:longpo"))
        body.append(
            [
                fmt_len(c["long_tokens"]),
                str(c["batch"]),
                str(ln["long_prompt"]),
                str(ln["short_prompt"]),
                f"{ln['chosen']} / {ln['rejected']}",
                f"{p[0]} × {p[1]}",
                f"{q[0]} × {q[1]}",
                f"{ln['policy_padding']} / {ln['reference_padding']}",
                _ratio(q[0] * q[1], p[0] * p[1]),
                f"{rd:.3f}",
                f"{rl:.3f}",
                _ratio(rl, rd),
                f"{md / MIB:.1f}",
                f"{ml / MIB:.1f}",
                _ratio(ml, md),
                _ratio(rd, med(c, "dpo")),
            ]
        )
    return _table(header, "rrlllllrrrrrrrrr", body)


def _span(values) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}–{high:.3f}"


def explanation(rows: list[dict], cells: list[dict]) -> str:
    def find(config, length, batch):
        return next(r for r in rows if r["config"] == config and r["L_long"] == length and r["batch"] == batch)

    last = max(cells, key=lambda c: (c["long_tokens"], c["batch"]))
    length, batch = last["long_tokens"], last["batch"]
    n0, pre = find("nll0", length, batch), find("nll0+pre", length, batch)
    live = [r for r in rows if not r["precompute"]]
    pres = [r for r in rows if r["precompute"]]
    ln = last["lengths"]
    ref_share = [med(c, "ref:dpo") / med(c, "dpo") for c in cells]
    mem = [c["memory"] for c in cells]
    dpo_ref_peak = [m["dpo"]["rss_delta_bytes"] / m["dpo+pre"]["rss_delta_bytes"] for m in mem]
    ref_peak = [m["ref:longpo"]["rss_delta_bytes"] / m["ref:dpo"]["rss_delta_bytes"] for m in mem]
    saved = [r["longpo_saved_bytes"] / r["dpo_saved_bytes"] for r in rows]
    rss = [r["longpo_rss_bytes"] / r["dpo_rss_bytes"] for r in rows]
    ref_ratio = [med(c, "ref:longpo") / med(c, "ref:dpo") for c in cells]
    token_ratio = [c["lengths"]["longpo_ref_seq"][1] / c["lengths"]["dpo_ref_seq"][1] for c in cells]
    paragraphs = [
        (
            "Where the difference comes from. Both trainers run the same policy forward + backward on the same long "
            "sequences (chosen and rejected stacked; input_ids checked identical). The only other work in a step is the "
            "frozen reference's forward, without gradients: DPOTrainer re-scores the answers on the LONG prompt, i.e. "
            f"re-runs the policy's {ln['dpo_ref_seq'][0]} × {ln['dpo_ref_seq'][1]} tokens at L_long={fmt_len(length)}, "
            f"batch {batch}, while LongPOTrainer scores them on the SHORT prompt ({ln['longpo_ref_seq'][0]} × "
            f"{ln['longpo_ref_seq'][1]} tokens; reference forward time ratios LongPO/DPO {_span(ref_ratio)} for token "
            f"ratios {_span(token_ratio)}). DPO's reference forward is {_span(ref_share)} of its step here (it would be "
            "1/4 if the backward cost exactly twice the forward), and that share is all LongPO can save in a step: the "
            "step ratio tends to 1 − that share as L_long/L_short grows. Measured step ratios without precompute: "
            f"{_span(r['ratio'] for r in live)}; expected from the reference forwards timed alone (1 − (DPO reference "
            f"− LongPO reference) / DPO step): {_span(r['expected_ratio'] for r in live)}. At "
            f"L_long={fmt_len(length)}, batch {batch}: DPO {n0['dpo_step_s']:.3f} s vs LongPO "
            f"{n0['longpo_step_s']:.3f} s, a saving of {n0['dpo_step_s'] - n0['longpo_step_s']:.3f} s, against "
            f"{n0['dpo_ref_pass_s'] - n0['longpo_ref_pass_s']:.3f} s between the reference forwards alone "
            f"({n0['dpo_ref_pass_s']:.3f} − {n0['longpo_ref_pass_s']:.3f} s)."
        ),
        (
            "With precompute_ref_log_probs neither step runs a reference forward, so both do the same work: step "
            f"ratios {_span(r['ratio'] for r in pres)}, which is the noise level of this machine (the control; at "
            f"L_long={fmt_len(length)}, batch {batch}: LongPO {pre['longpo_step_s']:.3f} s vs DPO "
            f"{pre['dpo_step_s']:.3f} s; LongPO's policy side also builds three token masks and per-row sums of three "
            "fields, ~1% of a step in a profile). The saving moves to the one-off precompute pass, which LongPO runs "
            f"over the short inputs only: one-off time ratios {_span(r['precompute_ratio'] for r in pres)} (fixed "
            "per-pass costs, DataLoader and cache write, keep them above the reference forward ratios)."
        ),
        (
            "The default configuration adds the NLL over the whole chosen long sequence. On CPU it costs almost nothing: "
            "TRL's fused LM head compacts to the labelled positions only on CUDA/XPU with Triton, so here it scores every "
            "position for DPO as well, and the sequence NLL only changes which log-probs are summed (default vs "
            "nll_weight=0 ratios differ within the paired ranges). On a GPU, DPO's fused head scores only the answer "
            "tokens, and LongPO's sequence NLL adds the LM head (forward and backward) over the chosen long sequences: "
            "not measured here."
        ),
        (
            "Memory. The reference forward runs under no_grad and saves nothing for backward, so the saved activations "
            f"are the policy's, identical in both trainers (ratios {_span(saved)}). What LongPO saves is the reference "
            "forward's transient working memory (reference forward alone: peak RSS ratio LongPO/DPO "
            f"{_span(ref_peak)}), but that is not where a step peaks: DPO's own step peak with the reference forward vs "
            f"without it (precompute) is {_span(dpo_ref_peak)}, i.e. the step peaks later, in the backward (gradients "
            "and backward buffers on top of the saved activations), so the step's peak RSS ratios LongPO/DPO are "
            f"{_span(rss)}: no step-memory saving at these sizes. Gradient checkpointing (what long-context training "
            "uses) shrinks the saved activations to about one layer's worth, which makes the reference forward's "
            "transient memory a larger share of the peak: not measured here."
        ),
    ]
    slower = [r for r in live if r["ratio"] >= 1.0]
    if slower:
        paragraphs.append(
            "LongPO was NOT faster in: "
            + "; ".join(
                f"L_long={fmt_len(r['L_long'])}, batch {r['batch']}, {r['label']} ({r['ratio']:.3f})" for r in slower
            )
            + "."
        )
    consistently = [r for r in pres if r["paired_min"] > 1.0]
    if consistently:
        paragraphs.append(
            "With precompute, LongPO's step was slower than DPO's in every round in: "
            + "; ".join(
                f"L_long={fmt_len(r['L_long'])}, batch {r['batch']}, {r['label']} ({r['ratio']:.3f}, paired "
                f"{r['paired_min']:.3f}–{r['paired_max']:.3f})"
                for r in consistently
            )
            + ". Both steps run the same policy work there; LongPO's extra per-token bookkeeping is ~1%, so a few "
            "percent more is mostly machine noise over only a few rounds (rerun with --reps 9 to check)."
        )
    contended = [c for c in cells if any(not is_clean(r) for v in c["results"].values() for r in v["reps"])]
    if contended:
        paragraphs.append(
            "Machine contention: some timed samples ran with less than "
            f"{CLEAN_UTILISATION:.0%} of the expected CPU (CPU-s / wall-s / threads) in "
            + ", ".join(f"L_long={fmt_len(c['long_tokens'])} batch {c['batch']}" for c in contended)
            + "; they were left out of the medians and extra rounds were run (see 'clean rounds')."
        )
    return "\n\n".join(paragraphs)


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lengths", default="1K,2K,4K", help="comma-separated long-prompt tokens L_long (2K = 2048)")
    parser.add_argument("--short", default="256", help="short-prompt tokens L_short (must be < every L_long)")
    parser.add_argument("--answer", type=int, default=64, help="tokens of each answer (chosen, rejected)")
    parser.add_argument("--batch", default="1,2", help="comma-separated per-device batch sizes (pairs per step)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per trainer (>= 3; medians)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=15.0,
        help="more rounds (up to 3 x --reps) while a cell's timed rounds took less than this: short steps are noisier",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="rejected answers 4 tokens shorter than chosen: padded batches (explicit attention mask; see the notes)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (~35 s): defaults L_long in {512, 1K}, batch 1"
    )
    parser.add_argument("--json", type=Path, help="also write all raw measurements here")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(lengths="512,1K", batch="1")
    args = parser.parse_args(argv)

    lengths = sorted(parse_length(x) for x in args.lengths.split(","))
    batches = sorted(int(x) for x in args.batch.split(","))
    args.short = parse_length(args.short)
    if args.reps < 3:
        parser.error("--reps must be at least 3")
    if any(n <= args.short for n in lengths):
        parser.error(f"every L_long must exceed --short={args.short}")
    if args.short < 64:
        parser.error("--short must be at least 64 tokens (template + instruction + chunk)")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be divisible by --heads and --heads by --kv-heads")

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    from trl_longpo.tiny import build_tiny_model, build_tiny_tokenizer

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.monotonic()
    memory_controlled = memory_mode_active()
    tokenizer = build_tiny_tokenizer(args.vocab)
    base_model = build_tiny_model(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        seed=0,
        attn_implementation="sdpa",
    ).float()
    builder = RowBuilder(tokenizer)
    params = sum(p.numel() for p in base_model.parameters())
    print(
        f"# longpo_vs_dpo: Mistral-architecture model, hidden {args.hidden}, MLP {base_model.config.intermediate_size}, "
        f"{args.layers} layer{'s' if args.layers > 1 else ''}, {args.heads} heads / {args.kv_heads} kv heads of "
        f"{args.hidden // args.heads}, vocab "
        f"{args.vocab} ({params / 1e6:.2f} M parameters), fp32, sdpa; L_short {args.short}, answers {args.answer} "
        f"tokens{' (rejected 4 fewer: padded batches)' if args.ragged else ''}; {args.reps} interleaved repetitions "
        f"after 1 warm-up; torch {torch.__version__} ({torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}), transformers {transformers.__version__}, trl {trl.__version__}, "
        f"datasets {datasets.__version__}",
        flush=True,
    )
    grid = [(long_tokens, batch) for long_tokens in lengths for batch in batches]

    # Phase 1, memory: in the allocator mode this process was started in (see MEMORY_MODE_ENV)
    memory = {}
    for long_tokens, batch in grid:
        t = time.monotonic()
        m = memory_cell(base_model, tokenizer, builder, long_tokens, batch, args)
        memory[long_tokens, batch] = m
        mm = m["memory"]
        print(
            f"  memory L_long={fmt_len(long_tokens):>4} batch={batch}: step peak RSS Δ DPO "
            f"{mm['dpo']['rss_delta_bytes'] / MIB:.1f} MiB (again: {mm['dpo:again']['rss_delta_bytes'] / MIB:.1f}), "
            f"LongPO {mm['longpo:nll0']['rss_delta_bytes'] / MIB:.1f} MiB; saved activations DPO "
            f"{mm['dpo']['saved_bytes'] / MIB:.1f} MiB, LongPO {mm['longpo:nll0']['saved_bytes'] / MIB:.1f} MiB "
            f"({time.monotonic() - t:.0f} s)",
            flush=True,
        )

    # Phase 2, time: blocks below 32 MiB reused from the heap (no page faults), the same for every trainer
    timing_controlled = set_timing_allocator()
    cells = []
    for long_tokens, batch in grid:
        t = time.monotonic()
        cell = timing_cell(base_model, tokenizer, builder, long_tokens, batch, args)
        cell["memory"] = memory[long_tokens, batch]["memory"]
        cells.append(cell)
        s = {r["config"]: r for r in summarise(cell)}
        print(
            f"  time L_long={fmt_len(long_tokens):>4} batch={batch}: DPO step {s['nll0']['dpo_step_s']:.3f} s, LongPO "
            f"nll0 {s['nll0']['longpo_step_s']:.3f} s ({s['nll0']['ratio']:.3f}x), default "
            f"{s['default']['longpo_step_s']:.3f} s ({s['default']['ratio']:.3f}x); precompute: DPO "
            f"{s['nll0+pre']['dpo_step_s']:.3f} s, LongPO {s['nll0+pre']['longpo_step_s']:.3f} s "
            f"({s['nll0+pre']['ratio']:.3f}x), one-off pass {s['nll0+pre']['precompute_ratio']:.3f}x "
            f"({time.monotonic() - t:.0f} s)",
            flush=True,
        )
    rows = [r for c in cells for r in summarise(c)]
    rss_method = cells[0]["memory"]["dpo"]["rss_method"]
    aa_spread = max(
        abs(c["memory"]["dpo:again"]["rss_delta_bytes"] - c["memory"]["dpo"]["rss_delta_bytes"]) for c in cells
    )

    print()
    print("## Step time: LongPOTrainer / DPOTrainer on the same rows (ratios; medians of interleaved repetitions)")
    print()
    print(time_table(rows))
    print()
    print(
        "step = `trainer.training_step(model, batch)` (forward + backward, + reference forward unless precomputed; no "
        "optimizer step), wall seconds, medians over clean samples; ratio = median LongPO / median DPO with the same "
        "batch and the same precompute setting; paired range = min–max over rounds of LongPO_i / DPO_i (one round runs "
        "every trainer and both reference forwards once, order rotated per round); clean rounds = rounds where both "
        f"samples got >= {CLEAN_UTILISATION:.0%} of {torch.get_num_threads()} threads' CPU (contended ones are "
        "dropped and replaced by extra rounds); CPU-s ratio = the same ratio on process CPU seconds. expected from "
        "the reference forwards = 1 − (DPO reference forward − LongPO reference forward) / DPO step: the ratio if the "
        "reference forward were the only difference. precompute one-off = the trainer constructor's reference pass "
        "over the train dataset (the `batch` rows; one measurement each, cache write included; scored with the policy "
        "model, as DPOTrainer does without a reference model)."
    )
    print()
    print("## Memory of one step")
    print()
    print(memory_table(rows))
    print()
    print(
        "saved activations = bytes of the tensors autograd holds for backward when the backward starts (unique "
        "storages, parameters excluded; saved_tensors_hooks; the no_grad reference forward saves none). peak RSS Δ = "
        f"peak resident memory during the step minus RSS right before it ({rss_method}, after gc + malloc_trim): the "
        "policy's saved activations + the reference forward's transient buffers + the backward's buffers + gradients. "
        "Both from one run per trainer in a separate memory phase, in a process started with glibc malloc serving every "
        "block of 128 KiB or more by its own mmap, "
        + (
            "so the peak is the peak of live bytes (A/A control, DPO's step measured twice: differences up to "
            f"{aa_spread / MIB:.1f} MiB)."
            if memory_controlled
            else "EXCEPT HERE: this process was not started in that mode (not glibc, or main() called directly), so "
            "expect +-10 MiB of heap-reuse noise."
        )
    )
    print()
    print("## Inputs and the reference forward alone, per (L_long, batch)")
    print()
    print(reference_table(cells))
    print()
    print(
        "reference forward = `compute_ref_log_probs(ref_model, batch)` of the trainers without precompute, i.e. the "
        "reference forward their step runs: wall seconds (medians of the interleaved rounds) and peak RSS Δ (memory "
        "phase); DPO reference forward / DPO step = its share of DPO's whole step."
    )
    print()
    print(explanation(rows, cells))
    total = time.monotonic() - started
    print(f"\n(total {total:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "environment": {
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "trl": trl.__version__,
                        "datasets": datasets.__version__,
                        "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(),
                    },
                    "allocator": {
                        "memory_phase_mmap_mode": memory_controlled,
                        "timing_phase_fixed": timing_controlled,
                    },
                    "summary": rows,
                    "cells": cells,
                    "total_s": total,
                },
                indent=1,
                default=str,
            )
        )
    return 0


def _reexec_in_memory_mode() -> None:
    """Restart this script with the memory-phase malloc settings in the environment (glibc reads them at startup)."""
    if memory_mode_active() or platform.libc_ver()[0] != "glibc" or "-h" in sys.argv or "--help" in sys.argv:
        return
    env = {**os.environ, **MEMORY_MODE_ENV, REEXEC_MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_in_memory_mode()
    sys.exit(main())
