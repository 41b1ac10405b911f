#!/usr/bin/env python
"""LongPOTrainer (shared prompt) vs TRL's DPOTrainer and a floor: step time and peak memory on the same rows (CPU).

    python benchmarks/longpo_vs_dpo.py --json /tmp/longpo_vs_dpo.json  # long prompts 2K, 4K, 8K, 16K (~15-20 min)
    python benchmarks/longpo_vs_dpo.py --quick                          # smoke run (< 1 min)
    python benchmarks/longpo_vs_dpo.py --lengths 4K,8K --reps 5,3 --answer 128 --layers 2
    python benchmarks/longpo_vs_dpo.py --model smollm2 --lengths 2K,4K --reps 1 --warmup 0  # a real depth and vocab

Model: a randomly initialised Mistral-architecture model (`trl_longpo.tiny.build_tiny_model`, default hidden 256,
MLP 512, 1 layer, 8 heads / 2 kv heads, vocab 1024, fp32, sdpa) and the offline tiny tokenizer; `--model smollm2`:
SmolLM2-135M's shapes instead (Llama, 30 layers, hidden 576, MLP 1536, 9 heads / 3 kv heads, vocab 49,152, tied
embeddings; random weights from its config, nothing downloaded; same tokenizer, whose ids fit the vocab). One conversational
row per length, batch 1, exact token counts as both trainers tokenize them (chat template and EOS included): long
prompt L tokens, short prompt --short tokens, chosen and rejected --answer tokens each (equal lengths: no padding,
so SDPA keeps its causal fast path). Every arm starts from copies of the same weights:

  dpo         DPOTrainer, reference on the fly (ref_model = deepcopy: it re-scores both long sequences)
  dpo+pre     DPOTrainer, precompute_ref_log_probs=True (no reference work in the step)
  unshared    LongPOTrainer, share_prompt=False, reference on the fly (short prompt)
  shared      LongPOTrainer, share_prompt=True (the default), reference on the fly (short prompt, shared too)
  shared+pre  LongPOTrainer, share_prompt=True, precompute_ref_log_probs=True
  floor       the policy alone: one forward + backward over prompt + chosen + rejected as ONE causal sequence
              (the model's own CE loss, no reference): what any trainer must at least pay for these tokens

LongPO arms use the LongPOConfig defaults (dpo_weight 0.01, nll_weight 1, nll_scope "sequence"). Before timing, the
collated policy batches of all trainers are checked to be token-for-token identical, and the floor's sequence to be
their prompt + chosen + rejected.

Step = wall seconds of `trainer.training_step(trainer.model, batch)` (forward + backward, + the reference forward
when not precomputed; no optimizer step), gradients reset outside the timed region. One warm-up per arm, then
--reps rounds (--warmup 0 drops the warm-up: a SmolLM2 step is minutes, its first-step overhead small), each
running every arm once in an order rotated by one per round; medians over the clean samples
(the process got >= 70% of its threads' CPU; contended rounds are replaced by extra ones, up to 2 x --reps), or with
`--clock cpu` medians of process CPU seconds (with `--threads 1` the time the step's work took on a core, whatever else
the machine runs; on an idle machine it equals the wall time). Peak
memory = peak RSS during each arm's step of the last round minus the RSS right before it (VmHWM reset via
/proc/self/clear_refs after gc + malloc_trim): saved activations + the reference forward's buffers + backward buffers
+ gradients.
Tokens/s = the pair's distinct tokens (prompt + chosen + rejected) per step second. CPU only: no GPU numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rss import PeakRSS, fmt_len, malloc_trim, parse_length  # same folder; shared helpers

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # its config.json
ARMS = ("dpo", "dpo+pre", "unshared", "shared", "shared+pre", "floor")
TARGETS = (  # (label, numerator arm, denominator arm, comparison, bound) at the longest length
    ("step throughput ≥ 2.5× DPOTrainer, reference on the fly", "dpo", "shared", ">=", 2.5),
    ("step throughput ≥ 1.8× DPOTrainer, reference precomputed (in both)", "dpo+pre", "shared+pre", ">=", 1.8),
    ("peak step memory ≤ 0.6× DPOTrainer's (both on the fly)", "mem:shared", "mem:dpo", "<=", 0.6),
    ("step time ≤ 1.15× the floor", "shared", "floor", "<=", 1.15),
)


def make_row(tokenizer, long_tokens: int, short_tokens: int, answer_tokens: int) -> dict:
    """A conversational LongPO row with exact token counts. Its text is corpus words that are one token each with a
    leading space, so n words render as n + (template overhead) tokens; the overhead is measured, then checked."""
    from trl_longpo.data.documents import corpus_texts

    words = [
        w for w in re.findall(r"[A-Za-z]+", " ".join(corpus_texts()))
        if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    ]
    if len(words) < long_tokens + 2 * answer_tokens:
        raise SystemExit(f"the corpus has {len(words)} one-token words; a {long_tokens}-token prompt needs more")

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]

    def user(text):
        return [{"role": "user", "content": text}]

    def answer_len(text):  # completion tokens (EOS included), as DPOTrainer splits prompt and completion
        return len(render(user("x") + [{"role": "assistant", "content": text}], False)) - len(render(user("x"), True))

    def fit(start, target, measure):
        text = lambda n: " ".join(words[start : start + n])  # noqa: E731
        n = 2 * target - measure(text(target))  # one word = one token: the overhead is the difference
        if measure(text(n)) != target:
            raise AssertionError(f"could not render exactly {target} tokens (got {measure(text(n))})")
        return text(n)

    prompt_len = lambda text: len(render(user(text), True))  # noqa: E731
    middle = (long_tokens - short_tokens) // 2  # the short prompt is the middle of the long one
    return {
        "prompt": user(fit(0, long_tokens, prompt_len)),
        "short_prompt": user(fit(middle, short_tokens, prompt_len)),
        "chosen": [{"role": "assistant", "content": fit(middle + 8, answer_tokens, answer_len)}],
        "rejected": [{"role": "assistant", "content": fit(long_tokens + 8, answer_tokens, answer_len)}],
    }


def build_arms(base_model, tokenizer, row: dict, workdir: str) -> dict:
    """Every arm as a zero-argument step function, plus the model whose gradients to reset, after the input checks."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_longpo import LongPOConfig, LongPOTrainer

    common = dict(report_to="none", bf16=False, max_length=None, per_device_train_batch_size=1, disable_tqdm=True,
                  save_strategy="no", dataloader_num_workers=0, seed=0)  # fmt: skip
    specs = {  # arm: (trainer class, config class, extra config, precompute)
        "dpo": (DPOTrainer, DPOConfig, {}, False),
        "dpo+pre": (DPOTrainer, DPOConfig, {}, True),
        "unshared": (LongPOTrainer, LongPOConfig, {"share_prompt": False}, False),
        "shared": (LongPOTrainer, LongPOConfig, {}, False),
        "shared+pre": (LongPOTrainer, LongPOConfig, {}, True),
    }
    dpo_row = {k: row[k] for k in ("prompt", "chosen", "rejected")}
    arms, batches = {}, {}
    for arm, (trainer_cls, config_cls, extra, precompute) in specs.items():
        if arm not in ARMS:  # --arms
            continue
        trainer = trainer_cls(
            model=copy.deepcopy(base_model),
            ref_model=None if precompute else copy.deepcopy(base_model),  # DPOTrainer cannot reload in-memory models
            args=config_cls(output_dir=f"{workdir}/{arm}", precompute_ref_log_probs=precompute, **common, **extra),
            train_dataset=Dataset.from_list([dpo_row if trainer_cls is DPOTrainer else row]),
            processing_class=tokenizer,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by `train()`; `training_step` divides the loss by it
        batch = batches[arm] = trainer.data_collator([trainer.train_dataset[0]])
        if precompute != ("ref_chosen_logps" in batch) or precompute != (trainer.ref_model is None):
            raise AssertionError(f"{arm}: precompute={precompute} but the batch/reference model disagree")
        arms[arm] = (lambda t=trainer, b=batch: t.training_step(t.model, b), trainer.model)

    # The same policy tokens everywhere: [prompt + chosen; prompt + rejected], and the floor's prompt+chosen+rejected
    ids, mask = next(iter(batches.values()))["input_ids"], next(iter(batches.values()))["completion_mask"]
    for arm, batch in batches.items():
        if not (torch.equal(batch["input_ids"], ids) and torch.equal(batch["completion_mask"], mask)):
            raise AssertionError(f"{arm}: policy inputs differ from DPOTrainer's")
    prompt = int((mask[0] == 0).sum())
    if mask.size(0) != 2 or not torch.equal(ids[0, :prompt], ids[1, :prompt]) or bool(mask[:, :prompt].any()):
        raise AssertionError("expected one pair, no padding, a common prompt before the answers")
    floor_ids = torch.cat([ids[0], ids[1, prompt:]])[None]
    floor_model = copy.deepcopy(base_model).train()

    def floor():
        floor_model(input_ids=floor_ids, labels=floor_ids, use_cache=False).loss.backward()

    arms["floor"] = (floor, floor_model)
    tokens = {"prompt": prompt, "answer": ids.size(1) - prompt, "pair": floor_ids.size(1)}
    return {"arms": arms, "tokens": tokens}


def measure(fn, model, memory: bool = False) -> dict:
    """One step: wall and CPU seconds; with `memory`, peak RSS delta (heap trimmed first, so every byte counts)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if memory:
        rss = PeakRSS()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    if memory:
        out["rss_bytes"] = rss.stop()
    model.zero_grad(set_to_none=True)
    return out


def clean(samples: list[dict]) -> list[dict]:
    """Samples where the process got >= 70% of its threads' CPU: on a shared 2-core machine a step that lost a core
    to another process runs its OpenMP threads on one and can be several times slower, which would make ratios noise.
    """
    import torch

    return [s for s in samples if s["cpu_s"] >= 0.7 * torch.get_num_threads() * s["wall_s"]]


def run_length(base_model, tokenizer, long_tokens: int, reps: int, args) -> dict:
    row = make_row(tokenizer, long_tokens, args.short, args.answer)
    with tempfile.TemporaryDirectory(prefix="longpo_vs_dpo_") as workdir:
        built = build_arms(base_model, tokenizer, row, workdir)
        arms = built["arms"]
        gc.collect()
        gc.freeze()  # what is alive now stays alive: keeps the gc.collect() before each step cheap
        try:
            for _ in range(args.warmup):
                for fn, model in arms.values():
                    measure(fn, model)
            samples, rounds = {arm: [] for arm in ARMS}, 0
            # Interleaved rounds, order rotated by one per round; extra rounds (up to 2 x reps) replace contended ones;
            # round `reps` also records each step's peak memory
            while rounds < reps or (
                args.clock == "wall" and rounds < 2 * reps and min(len(clean(v)) for v in samples.values()) < reps
            ):
                for arm in ARMS[rounds % len(ARMS) :] + ARMS[: rounds % len(ARMS)]:
                    samples[arm].append(measure(*arms[arm], memory=rounds == reps - 1))
                rounds += 1
            memory = {arm: next(s["rss_bytes"] for s in samples[arm] if "rss_bytes" in s) for arm in ARMS}
        finally:
            del arms, built["arms"]
            gc.unfreeze()
    gc.collect()
    malloc_trim()
    if args.clock == "cpu":
        step = {arm: statistics.median(s["cpu_s"] for s in v) for arm, v in samples.items()}
    else:
        step = {arm: statistics.median(s["wall_s"] for s in clean(v) or v) for arm, v in samples.items()}
    return {"L": long_tokens, "tokens": built["tokens"], "rounds": rounds, "step_s": step, "peak_rss_bytes": memory,
            "clean": min(len(clean(v)) for v in samples.values()), "samples": samples}  # fmt: skip


def ratio(cell: dict, num: str, den: str) -> float:
    get = lambda key: cell["peak_rss_bytes"][key[4:]] if key.startswith("mem:") else cell["step_s"][key]  # noqa: E731
    return get(num) / get(den)


def tables(cells: list[dict], clock: str) -> str:
    head = "| L_long | pair tokens | " + " | ".join(f"{a} s" for a in ARMS) + " | " + " | ".join(
        f"{a} MiB" for a in ARMS) + " | shared tok/s | DPO tok/s |"  # fmt: skip
    lines = [f"Step time (median {clock} s), peak step RSS Δ (MiB), pair tokens per step second", "", head,
             "|" + "---:|" * (4 + 2 * len(ARMS))]  # fmt: skip
    for c in cells:
        s, m, n = c["step_s"], c["peak_rss_bytes"], c["tokens"]["pair"]
        lines.append(f"| {fmt_len(c['L'])} | {n} | " + " | ".join(f"{s[a]:.3f}" for a in ARMS) + " | " + " | ".join(
            f"{m[a] / MIB:.0f}" for a in ARMS) + f" | {n / s['shared']:.0f} | {n / s['dpo']:.0f} |")  # fmt: skip
    cols = [("DPO / shared (on the fly)", "dpo", "shared"), ("DPO pre / shared pre", "dpo+pre", "shared+pre"),
            ("DPO pre / shared (on the fly)", "dpo+pre", "shared"), ("unshared / shared", "unshared", "shared"),
            ("shared / floor", "shared", "floor"), ("shared pre / floor", "shared+pre", "floor"),
            ("mem shared / DPO", "mem:shared", "mem:dpo"),
            ("mem shared pre / DPO pre", "mem:shared+pre", "mem:dpo+pre"),
            ("mem unshared / shared", "mem:unshared", "mem:shared")]  # fmt: skip
    cols = [c for c in cols if {c[1].removeprefix("mem:"), c[2].removeprefix("mem:")} <= set(ARMS)]
    lines += ["", "Ratios (step-time ratios A / B = throughput of B over A)", "",
              "| L_long | " + " | ".join(c[0] for c in cols) + " |", "|" + "---:|" * (1 + len(cols))]  # fmt: skip
    for c in cells:
        lines.append(f"| {fmt_len(c['L'])} | " + " | ".join(f"{ratio(c, a, b):.2f}" for _, a, b in cols) + " |")
    return "\n".join(lines)


def target_lines(cell: dict) -> tuple[list[str], bool]:
    lines, ok_all = [], True
    for label, num, den, op, bound in TARGETS:
        if not {num.removeprefix("mem:"), den.removeprefix("mem:")} <= set(ARMS):
            continue
        value = ratio(cell, num, den)
        ok = value >= bound if op == ">=" else value <= bound
        ok_all &= ok
        lines.append(f"{'PASS' if ok else 'FAIL'} at {fmt_len(cell['L'])}: {label}: {num}/{den} = {value:.2f}")
    return lines, ok_all


def main(argv: list[str] | None = None) -> int:
    global ARMS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2K,4K,8K,16K", help="comma-separated long-prompt tokens (2K = 2048)")
    parser.add_argument("--reps", default="5,5,3,3", help="timed rounds: one number, or one per length")
    parser.add_argument("--short", default="256", help="short-prompt tokens (< every length)")
    parser.add_argument("--answer", type=int, default=192, help="tokens of each answer (chosen, rejected)")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny (--hidden/--layers) or SmolLM2-135M's shapes (random weights)")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of the arms (shared, dpo needed)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="step time: wall seconds, or process CPU seconds (with --threads 1: robust to a busy "
                        "machine, no contention filter)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 512,1K; short 128, answers 64; 2 rounds")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(lengths="512,1K", reps="2", short="128", answer=64)
    args = parser.parse_args(argv)
    ARMS = tuple(a for a in ARMS if a in args.arms.split(","))
    if not {"shared", "dpo"} <= set(ARMS):
        parser.error(f"--arms must include shared and dpo, got {args.arms}")
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    reps = [int(x) for x in args.reps.split(",")]
    reps = reps * len(lengths) if len(reps) == 1 else reps
    args.short = parse_length(args.short)
    if len(reps) != len(lengths) or min(reps) < 1:
        parser.error("--reps: one positive number, or one per length")
    if args.short < 32 or any(n <= args.short for n in lengths):
        parser.error(f"--short must be at least 32 and below every length (got {args.short})")

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers
    import trl
    from transformers.utils import logging as hf_logging

    from trl_longpo.tiny import build_tiny_model, build_tiny_tokenizer

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    tokenizer = build_tiny_tokenizer(1024)
    if args.model == "smollm2":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa"))
    else:
        model = build_tiny_model(vocab_size=1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                 num_kv_heads=2, seed=0, attn_implementation="sdpa").float()  # fmt: skip
    c = model.config
    print(f"# longpo_vs_dpo: {'SmolLM2-135M shapes' if args.model == 'smollm2' else 'tiny model'} "
          f"({type(model).__name__}, random weights), hidden {c.hidden_size}, MLP {c.intermediate_size}, "
          f"{c.num_hidden_layers} layer(s), {c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, vocab "
          f"{c.vocab_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), fp32, sdpa; batch 1, "
          f"short prompt {args.short}, answers {args.answer} tokens each; LongPOConfig defaults; {args.warmup} warm-up "
          f"+ rounds {reps}, "
          f"{args.clock} clock; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, trl "
          f"{trl.__version__}", flush=True)  # fmt: skip
    cells = []
    for long_tokens, n in zip(lengths, reps):
        t = time.monotonic()
        cell = run_length(model, tokenizer, long_tokens, n, args)
        cells.append(cell)
        print(f"  L={fmt_len(long_tokens)}: " + ", ".join(f"{a} {cell['step_s'][a]:.3f} s" for a in ARMS)
              + f"; clean rounds {cell['clean']}/{cell['rounds']} ({time.monotonic() - t:.0f} s)", flush=True)
    print("\n" + tables(cells, args.clock) + "\n")
    lines, ok = target_lines(cells[-1])
    print("\n".join(lines))
    print(f"targets at {fmt_len(cells[-1]['L'])}: {'all met' if ok else 'NOT all met'}")
    total = time.monotonic() - started
    print(f"(total {total:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "cells": cells, "total_s": total}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
