#!/usr/bin/env python
"""Sequence-parallel memory and step-time benchmark (a script, not a test).

    python benchmarks/sp_memory.py                       # one row, L in {2K, 4K, 8K, 16K} x sp in {1, 2, 4}, zigzag
    python benchmarks/sp_memory.py --pair 128 --lengths 2K,4K,8K   # a LongPO pair: unshared vs shared prompt
    python benchmarks/sp_memory.py --quick               # smoke run (~15 s)
    python benchmarks/sp_memory.py --impl llama3 --lengths 4K,8K --sp 1,2

What runs: one forward + backward of `trl_longpo.sequence_parallel.shard_log_probs` (ring attention, per-row log-prob
sums with an autograd all-reduce; the trainer scores through TRL's fused LM head, which keeps no logits, so the
LM-head/loss share measured here is an upper bound) with a small random Mistral-architecture model
(`trl_longpo.tiny.build_tiny_model`), on CPU over gloo, one fresh process per rank (1 torch thread), one launch per
(sp, L). sp=1 is the same code with an SP group of one. Inputs: ONE row of L tokens (default), or with `--pair A` a
LongPO pair, prompt L + chosen and rejected answers of A tokens, measured twice in the same launch: "unshared" (two
rows, `share_prompt=False`) and "shared" (one tree [prompt][chosen][rejected], `share_prompt=True`:
`pack_shared_prompts` + `shard_trees`, tree attention, K/V all-gathered over the SP group). Attention in bf16 (the
ring on trl_longpo's flash-attn stand-in, the tree on PyTorch's CPU flash kernel); the rest in --dtype (default fp32).

Measured, per rank:
  * activations (the primary number): the bytes of every tensor saved for backward during the forward
    (`torch.autograd.graph.saved_tensors_hooks`), once per storage, parameters excluded, at the end of the forward.
    Transient buffers (attention score blocks, ring / all-gather buffers, gradients) are not included.
  * peak RSS Δ (secondary, CPU-specific): peak resident memory during the step minus RSS before it (VmHWM); it
    includes the stand-in's dense score blocks, logits, gloo buffers and gradients (a fixed overhead, not / sp).
  * step time, wall and CPU seconds (max over ranks). Not a GPU prediction: sp=4 shares 2 cores, the stand-in computes
    causal blocks densely (per-rank attention work at sp=W is ~(W+1)/(2W^2) of sp=1).

Also printed: activation bytes per token by where they are saved and by tensor width, from a bf16 forward at sp=1
(the "probe"; with --pair on the shared tree), scaled to Mistral-7B widths (hidden 4096, MLP 14336, 32 / 8 heads of
128, vocab 32000, 32 layers) — arithmetic, not a measurement.

Targets at the longest L (exit status 1 on any FAIL): per-rank activations at sp=W <= 1.2/W of sp=1 (each mode); with
--pair, shared <= 0.6 x unshared at every sp.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
TARGET_SLACK = 1.2  # activation memory at sp=W must be <= TARGET_SLACK / W of sp=1
PAIR_TARGET = 0.6  # a shared-prompt pair's activation memory must be <= PAIR_TARGET of the unshared pair's

from trl_longpo.sequence_parallel.planning import (
    BUILTIN_SHAPES,
    MEASURED_INVENTORY,
    MEASURED_SHAPE,
    ModelShape,
    scale_inventory,
    token_bytes,
)

MISTRAL_7B = BUILTIN_SHAPES["Mistral-7B"]  # the widths the extrapolation prints


# ------------------------------------------------------------------------------------------------------------------
# Measurement helpers (run inside the rank processes)
# ------------------------------------------------------------------------------------------------------------------


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward, once per storage, attributed to the module saving them.

    Parameters' storages are excluded. The meter holds references to what it saw until `finish()` so that a storage
    freed during the forward (a discarded branch) cannot be replaced by a new one at the same address and missed.
    """

    def __init__(self, model, tokens: int, dims: ModelShape):
        import torch

        self.torch = torch
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.tokens = tokens
        self.dims = dims
        self.seen: dict[int, object] = {}
        self.records: list[tuple[str, str, str, int]] = []  # (where, width class, dtype, nbytes)
        self.stack: list[str] = []
        self.rope_ptrs: set[int] = set()
        self.handles = []
        self._install_module_hooks(model)

    def _install_module_hooks(self, model) -> None:
        inner = model.model
        # RoPE cos/sin are computed once per forward and saved by every layer: tag their storages as "rope".
        self.handles.append(inner.rotary_emb.register_forward_hook(self._tag_rope))
        named = [("embed", inner.embed_tokens), ("final_norm", inner.norm)]
        named += [(f"layer{i}", layer) for i, layer in enumerate(inner.layers)]
        named += [("lm_head", model.lm_head), ("model", model)]
        for name, module in named:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(module.register_forward_hook(self._pop))

    def _pop(self, module, args, output) -> None:  # must return None: a forward hook's return value replaces outputs
        self.stack.pop()

    def _tag_rope(self, module, args, output) -> None:
        self.rope_ptrs = {t.untyped_storage().data_ptr() for t in output}

    def width_class(self, numel: int) -> str:
        d, t = self.dims.widths(), self.tokens
        if numel in (d["vocab"], d["vocab"] * t):  # logits-sized, or one row of logits (per-token loops)
            return "vocab"
        if numel % t:
            return "fixed"
        names = [n for n in ("hidden", "mlp", "kv", "heads", "head_dim", "scalar") if d[n] == numel // t]
        return "|".join(names) or f"width{numel // t}"

    def pack(self, tensor):
        torch = self.torch
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen[ptr] = tensor
                nbytes = storage.nbytes()
                where = "rope" if ptr in self.rope_ptrs else (self.stack[-1] if self.stack else "loss")
                self.records.append(
                    (where, self.width_class(nbytes // tensor.element_size()), str(tensor.dtype), nbytes)
                )
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def hooks(self):
        return self.torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def finish(self) -> dict:
        for handle in self.handles:
            handle.remove()
        self.seen.clear()
        total = sum(r[3] for r in self.records)
        breakdown: dict[str, int] = {}
        for where, width, dtype, nbytes in self.records:
            key = f"{'layer' if where.startswith('layer') else where}/{width}/{dtype.replace('torch.', '')}"
            breakdown[key] = breakdown.get(key, 0) + nbytes
        return {"total_bytes": total, "breakdown_bytes": breakdown}


class PeakRSS:
    """Peak RSS during a block minus the RSS at its start (bytes)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.use_hwm = _reset_hwm()
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = None
        if not self.use_hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _read_status_kib("VmHWM") * 1024
        return max(0, self.peak - self.start_rss)


def _read_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rows(length: int, vocab: int, seed: int, count: int = 1):
    import torch

    return torch.randint(5, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def make_shard(job: dict, context, length: int, mode: str):
    """This rank's shard of one measured input. "row": one row of `length` tokens. A LongPO pair, prompt `length` +
    chosen and rejected answers of job["answer"] tokens: "unshared" = two rows (prompt twice), "shared" = one tree
    [prompt][chosen][rejected] (`share_prompt=True`: `pack_shared_prompts` + `shard_trees`, tree attention)."""
    from types import SimpleNamespace

    import torch

    if mode == "row":
        ids = _rows(length, job["vocab"], seed=length)
        return context.shard(ids, ids.clone())
    prompt = _rows(length, job["vocab"], seed=length)
    ids = torch.cat([prompt.expand(2, -1), _rows(job["answer"], job["vocab"], seed=length + 1, count=2)], dim=1)
    scored = torch.ones_like(ids, dtype=torch.bool)  # chosen: whole sequence (NLL), rejected: its answer
    scored[:, 0] = False
    scored[1, :length] = False
    if mode == "unshared":
        return context.shard(ids, ids.masked_fill(~scored, -100))
    from trl_longpo.packing import pack_shared_prompts, pair_groups
    from trl_longpo.sequence_parallel.tree import shard_trees

    mesh = context.mesh
    packed = pack_shared_prompts(ids, torch.ones_like(ids), [scored], pair_groups([length]))
    tree = shard_trees(
        packed, sp_rank=mesh.sp_rank, sp_size=mesh.sp_size, impl=context.ring_attn_impl,
        group=mesh.sp_group if mesh.sp_size > 1 else None,
    )  # fmt: skip
    labels = tree.targets.masked_fill(~tree.masks[0], -100)
    return SimpleNamespace(  # what `shard_log_probs` reads of a PackedShard
        input_ids=tree.input_ids[None], position_ids=tree.position_ids[None], labels=labels[None],
        row_index=tree.row_index, num_rows=tree.num_rows, plan=tree.plan,
    )  # fmt: skip


def run_rank(job: dict) -> list[dict]:
    """The (sp, L) measurements of `job["modes"]` on this rank of an initialised gloo world of size sp."""
    import torch
    import torch.distributed as dist

    from trl_longpo.sequence_parallel import (
        SequenceParallelContext,
        init_sequence_parallel_mesh,
        prepare_model_for_sequence_parallel,
        shard_log_probs,
    )
    from trl_longpo.tiny import build_tiny_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    sp = dist.get_world_size()
    mesh = init_sequence_parallel_mesh(sp)
    d = tiny_dims(job)
    model = build_tiny_model(
        vocab_size=d.vocab, hidden_size=d.hidden, num_layers=d.layers, num_heads=d.heads, num_kv_heads=d.kv_heads,
        seed=0,
    ).to(dtype)  # fmt: skip
    assert model.config.intermediate_size == d.intermediate, "tiny_dims must match build_tiny_model"
    model.train()
    context = SequenceParallelContext(
        mesh, ring_attn_impl=job["impl"], heads_k_stride=job["heads_k_stride"], attention_dtype=torch.bfloat16
    )
    prepare_model_for_sequence_parallel(model, context)

    def step(shard, meter: SavedTensorMeter | None = None, backward: bool = True) -> dict:
        timings = {}
        t0, c0 = time.perf_counter(), time.process_time()
        with meter.hooks() if meter is not None else contextlib.nullcontext():
            out = shard_log_probs(model, shard, context)
        t1, c1 = time.perf_counter(), time.process_time()
        saved = meter.finish() if meter is not None else None
        timings.update(forward_s=t1 - t0, forward_cpu_s=c1 - c0)
        if backward:
            loss = -(out.sum_logps / out.num_tokens).sum()
            loss.backward()
            t2, c2 = time.perf_counter(), time.process_time()
            timings.update(step_s=t2 - t0, step_cpu_s=c2 - c0)
        model.zero_grad(set_to_none=True)
        return {"timings": timings, "saved": saved}

    results = []
    for mode in job["modes"]:
        step(make_shard(job, context, 64 * 2 * sp, mode))  # warm-up: first kernel calls, imports, gloo connections
        shard = make_shard(job, context, job["length"], mode)
        local_tokens = shard.input_ids.size(1)
        gc.collect()
        _malloc_trim()
        dist.barrier()
        rss = PeakRSS()
        meter = SavedTensorMeter(model, local_tokens, d)
        result = step(shard, meter, backward=not job.get("probe", False))
        rss_delta = rss.stop()
        dist.barrier()
        results.append(
            {
                "mode": mode,
                "sp": sp,
                "length": job["length"],
                "local_tokens": local_tokens,
                "activation_bytes": result["saved"]["total_bytes"],
                "breakdown_bytes": result["saved"]["breakdown_bytes"],
                "rss_delta_bytes": rss_delta,
                "rss_method": "VmHWM" if rss.use_hwm else "sampled",
                **result["timings"],
            }
        )
        del shard, meter
    return results


# ------------------------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, job: dict, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # The stand-in's "slow backend" warning is said once in the header. ring-flash-attn 0.1.8's llama3 kernel calls
    # all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates (a FutureWarning per call site).
    warnings.filterwarnings("ignore", message="attention is running on trl_longpo's pure-PyTorch")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=job["timeout"]))
    result = {"error": "did not finish"}
    try:
        result = run_rank(job)
    except Exception:  # noqa: BLE001 - reported to the parent with the traceback
        result = {"error": traceback.format_exc()}
    finally:
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_preloaded = False


def launch(world_size: int, job: dict) -> list[list[dict]]:
    """Run `job` on `world_size` fresh gloo ranks; return, per mode, each rank's result.

    forkserver with preloaded imports (as in tests/test_sequence_parallel.py): torch/transformers are imported once by
    the fork server, and every rank still starts as a fresh process.
    """
    import torch.multiprocessing as mp

    global _preloaded
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver" and not _preloaded:
        multiprocessing.set_forkserver_preload(
            ["torch", "transformers", "psutil", "trl.trainer.utils", "trl_longpo.tiny", "trl_longpo.sequence_parallel"]
        )
        _preloaded = True
    with tempfile.TemporaryDirectory(prefix="sp_memory_") as outdir:
        context = mp.start_processes(
            _worker,
            args=(world_size, _free_port(), job, outdir),
            nprocs=world_size,
            join=False,
            start_method=method,
        )
        deadline = time.monotonic() + job["timeout"]
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"sp={world_size} L={job['length']} did not finish in {job['timeout']}s")
        results = [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(world_size)]
    for rank, r in enumerate(results):
        if isinstance(r, dict):
            raise RuntimeError(f"sp={world_size} L={job['length']} rank {rank} failed:\n{r['error']}")
    return [list(per_mode) for per_mode in zip(*results)]


# ------------------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------------------


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summarise(rank_results: list[dict]) -> dict:
    """Per-rank numbers of one (mode, sp, L) run: the max over ranks (the largest / slowest rank sets the step)."""
    first = rank_results[0]
    return {
        **{k: first[k] for k in ("mode", "sp", "length", "local_tokens", "breakdown_bytes", "rss_method")},
        **{k: max(r.get(k, math.nan) for r in rank_results) for k in MAXED},
        "activation_bytes_min": min(r["activation_bytes"] for r in rank_results),
    }


MAXED = ("activation_bytes", "rss_delta_bytes", "step_s", "step_cpu_s")


def results_table(rows: list[dict]) -> str:
    """One line per (mode, L, sp); ratios to sp=1 of the same mode and L."""
    base = {(r["mode"], r["length"]): r for r in rows if r["sp"] == 1}
    lines = [
        (
            "| mode | L | sp | tokens/rank | activations MiB/rank | act. ratio | ideal 1/sp | act. bytes/token | "
            "peak RSS Δ MiB/rank | RSS ratio | step wall s | wall ratio | step CPU s/rank | CPU ratio |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["length"], r["mode"] == "shared", r["sp"])):
        b = base.get((r["mode"], r["length"]))

        def ratio(key, r=r, b=b):
            return f"{r[key] / b[key]:.3f}" if b and b[key] else "–"

        lines.append(
            f"| {r['mode']} | {fmt_len(r['length'])} | {r['sp']} | {r['local_tokens']} | "
            f"{r['activation_bytes'] / MIB:.1f} | {ratio('activation_bytes')} | {1 / r['sp']:.3f} | "
            f"{r['activation_bytes'] / r['local_tokens']:,.0f} | {r['rss_delta_bytes'] / MIB:.1f} | "
            f"{ratio('rss_delta_bytes')} | {r['step_s']:.2f} | {ratio('step_s')} | {r['step_cpu_s']:.2f} | "
            f"{ratio('step_cpu_s')} |"
        )
    return "\n".join(lines)


def pair_table(rows: list[dict], answer: int) -> str:
    """Shared against unshared pair, per (L, sp): per-rank activations and the token-count prediction."""
    by = {(r["mode"], r["length"], r["sp"]): r for r in rows}
    lines = [
        "| prompt L | sp | tokens/rank unshared | shared | act. MiB/rank unshared | shared | shared / unshared | "
        f"(L + 2a + 1) / 2(L + a), a = {answer} | bytes/token unshared | shared |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, length, w), u in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        sh = by.get(("shared", length, w))
        if mode != "unshared" or sh is None:
            continue
        lines.append(
            f"| {fmt_len(length)} | {w} | {u['local_tokens']} | {sh['local_tokens']} | "
            f"{u['activation_bytes'] / MIB:.1f} | {sh['activation_bytes'] / MIB:.1f} | "
            f"{sh['activation_bytes'] / u['activation_bytes']:.3f} | "
            f"{(length + 2 * answer + 1) / (2 * (length + answer)):.3f} | "
            f"{u['activation_bytes'] / u['local_tokens']:,.0f} | {sh['activation_bytes'] / sh['local_tokens']:,.0f} |"
        )
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> tuple[list[str], bool]:
    """At the longest L: per mode, sp=W <= TARGET_SLACK/W of sp=1; a shared pair <= PAIR_TARGET of the unshared."""
    longest = max(r["length"] for r in rows)
    at = {(r["mode"], r["sp"]): r for r in rows if r["length"] == longest}
    lines, ok = [], True
    for (mode, w), r in sorted(at.items()):
        checks = []
        if w > 1 and (mode, 1) in at:
            checks.append((f"x {mode} sp=1", at[mode, 1], TARGET_SLACK / w, f"{TARGET_SLACK}/{w}"))
        if mode == "shared" and ("unshared", w) in at:
            checks.append((f"x unshared sp={w}", at["unshared", w], PAIR_TARGET, f"{PAIR_TARGET}"))
        for what, base, limit, text in checks:
            ratio = r["activation_bytes"] / base["activation_bytes"]
            ok &= ratio <= limit
            lines.append(
                f"{'PASS' if ratio <= limit else 'FAIL'}  {mode} sp={w} at L={fmt_len(longest)}: per-rank activation "
                f"memory {ratio:.4f} {what} (target <= {text} = {limit:.4f})"
            )
    return lines, ok


def per_token_breakdown(probe: dict, layers: int) -> dict[str, dict[str, float]]:
    """Bytes per token: {'layer' (mean per decoder layer) | 'embed' | 'rope' | 'final_norm' | 'lm_head' | 'loss' |
    'model' (the model's own code between its submodules): {'width class:dtype': bytes}}."""
    tokens = probe["local_tokens"]
    out: dict[str, dict[str, float]] = {}
    for key, nbytes in probe["breakdown_bytes"].items():
        where, width, dtype = key.split("/")
        per = nbytes / tokens / (layers if where == "layer" else 1)
        slot = out.setdefault(where, {})
        slot[f"{width}:{dtype}"] = slot.get(f"{width}:{dtype}", 0.0) + per
    return out


def breakdown_table(bd: dict[str, dict[str, float]]) -> str:
    lines = ["| saved in | width class:dtype | bytes/token |", "|---|---|---:|"]
    for where in sorted(bd):
        for cls, value in sorted(bd[where].items(), key=lambda kv: -kv[1]):
            label = "each decoder layer" if where == "layer" else where
            lines.append(f"| {label} | {cls} | {value:,.1f} |")
    return "\n".join(lines)


def tiny_dims(job: dict) -> ModelShape:
    """Tensor widths of the measured model (`build_tiny_model`: MLP = 2 x hidden)."""
    return ModelShape(
        "tiny", job["hidden"], 2 * job["hidden"], job["layers"], job["heads"], job["kv_heads"],
        job["hidden"] // job["heads"], job["vocab"],
    )  # fmt: skip


def arithmetic_table(bd: dict[str, dict[str, float]], tiny: ModelShape, target: ModelShape) -> str:
    scaled = scale_inventory(bd, tiny, target)
    lines = [
        f"| saved in | width class:dtype | tiny B/token | × width ratio | {target.name} B/token |",
        "|---|---|---:|---|---:|",
    ]
    for where in sorted(bd, key=lambda w: (w != "layer", w)):
        for key, value in sorted(bd[where].items(), key=lambda kv: -kv[1]):
            cls = key.split(":")[0]
            wt, wm = tiny.widths()[cls], target.widths()[cls]
            if not wt:
                continue
            label = "each decoder layer" if where == "layer" else where
            lines.append(f"| {label} | {key} | {value:,.0f} | × {wm}/{wt} | {scaled[where][key]:,.0f} |")
    return "\n".join(lines)


def extrapolate(bd: dict[str, dict[str, float]], tiny: ModelShape, target: ModelShape) -> dict[str, float]:
    """Scale each width class by target/tiny width (dtypes as measured; `trl_longpo.sequence_parallel.planning`,
    which `trl-longpo plan` uses with the recorded inventory). Returns bytes/token figures."""
    per_token = token_bytes(target, bd, tiny)
    scaled = scale_inventory(bd, tiny, target)
    outside = {where: sum(slot.values()) for where, slot in scaled.items() if where != "layer"}
    return {
        "per_layer": per_token.per_layer,
        "outside_layers": per_token.outside_layers,
        "loss_and_head": outside.get("loss", 0.0) + outside.get("lm_head", 0.0) + outside.get("final_norm", 0.0),
        "full": per_token.total(checkpointing=False) - per_token.logits,
        "checkpointed": per_token.total(checkpointing=True) - per_token.logits,
        **{f"outside:{k}": v for k, v in outside.items()},
    }


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--lengths", default="2K,4K,8K,16K", help="comma-separated tokens per row (per prompt with --pair; 2K = 2048)"
    )
    parser.add_argument(
        "--pair", type=int, default=0, metavar="A",
        help="measure a LongPO pair (prompt L + two answers of A tokens) unshared and with the shared prompt",
    )  # fmt: skip
    parser.add_argument("--sp", default="1,2,4", help="comma-separated sequence-parallel sizes (sp=1 is the baseline)")
    parser.add_argument(
        "--impl", choices=["zigzag", "llama3"], default="zigzag", help="ring-flash-attn implementation"
    )
    parser.add_argument("--heads-k-stride", type=int, default=1, help="llama3: kv heads all-gathered at a time")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model dtype (attention is bf16)")
    parser.add_argument(
        "--probe-length", default="1536", help="row length of the bf16 breakdown probe (sp=1, forward; != --vocab)"
    )
    parser.add_argument("--no-probe", action="store_true", help="skip the bf16 breakdown probe and extrapolation")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (~15 s): defaults L in {1K, 2K}, sp in {1, 2}, 1 layer"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per (sp, L) run")
    parser.add_argument("--json", type=Path, help="also write all raw results here")
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(lengths="1K,2K", sp="1,2", layers=1, probe_length="768")
    args = parser.parse_args(argv)

    lengths = sorted(parse_length(x) for x in args.lengths.split(","))
    sps = sorted(int(x) for x in args.sp.split(","))
    probe_len = parse_length(args.probe_length)
    if probe_len == args.vocab or probe_len * args.vocab == 0:
        parser.error("--probe-length must differ from --vocab (tensor widths are classified by size)")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be divisible by --heads and --heads by --kv-heads")
    keys = ("vocab", "hidden", "layers", "heads", "kv_heads", "impl", "heads_k_stride", "dtype", "timeout")
    job = {k: getattr(args, k) for k in keys} | {"answer": args.pair}
    job["modes"] = ["unshared", "shared"] if args.pair else ["row"]
    head_dim = args.hidden // args.heads
    print(
        f"# sp_memory: Mistral-architecture model, hidden {args.hidden}, MLP {2 * args.hidden}, {args.layers} layers, "
        f"{args.heads} heads / {args.kv_heads} kv heads of {head_dim}, vocab {args.vocab}; model {args.dtype}, "
        f"attention bf16 on the CPU flash-attn stand-in; ring '{args.impl}'; gloo, 1 thread per rank, "
        f"{os.cpu_count()} CPU cores"
        + (f"; LongPO pairs: prompt L + 2 answers of {args.pair}, unshared and shared" if args.pair else ""),
        flush=True,
    )
    start = time.monotonic()
    rows = []
    for length in lengths:
        for w in sps:
            t = time.monotonic()
            for summary in map(summarise, launch(w, {**job, "length": length})):
                rows.append(summary)
                print(
                    f"  {summary['mode']:>8} L={fmt_len(length):>4} sp={w}: activations "
                    f"{summary['activation_bytes'] / MIB:8.1f} MiB/rank, "
                    f"RSS Δ {summary['rss_delta_bytes'] / MIB:8.1f} MiB, step {summary['step_s']:7.2f} s wall, "
                    f"{summary['step_cpu_s']:7.2f} s CPU/rank",
                    flush=True,
                )
            print(f"  ({time.monotonic() - t:.0f} s incl. launch)", flush=True)

    print()
    print("## Per-rank activation memory and step time, ratios to sp=1 at the same mode and L")
    print()
    print(results_table(rows))
    print()
    if args.pair:
        print(f"## Shared prompt against two rows, per rank (answers a = {args.pair}; expected ratio = token ratio)")
        print()
        print(pair_table(rows, args.pair))
        print()
    print(
        "activations = bytes of tensors saved for backward at the end of the forward (unique storages, parameters "
        "excluded; saved_tensors_hooks); act. bytes/token = activations / tokens on the rank. peak RSS Δ = peak "
        f"resident memory during the step minus RSS before it ({rows[0]['rss_method']}), including the CPU stand-in's "
        "attention score blocks. step = forward + backward of shard_log_probs; wall and CPU (process CPU seconds) "
        "are the max over ranks."
    )
    print()
    checks, ok = target_checks(rows)
    for line in checks:
        print(line)

    probe = extrap = None
    if not args.no_probe:
        probe_job = {**job, "length": probe_len, "dtype": "bf16", "probe": True, "modes": job["modes"][-1:]}
        probe = summarise(launch(1, probe_job)[0])
        bd = per_token_breakdown(probe, args.layers)
        tiny = tiny_dims(job)
        extrap = extrapolate(bd, tiny, MISTRAL_7B)
        print()
        print(
            f"## Activation bytes per token by tensor width, model in bf16 (probe: {probe['mode']}, sp=1, "
            f"L={fmt_len(probe_len)}, {probe['local_tokens']} tokens, forward only)"
        )
        print()
        print(breakdown_table(bd))
        print()
        m = MISTRAL_7B
        print(
            f"## Extrapolated to Mistral-7B widths (hidden {m.hidden}, MLP {m.intermediate}, {m.heads}/"
            f"{m.kv_heads} heads of {m.head_dim}, vocab {m.vocab}, {m.layers} layers, bf16) — arithmetic, "
            "not a measurement"
        )
        print()
        print(arithmetic_table(bd, tiny, MISTRAL_7B))
        print()
        print(f"- per decoder layer: {extrap['per_layer'] / 1024:,.1f} KiB/token")
        print(
            f"- outside the layers (embedding ids, RoPE, final norm, LM head input, logits/log-softmax): "
            f"{extrap['outside_layers'] / 1024:,.1f} KiB/token"
        )
        print(f"- no gradient checkpointing: {extrap['full'] / 1024:,.1f} KiB/token")
        print(
            f"- gradient checkpointing (keeps each layer's bf16 input, {m.hidden * 2} B/token/layer, + one layer "
            f"recomputed + outside the layers): {extrap['checkpointed'] / 1024:,.1f} KiB/token"
        )
        if tiny == MEASURED_SHAPE:
            same = bd == MEASURED_INVENTORY
            print(
                f"- this inventory {'equals' if same else 'DIFFERS from'} the one `trl-longpo plan` plans with "
                "(trl_longpo.sequence_parallel.planning.MEASURED_INVENTORY)"
            )
        print(
            "- per GPU for a model, max_length and GPU count, every (dp, Ulysses, ring) split: "
            "`trl-longpo plan --model Mistral-7B --max_length 512K --gpus 8`"
        )
    print(f"\n(total {time.monotonic() - start:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "probe": probe, "extrapolation": extrap},
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
