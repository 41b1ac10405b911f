#!/usr/bin/env python
"""Sequence-parallel memory and step time of the path that trains (a script, not a test).

    python benchmarks/sp_memory.py                         # a LongPO pair, prompt 2K/4K/8K x sp 1/2/4, zigzag
    python benchmarks/sp_memory.py --quick                 # smoke run
    python benchmarks/sp_memory.py --impl llama3 --lengths 4K --sp 1,2

What runs: per (sp, L), one launch of sp gloo ranks on CPU (one torch thread each). Every rank scores a LongPO pair
(prompt of L tokens + chosen and rejected answers of --answer tokens; chosen scored whole, like the sequence NLL,
rejected on its answer) with `trl_longpo.scoring.RowScorer`, the code the trainer runs: TRL's fused LM head (no
logits), "unshared" (two rows, ring attention) and "shared" (one tree, tree attention with K/V all-gathered over the
SP group), then the backward. sp=1 is the same code with an SP group of one. Tiny Mistral architecture
(`trl_longpo.tiny.build_tiny_model`), fp32 weights, bf16 attention.

Measured per rank: activations = bytes of the tensors autograd saves for backward (`saved_tensors_hooks`, once per
storage, parameters excluded, at the end of the forward: what SP divides); peak RSS delta of the step (CPU-specific:
also transient buffers and gradients); step CPU seconds (max over ranks). The inventory (`--no-probe` skips it): a bf16
forward of the shared tree at sp=1, saved bytes per token by place and width, scaled to Mistral-7B widths
(arithmetic). Targets at the longest L (exit status 1 on a FAIL): sp=W <= 1.2/W of sp=1; shared <= 0.6 x unshared.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from trl_longpo.sequence_parallel.planning import (  # noqa: E402
    BUILTIN_SHAPES,
    MEASURED_INVENTORY,
    MEASURED_SHAPE,
    ModelShape,
    scale_inventory,
    token_bytes,
)

MIB = 1 << 20
TARGET_SLACK, PAIR_TARGET = 1.2, 0.6
TINY = MEASURED_SHAPE  # the planner's inventory is keyed by this model's widths
LAYOUTS = ("unshared", "shared")


class SavedTensorMeter:
    """Bytes autograd saves for backward, once per storage, parameters excluded, in the planner's inventory keys:
    where ("layer", "embed", "final_norm", "lm_head", "rope", or "loss" for the fused LM head outside any module) and
    "width class:dtype" (`ModelShape.widths`). Also counts the tokens the model ran (this rank's shard)."""

    def __init__(self, model):
        import torch

        self.torch, self.tokens, self.stack, self.rope = torch, 0, [], set()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.records = {}, []
        inner = model.model
        self.handles = [
            inner.register_forward_pre_hook(self._count, with_kwargs=True),
            inner.rotary_emb.register_forward_hook(self._tag_rope),
        ]
        named = [("embed", inner.embed_tokens), ("final_norm", inner.norm), ("lm_head", model.lm_head)]
        for name, module in named + [("layer", layer) for layer in inner.layers]:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(module.register_forward_hook(self._pop))

    def _count(self, module, args, kwargs) -> None:
        self.tokens = kwargs["input_ids"].numel()

    def _tag_rope(self, module, args, output) -> None:  # cos/sin: computed once, saved by every layer
        self.rope = {t.untyped_storage().data_ptr() for t in output}

    def _pop(self, module, args, output) -> None:  # a forward hook's return value would replace the output
        self.stack.pop()

    def pack(self, tensor):
        if isinstance(tensor, self.torch.Tensor):
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.params and ptr not in self.seen:
                self.seen[ptr] = tensor  # held until `finish`, so a freed storage's address is not counted twice
                where = "rope" if ptr in self.rope else (self.stack[-1] if self.stack else "loss")
                numel = storage.nbytes() // tensor.element_size()
                self.records.append((where, numel, str(tensor.dtype).replace("torch.", ""), storage.nbytes()))
        return tensor

    def hooks(self):
        return self.torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def finish(self) -> list:
        for handle in self.handles:
            handle.remove()
        self.seen.clear()
        return self.records


def inventory(records: list, tokens: int, shape: ModelShape) -> dict[str, dict[str, float]]:
    """Bytes per token by where and "width class:dtype" (per-layer entries: the mean over the layers)."""
    by_width = {width: name for name, width in reversed(shape.widths().items()) if width}
    result: dict[str, dict[str, float]] = {}
    for where, numel, dtype, nbytes in records:
        width = numel // tokens if numel % tokens == 0 else 0
        key = f"{by_width.get(width, 'fixed') if width else 'fixed'}:{dtype}"
        slot = result.setdefault(where, {})
        slot[key] = slot.get(key, 0.0) + nbytes / tokens / (shape.layers if where == "layer" else 1)
    return result


def peak_rss_delta(start: int) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return max(0, int(line.split()[1]) * 1024 - start)
    return 0


def reset_peak_rss() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    import psutil

    return psutil.Process().memory_info().rss


def pair(length: int, answer: int, vocab: int):
    """A LongPO pair in the trainer's layout: rows (chosen, rejected), attention mask, scored-token mask."""
    import torch

    g = torch.Generator().manual_seed(length)
    prompt = torch.randint(5, vocab, (1, length), generator=g)
    ids = torch.cat([prompt.expand(2, -1), torch.randint(5, vocab, (2, answer), generator=g)], dim=1)
    scored = torch.ones_like(ids, dtype=torch.bool)  # chosen: the whole sequence (NLL), rejected: its answer
    scored[:, 0] = False
    scored[1, :length] = False
    return ids, torch.ones_like(ids), scored


def run_rank(job: dict) -> list[dict]:
    """The measurements of one (sp, L) on this rank of an initialised gloo world of size sp."""
    import torch
    import torch.distributed as dist
    from trl.trainer.utils import add_fused_lm_head

    from trl_longpo.scoring import RowScorer
    from trl_longpo.sequence_parallel import SequenceParallelContext, init_sequence_parallel_mesh
    from trl_longpo.tiny import build_tiny_model

    d = TINY
    model = build_tiny_model(
        vocab_size=d.vocab, hidden_size=d.hidden, num_layers=d.layers, num_heads=d.heads, num_kv_heads=d.kv_heads,
        seed=0,
    ).to(torch.bfloat16 if job["probe"] else torch.float32)  # fmt: skip
    assert model.config.intermediate_size == d.intermediate, "TINY must match build_tiny_model"
    add_fused_lm_head(model)
    mesh = init_sequence_parallel_mesh(dist.get_world_size())
    sp = SequenceParallelContext(mesh, ring_attn_impl=job["impl"], attention_dtype=torch.bfloat16)
    results = []
    for layout in job["layouts"]:
        scorer = RowScorer(share_prompt=layout == "shared", sp=sp)
        sp.prepare_model(model, scorer.attention_name)

        def step(length: int, measure: bool) -> dict:
            ids, attention, scored = pair(length, job["answer"], d.vocab)
            meter = SavedTensorMeter(model)
            gc.collect()
            dist.barrier()
            start_rss = reset_peak_rss()
            c0 = time.process_time()
            with meter.hooks() if measure else contextlib.nullcontext():
                sums = scorer.row_sums(model, ids, attention, [scored], prompt_lengths=[length]).sums
            records = meter.finish()
            if not job["probe"]:
                (sums[0, 0, 1] - sums[0, 0, 0] / ids.size(1)).backward()
            cpu = time.process_time() - c0
            rss = peak_rss_delta(start_rss)
            model.zero_grad(set_to_none=True)
            return {"tokens": meter.tokens, "records": records, "cpu_s": cpu, "rss": rss}

        step(16 * mesh.sp_size, measure=False)  # warm-up: first kernel calls, gloo connections
        out = step(job["length"], measure=True)
        saved = sum(r[3] for r in out["records"])
        results.append({"layout": layout, "tokens": out["tokens"], "bytes": saved, "cpu_s": out["cpu_s"],
                        "rss": out["rss"], "inventory": inventory(out["records"], out["tokens"], d)})  # fmt: skip
    return results


def _worker(rank: int, world_size: int, port: int, job: dict, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the stand-in's "slow backend" note, torch's collective deprecations
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=job["timeout"]))
    try:
        Path(outdir, f"{rank}.json").write_text(json.dumps(run_rank(job)))
    finally:
        dist.destroy_process_group()


