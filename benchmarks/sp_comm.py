#!/usr/bin/env python
"""Communication per attention layer under sequence parallelism: bytes each rank sends, counted (a script, not a test).

    python benchmarks/sp_comm.py                  # sp 2, 4; ring zigzag / llama3, Ulysses, hybrid; shared and unshared
    python benchmarks/sp_comm.py --sp 2,4,8       # 8 processes (slow on 2 cores, still exact)

What runs: one attention layer (q, k, v of T tokens, bf16, 4 query / 2 KV heads of 32 by default), forward and
backward, through the plans the trainer uses (`trl_longpo.attention` ring plans, the SP tree plan, `UlyssesPlan`), on
CPU over gloo. Every torch.distributed collective called inside is wrapped and its bytes counted per rank, as a
bandwidth-optimal algorithm sends them (nccl-tests' "bus" accounting): P2P sends by size, all-to-all (n-1)/n of the
input, all-gather (n-1) x the input, reduce-scatter (n-1)/n of the input, all-reduce 2 (n-1)/n. Bytes scale exactly
with tokens and widths, so a short sequence gives the per-token volume at any length. The table also shows the
planner's formula (`trl_longpo.sequence_parallel.planning.comm_bytes_per_layer`, forward + backward, no recompute)
and their ratio, which must be 1.000 (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from trl_longpo.sequence_parallel.planning import ModelShape, comm_bytes_per_layer

# ------------------------------------------------------------------------------------------------ counting


class CollectiveCounter:
    """Wraps torch.distributed's collectives (as the kernels look them up: module attributes) and adds up the bytes
    this rank sends, per collective name."""

    NAMES = (
        "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "batch_isend_irecv",
        "broadcast", "reduce", "isend", "send",
    )  # fmt: skip

    def __init__(self):
        self.bytes: dict[str, float] = {}

    def _add(self, name: str, nbytes: float) -> None:
        self.bytes[name] = self.bytes.get(name, 0.0) + nbytes

    def _sent(self, name: str, args, kwargs) -> float:
        import torch.distributed as dist

        group = kwargs.get("group")
        n = dist.get_world_size(group)
        size = lambda t: t.numel() * t.element_size()
        if name == "all_to_all_single":
            return size(args[1]) * (n - 1) / n
        if name == "all_gather_into_tensor":
            return size(args[1]) * (n - 1)
        if name == "reduce_scatter_tensor":
            return size(args[1]) * (n - 1) / n
        if name == "all_reduce":
            return size(args[0]) * 2 * (n - 1) / n
        if name in ("broadcast", "reduce"):  # broadcast: the source sends to the n-1 others; reduce: all but the root
            me = dist.get_rank(group) if "group_src" in kwargs or "group_dst" in kwargs else dist.get_rank()
            root = kwargs.get("group_src", kwargs.get("group_dst", kwargs.get("src", kwargs.get("dst"))))
            root = args[1] if root is None else root
            if name == "broadcast":
                return size(args[0]) * (n - 1) if me == root else 0.0
            return 0.0 if me == root else size(args[0])
        if name == "batch_isend_irecv":
            return sum(size(op.tensor) for op in args[0] if getattr(op.op, "__name__", "") in ("isend", "send"))
        return size(args[0])  # isend / send

    @contextlib.contextmanager
    def counting(self):
        import torch.distributed as dist

        originals = {name: getattr(dist, name) for name in self.NAMES}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                self._add(name, self._sent(name, args, kwargs))
                return fn(*args, **kwargs)

            counted.__name__ = fn.__name__
            return counted

        for name, fn in originals.items():
            if name not in ("isend", "send"):  # P2POp(dist.isend, ...) is counted in batch_isend_irecv
                setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def total(self) -> float:
        return sum(self.bytes.values())


# ------------------------------------------------------------------------------------------------ one rank


def _plan(layout: dict, shape: ModelShape, tokens: int, mesh):
    """This rank's local token indices and attention plan for `layout` (shared: one tree, else one causal row)."""
    import torch

    from trl_longpo.attention.ring import make_varlen_plan
    from trl_longpo.attention.tree import Tree, TreeAttentionPlan, plan_for_trees
    from trl_longpo.sequence_parallel.sharding import local_ranges
    from trl_longpo.sequence_parallel.tree import local_tree_blocks
    from trl_longpo.sequence_parallel.ulysses import UlyssesPlan

    sp, u, rank = mesh["sp"], layout["ulysses"], mesh["rank"]
    ring, ring_rank = sp // u, rank // u
    impl = layout["impl"]
    answer = tokens // 8
    trees = [Tree(tokens - 2 * answer, (answer, answer))] if layout["shared"] else [Tree(tokens)]
    segments = [tokens]
    ranges = local_ranges(segments, rank, sp, impl, u)
    local = torch.cat([torch.arange(a, b) for a, b in ranges])
    if layout["shared"]:
        if ring == 1:
            inner = plan_for_trees(trees, backend="cpu")
        else:
            blocks, count = local_tree_blocks(trees, segments, ring_rank, ring, impl)
            inner = TreeAttentionPlan(tuple(blocks), count, gather_group=mesh["ring_group"], backend="cpu")
    else:
        cu = torch.tensor([0, tokens], dtype=torch.int32)
        inner = make_varlen_plan(impl, cu, ring_rank, ring)
    if u == 1:
        return local, inner, mesh["ring_group"]
    return local, UlyssesPlan(inner, mesh["ulysses_group"], mesh["ring_group"], len(local)), None


def count_layouts(job: dict) -> list[dict]:
    """On every rank of the initialised world (one SP group): count each layout's bytes for one layer."""
    import torch
    import torch.distributed as dist

    from trl_longpo.sequence_parallel.ulysses import init_ulysses_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = ModelShape(**job["shape"])
    results = []
    for layout in job["layouts"]:
        u = layout["ulysses"]
        ulysses_group, ring_group = init_ulysses_groups(world, u, 1, rank)
        if u == 1:
            ring_group = dist.group.WORLD
        mesh = {"sp": world, "rank": rank, "ulysses_group": ulysses_group, "ring_group": ring_group}
        local, plan, group = _plan(layout, shape, job["tokens"], mesh)
        g = torch.Generator().manual_seed(0)
        full = [
            torch.randn(job["tokens"], heads, shape.head_dim, generator=g).to(torch.bfloat16)
            for heads in (shape.heads, shape.kv_heads, shape.kv_heads)
        ]
        q, k, v = (t[local].clone().requires_grad_() for t in full)
        del full
        counter = CollectiveCounter()
        rss = _peak_start() if job.get("peak") else 0
        with counter.counting():
            out = plan.attend(q, k, v, softmax_scale=shape.head_dim**-0.5, group=group, heads_k_stride=1)
            forward = counter.total()
            out.float().sum().backward()
        peak = _peak_kib() - rss if job.get("peak") else 0
        results.append(
            {**layout, "forward": forward, "total": counter.total(), "by_collective": counter.bytes, "peak_kib": peak}
        )
        del q, k, v, out
        dist.barrier()
    return results


def _peak_start() -> int:
    """Reset the peak resident set (VmHWM) to the current one and return it, in KiB (Linux)."""
    from rss import reset_peak

    return reset_peak() // 1024


def _peak_kib() -> int:
    from rss import read_status_kib

    return read_status_kib("VmHWM")


def run_rank(rank: int, world: int, port: int, job: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    results = count_layouts(job)
    dist.destroy_process_group()
    return results


def _worker(rank: int, world: int, port: int, job: dict, outdir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # the stand-in's and torch's deprecation notices, once per rank
    try:
        result = run_rank(rank, world, port, job)
    except Exception:  # noqa: BLE001 - reported to the parent, which prints it
        result = {"error": traceback.format_exc()}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))