def launch(world_size: int, job: dict) -> list[list[dict]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(world_size, port, job, outdir), nprocs=world_size, start_method="spawn")
        return [json.loads(Path(outdir, f"{r}.json").read_text()) for r in range(world_size)]


def measure(sp: int, length: int, args, probe: bool = False) -> list[dict]:
    """One launch; per layout the max over ranks (activations, RSS, CPU) and rank 0's token count."""
    job = dict(impl=args.impl, answer=args.answer, length=length, probe=probe, timeout=args.timeout,
               layouts=["shared"] if probe else list(LAYOUTS))  # fmt: skip
    ranks = launch(sp, job)
    rows = []
    for i, layout in enumerate(job["layouts"]):
        per_rank = [r[i] for r in ranks]
        rows.append({"sp": sp, "length": length, "layout": layout, "tokens": per_rank[0]["tokens"],
                     "bytes": max(r["bytes"] for r in per_rank), "rss": max(r["rss"] for r in per_rank),
                     "cpu_s": max(r["cpu_s"] for r in per_rank), "inventory": per_rank[0]["inventory"]})  # fmt: skip
    return rows


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def results_table(rows: list[dict]) -> str:
    base = {(r["length"], r["layout"]): r for r in rows if r["sp"] == 1}
    lines = [
        "| prompt L | sp | layout | tokens/rank | activations MiB/rank | ratio to sp=1 | shared / unshared | "
        "bytes/token | peak RSS Δ MiB/rank | step CPU s/rank | CPU ratio to sp=1 |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["length"], r["sp"], r["layout"] == "shared")):
        b = base.get((r["length"], r["layout"]))
        other = next((o for o in rows if o["sp"] == r["sp"] and o["length"] == r["length"] and o is not r), None)
        ratio = f"**{r['bytes'] / other['bytes']:.3f}**" if r["layout"] == "shared" and other else ""
        lines.append(
            f"| {fmt_len(r['length'])} | {r['sp']} | {r['layout']} | {r['tokens']} | {r['bytes'] / MIB:.1f} | "
            f"{r['bytes'] / b['bytes']:.3f} | {ratio} | {r['bytes'] / r['tokens']:,.0f} | {r['rss'] / MIB:.1f} | "
            f"{r['cpu_s']:.2f} | {r['cpu_s'] / b['cpu_s']:.3f} |"
            if b
            else f"| {fmt_len(r['length'])} | {r['sp']} | {r['layout']} | {r['tokens']} | {r['bytes'] / MIB:.1f} |"
        )
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> tuple[list[str], bool]:
    longest = max(r["length"] for r in rows)
    at = {(r["sp"], r["layout"]): r for r in rows if r["length"] == longest}
    lines, ok = [], True
    for (sp, layout), r in sorted(at.items()):
        if sp > 1 and (1, layout) in at:
            ratio, limit = r["bytes"] / at[(1, layout)]["bytes"], TARGET_SLACK / sp
            ok &= ratio <= limit
            lines.append(
                f"{'PASS' if ratio <= limit else 'FAIL'} {layout} sp={sp}: {ratio:.3f} <= {limit:.3f} of sp=1"
            )
        if layout == "shared" and (sp, "unshared") in at:
            ratio = r["bytes"] / at[(sp, "unshared")]["bytes"]
            ok &= ratio <= PAIR_TARGET
            lines.append(f"{'PASS' if ratio <= PAIR_TARGET else 'FAIL'} sp={sp}: shared {ratio:.3f} <= {PAIR_TARGET}")
    return [f"Targets at prompt {fmt_len(longest)}:", *lines], ok


def inventory_table(measured: dict[str, dict[str, float]], target: ModelShape) -> str:
    """The probe's bytes per token and the same scaled to `target`'s widths (`planning.scale_inventory`)."""
    scaled = scale_inventory(measured, TINY, target)
    lines = [f"| saved in | width class:dtype | tiny B/token | {target.name} B/token |", "|---|---|---:|---:|"]
    for where in sorted(measured, key=lambda w: (w != "layer", w)):
        for key, value in sorted(measured[where].items(), key=lambda kv: -kv[1]):
            label = "each decoder layer" if where == "layer" else where
            lines.append(f"| {label} | {key} | {value:,.0f} | {scaled[where][key]:,.0f} |")
    per_token = token_bytes(target, measured, TINY)
    lines.append(
        f"\n{target.name}: one layer {per_token.per_layer:,.0f} B/token, outside the layers "
        f"{per_token.outside_layers:,.0f}; with gradient checkpointing "
        f"{per_token.total() - per_token.lm_head_grad:,.0f} B/token saved (+ {per_token.lm_head_grad:,.0f} planned "
        "for the LM head's input gradient in its backward)."
    )
    same = measured == MEASURED_INVENTORY
    lines.append(f"This inventory {'equals' if same else 'differs from'} `planning.MEASURED_INVENTORY`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2K,4K,8K", help="prompt lengths, e.g. 2K,4K,8K")
    parser.add_argument("--sp", default="1,2,4", help="sequence-parallel sizes (sp=1 is the baseline)")
    parser.add_argument("--answer", type=int, default=128, help="tokens of each answer")
    parser.add_argument("--impl", choices=["zigzag", "llama3"], default="zigzag")
    parser.add_argument("--quick", action="store_true", help="prompt 1K at sp 1, 2; no probe")
    parser.add_argument("--no-probe", action="store_true", help="skip the bf16 inventory")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per collective")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    lengths = [int(x[:-1]) * 1024 if x.upper().endswith("K") else int(x) for x in args.lengths.split(",")]
    sizes = [int(x) for x in args.sp.split(",")]
    if args.quick:
        lengths, sizes, args.no_probe = [1024], [1, 2], True
    start = time.perf_counter()
    rows = [row for length in lengths for sp in sizes for row in measure(sp, length, args)]
    print(f"sp_memory: a LongPO pair (answers {args.answer}), ring '{args.impl}', tiny Mistral (hidden {TINY.hidden}, "
          f"MLP {TINY.intermediate}, {TINY.layers} layers, {TINY.heads}/{TINY.kv_heads} heads), fp32 weights, "
          f"bf16 attention, CPU gloo, {time.perf_counter() - start:.0f} s\n")  # fmt: skip
    print(results_table(rows))
    checks, ok = target_checks(rows)
    print("\n" + "\n".join(checks))
    if not args.no_probe:
        probe = measure(1, 1536, args, probe=True)[0]
        print(f"\nInventory (bf16 forward of the shared tree, {probe['tokens']} tokens, sp=1; arithmetic for 7B):")
        print(inventory_table(probe["inventory"], BUILTIN_SHAPES["Mistral-7B"]))
        print(json.dumps(probe["inventory"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