def launch(world: int, job: dict) -> list[list[dict]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(world, port, job, outdir), nprocs=world, join=True, start_method="spawn")
        results = [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        if isinstance(r, dict):
            raise RuntimeError(f"sp={world}: {r['error']}")  # noqa: TRY004 - a rank's failure, not a type error
    return results


# ------------------------------------------------------------------------------------------------ main


def layouts_for(sp: int, heads: int) -> list[dict]:
    out = []
    for shared in (False, True):
        out.append({"name": "ring zigzag", "impl": "zigzag", "ulysses": 1, "shared": shared})
        if not shared:  # the shared tree uses one schedule (all-gather) for both ring layouts
            out.append({"name": "ring llama3", "impl": "llama3", "ulysses": 1, "shared": shared})
        if heads % sp == 0:
            out.append({"name": "ulysses", "impl": "zigzag", "ulysses": sp, "shared": shared})
        if sp >= 4 and heads % 2 == 0:
            out.append({"name": f"hybrid 2 x {sp // 2}", "impl": "zigzag", "ulysses": 2, "shared": shared})
    return out


def make_job(sp: int, tokens: int, shape: ModelShape, peak: bool = False) -> dict:
    layouts = layouts_for(sp, shape.heads)
    if peak:  # the shared prompt's attention buffers: ring (broadcast per owner), Ulysses (local tree)
        layouts = [x for x in layouts if x["shared"]]
    return {"tokens": tokens, "shape": vars(shape), "layouts": layouts, "peak": peak}


def summarise(job: dict, per_rank: list[list[dict]]) -> list[dict]:
    """Max over ranks of the counted bytes, next to the planner's formula, per layout."""
    sp, tokens, shape, rows = len(per_rank), job["tokens"], ModelShape(**job["shape"]), []
    for i, layout in enumerate(job["layouts"]):
        formula = comm_bytes_per_layer(
            shape, layout["ulysses"], sp // layout["ulysses"], tokens, share_prompt=layout["shared"],
            ring_attn_impl=layout["impl"], recompute=False,
        )  # fmt: skip
        rows.append(
            {
                **layout, "sp": sp, "tokens": tokens, "measured": max(ranks[i]["total"] for ranks in per_rank),
                "forward": max(ranks[i]["forward"] for ranks in per_rank),
                "formula": formula["ulysses"] + formula["ring"], "by_collective": per_rank[0][i]["by_collective"],
                "peak_mib": max(ranks[i]["peak_kib"] for ranks in per_rank) / 1024,
            }
        )  # fmt: skip
    return rows


def measure(sps: list[int], tokens: int, shape: ModelShape, peak: bool = False) -> list[dict]:
    rows = []
    for sp in sps:
        job = make_job(sp, tokens, shape, peak)
        rows += summarise(job, launch(sp, job))
    return rows


def table(rows: list[dict], shape: ModelShape) -> str:
    kv = shape.kv_heads * shape.head_dim
    lines = [
        (
            "| layout | prompt | sp | bytes/rank/layer (fwd + bwd) | of which forward | per token of the group "
            f"| per token / (KV width {kv} x 2 B) | planner formula | measured / formula |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_token = r["measured"] / r["tokens"]
        lines.append(
            f"| {r['name']} | {'shared' if r['shared'] else 'unshared'} | {r['sp']} | {r['measured']:,.0f} "
            f"| {r['forward']:,.0f} | {per_token:,.1f} | {per_token / (2 * kv):.3f} | {r['formula']:,.0f} "
            f"| {r['measured'] / r['formula'] if r['formula'] else float('nan'):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sp", default="2,4", help="comma-separated SP sizes (one launch each)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the SP group (multiple of 2 x 8 x sp)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument(
        "--peak", action="store_true",
        help="shared prompt only: also the peak RSS growth per rank during the layer (the transient attention "
        "buffers; use wide KV and long T, e.g. --tokens 8192 --heads 16 --kv-heads 16 --head-dim 128)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    shape = ModelShape("tiny", args.heads * args.head_dim, 1, 1, args.heads, args.kv_heads, args.head_dim, 1)
    rows = measure([int(x) for x in args.sp.split(",")], args.tokens, shape, args.peak)
    print(
        f"# sp_comm: one attention layer, {args.tokens} tokens, {args.heads} query / {args.kv_heads} KV heads of "
        f"{args.head_dim}, bf16, gloo; bytes each rank sends (max over ranks)\n"
    )
    print(table(rows, shape))
    if args.peak:
        kv = args.kv_heads * args.head_dim
        print(
            "\n| layout | sp | peak RSS growth MiB/rank (one layer, fwd + bwd) | group tokens x KV width x 12 B MiB |"
        )
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['sp']} | {r['peak_mib']:,.1f} | {r['tokens'] * kv * 12 / (1 << 20):,.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if abs(r["measured"] - r["formula"]) > 1e-6 * max(r["formula"], 1)]
    for r in bad:
        print(f"MISMATCH {r['name']} {'shared' if r['shared'] else 'unshared'} sp={r['sp']}: {r['by_collective']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
