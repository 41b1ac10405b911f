"""`trl-longpo plan`: which (dp, Ulysses, ring) split trains model X at length L on N GPUs, and at what cost.

Memory per GPU is arithmetic on a MEASURED inventory, the same arithmetic the README's "Which SP size" table used:
`benchmarks/sp_memory.py`'s probe records the bytes autograd saves per token for a tiny Mistral-architecture model,
by where they are saved (each decoder layer, outside the layers) and by tensor width class (hidden, MLP, kv, heads,
head_dim, vocab, scalar) and dtype. Each class scales with the target model's width (`scale_inventory`); dtypes stay
as measured. Per token of an SP group, with gradient checkpointing: every layer's bf16 input + one recomputed layer +
everything outside the layers (the probe runs TRL's fused LM head, as training does: no logits are kept) + the fused
head's backward gradient of its input (`TokenBytes.lm_head_grad`: arithmetic from TRL's `ChunkedLogProbFunction`,
transient, while the saved activations are still held). The head's logits tile and weight gradient do not grow with
tokens: `lm_head_buffer_bytes`, part of the fixed memory.

Per GPU of a (dp, u, r) split (sp = u x r ranks per sequence, Ulysses degree u inside, ring degree r across):
  - activations: ceil(tokens per SP group / sp) x the per-token bytes (sp divides them exactly: measured);
  - attention buffers (transient, not divided by the whole sp; see `attention_buffer_bytes`);
  - fixed: ZeRO-3 / FSDP2 full sharding of bf16 weights + grads, fp32 master weights + Adam moments (16 B/param
    over all GPUs) + the fused LM head's backward buffers (`lm_head_buffer_bytes`) + an allowance for gathered layer
    weights, communication buffers, CUDA context, fragmentation.
Communication per layer: bytes each rank sends per attention layer per step (`comm_bytes_per_layer`), the formulas
`benchmarks/sp_comm.py` checks against counted collectives; the time is that volume over stated bandwidths
(arithmetic, not a measurement).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GIB = 1 << 30

# --------------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """The widths that size activations, weights and attention traffic of a decoder-only transformer."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False

    @property
    def num_parameters(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + (q + 2 * kv if self.attention_bias else 0)
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embeddings + self.hidden

    def widths(self) -> dict[str, int]:
        """Width of each tensor class the inventory is keyed by."""
        return {
            "hidden": self.hidden,
            "mlp": self.intermediate,
            "kv": self.kv_heads * self.head_dim,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "scalar": 1,
            "vocab": self.vocab,
            "fixed": 0,
        }

    @classmethod
    def from_config(cls, config: dict, name: str = "config.json") -> ModelShape:
        """From a Hugging Face `config.json` dict (Llama / Mistral / Qwen2 naming; `text_config` is followed)."""
        config = config.get("text_config", config)
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                name=name,
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            )
        except KeyError as missing:
            raise ValueError(f"{name}: no {missing.args[0]!r}; a decoder-only transformer config is needed") from None


BUILTIN_SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("Mistral-7B", 4096, 14336, 32, 32, 8, 128, 32000),
        ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128, 128256),
        ModelShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 128, 152064, attention_bias=True),
        ModelShape("Qwen2.5-14B", 5120, 13824, 48, 40, 8, 128, 152064, attention_bias=True),
        ModelShape("Qwen2.5-72B", 8192, 29568, 80, 64, 8, 128, 152064, attention_bias=True),
    )
}


def load_shape(model: str) -> ModelShape:
    """A built-in name (case-insensitive), a `config.json`, or a model directory holding one."""
    for name, shape in BUILTIN_SHAPES.items():
        if model.lower() == name.lower():
            return shape
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--model {model!r} is neither a built-in shape ({', '.join(BUILTIN_SHAPES)}) nor a config.json / model "
            "directory"
        )
    return ModelShape.from_config(json.loads(path.read_text()), name=str(model))


# ----------------------------------------------------------------------------------------------- inventory

# Bytes saved for backward per token, bf16 model, sp=1, by where and by "width class:dtype". Measured by
# `python benchmarks/sp_memory.py` (probe: a shared pair of 1,794 tokens through `scoring.RowScorer` with TRL's fused
# LM head, the path that trains; hidden 256, MLP 512, 4 heads / 2 kv heads of 64, vocab 1024, 2 layers; output in
# benchmarks/sp_memory_results.md), pasted as printed. Per-layer entries are the mean over the layers. "loss" holds
# what the fused LM head saves outside any module (its bf16 input, targets, log-sum-exp); "fixed" entries are
# per-call sizes (8 B over 1,794 tokens here), which scale to 0.
MEASURED_SHAPE = ModelShape("sp_memory probe", 256, 512, 2, 4, 2, 64, 1024)
MEASURED_INVENTORY: dict[str, dict[str, float]] = {
    "embed": {"scalar:int64": 8.0},
    "layer": {
        "hidden:float32": 2048.0,
        "scalar:float32": 8.0,
        "hidden:bfloat16": 3072.0,
        "kv:bfloat16": 512.0,
        "heads:float32": 16.0,
        "mlp:bfloat16": 4096.0,
    },
    "rope": {"head_dim:bfloat16": 256.0},
    "final_norm": {"hidden:float32": 1024.0, "scalar:float32": 4.0, "hidden:bfloat16": 512.0},
    "loss": {
        "hidden:bfloat16": 512.0,
        "scalar:int64": 16.0,
        "scalar:float32": 4.0,
        "scalar:bool": 2.0,
        "fixed:int64": 0.004459308807134894,
        "scalar:float64": 8.0,
    },
}


def scale_inventory(
    inventory: dict[str, dict[str, float]], measured: ModelShape, target: ModelShape
) -> dict[str, dict[str, float]]:
    """Scale every "width class:dtype" entry by the target's width over the measured model's (dtypes unchanged)."""
    tiny, big = measured.widths(), target.widths()
    scaled: dict[str, dict[str, float]] = {}
    for where, slot in inventory.items():
        for key, value in slot.items():
            cls = key.split(":")[0]
            if cls not in tiny:
                raise ValueError(f"cannot scale width class {cls!r}")
            scaled.setdefault(where, {})[key] = value * big[cls] / tiny[cls] if tiny[cls] else 0.0
    return scaled


@dataclass(frozen=True)
class TokenBytes:
    """Activation bytes per token of an SP group's sequence for one model (see the module docstring)."""

    per_layer: float  # one decoder layer's saved tensors
    per_layer_kv: float  # of which k/v (bf16) and lse: what Ulysses' kv-head replication multiplies
    outside_layers: float  # embeddings ids, RoPE, final norm, the fused LM head's input, targets and log-sum-exp
    layer_input: float  # the bf16 hidden state gradient checkpointing keeps per layer
    lm_head_grad: float  # the fused LM head's backward: fp32 gradient of its input + its bf16 cast (transient)
    layers: int

    def total(self, checkpointing: bool = True, kv_replication: float = 1.0) -> float:
        layer = self.per_layer + (kv_replication - 1.0) * self.per_layer_kv
        kept = self.layers * self.layer_input + layer if checkpointing else self.layers * layer
        return kept + self.outside_layers + self.lm_head_grad


def token_bytes(shape: ModelShape, inventory=None, measured: ModelShape = MEASURED_SHAPE) -> TokenBytes:
    scaled = scale_inventory(MEASURED_INVENTORY if inventory is None else inventory, measured, shape)
    layer = scaled.get("layer", {})
    return TokenBytes(
        per_layer=sum(layer.values()),
        per_layer_kv=sum(v for k, v in layer.items() if k.startswith(("kv:", "heads:"))),
        outside_layers=sum(sum(slot.values()) for where, slot in scaled.items() if where != "layer"),
        layer_input=2 * shape.hidden,
        lm_head_grad=(4 + 2) * shape.hidden,  # TRL's ChunkedLogProbFunction.backward: fp32 zeros, then .to(bf16)
        layers=shape.layers,
    )


# TRL's fused LM head (`trl.kernels.chunked_logprob`): logits are computed in tiles of TOKEN_CHUNK_SIZE tokens x
# _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries, one tile buffer per call (a test checks these against TRL).
LM_HEAD_TOKEN_TILE = 4096
LM_HEAD_VOCAB_TILE = 32768


def lm_head_buffer_bytes(shape: ModelShape) -> float:
    """Per-GPU memory of the fused LM head's backward that does not grow with tokens: its bf16 logits tile and the
    weight gradient, accumulated in fp32 and cast to bf16 on return (both alive at once; arithmetic from TRL's
    `ChunkedLogProbFunction.backward`). Full vocab x hidden on every GPU: the head is gathered under ZeRO-3 / FSDP2."""
    return LM_HEAD_TOKEN_TILE * LM_HEAD_VOCAB_TILE * 2 + shape.vocab * shape.hidden * (4 + 2)


# ----------------------------------------------------------------------------------------------- layouts


def replicated_kv_heads(heads: int, kv_heads: int, ulysses: int) -> int:
    """KV heads after replication for a Ulysses degree (the GQA decision, see `check_ulysses_degree`): the smallest
    multiple of `kv_heads` that `ulysses` divides and that divides `heads` (query heads keep their kv head)."""
    check_ulysses_degree(heads, kv_heads, ulysses)
    for count in range(kv_heads, heads + 1, kv_heads):
        if count % ulysses == 0 and heads % count == 0:
            return count
    return heads  # unreachable: `heads` itself qualifies once ulysses divides heads


def check_ulysses_degree(heads: int, kv_heads: int, ulysses: int) -> None:
    """Ulysses splits attention heads over `ulysses` ranks, so the query head count must be a multiple of it.

    GQA decision: KV heads fewer than (or not divisible by) the degree are REPLICATED, as DeepSpeed-Ulysses and
    yunchang do, rather than refused: Qwen2.5-7B (28 query / 4 KV heads) would otherwise be capped at Ulysses 4. The
    cost is KV traffic and memory up to heads/kv_heads larger for the attention inputs (the planner counts it).
    """
    if ulysses < 1 or heads % ulysses or heads % kv_heads:
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and d <= max(ulysses, 1)]
        raise ValueError(
            f"ulysses_degree={ulysses} must divide the model's {heads} query heads; the largest valid degree up to it "
            f"is {valid[-1]} (use sequence_parallel_size = ulysses_degree x ring degree for the rest)"
        )


@dataclass(frozen=True)
class PlanOptions:
    max_length: int
    gpus: int
    gpu_memory_gib: float = 80e9 / GIB  # an "80 GB" GPU
    answer_length: int = 1024
    engine: str = "zero3"
    checkpointing: bool = True
    share_prompt: bool = True
    ring_attn_impl: str = "zigzag"
    allowance_gib: float = 7.0
    min_headroom_gib: float = 10.0
    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0  # GB/s per GPU per direction, H100 SXM NVLink 4
    network_gbps: float = 50.0  # GB/s per GPU per direction, 400 Gb/s InfiniBand NDR
    attention_tflops: float = 350.0  # achieved bf16 flash-attention throughput on an H100 (FA2 class)
    tree_chunked_grads: bool = True  # the SP tree reduces dK/dV per owner rank (no full-length fp32 buffer)
    sp_sizes: tuple[int, ...] | None = None  # only these sp sizes (None: all)
    ulysses_degrees: tuple[int, ...] | None = None  # only these Ulysses degrees (None: all valid)


@dataclass(frozen=True)
class LayoutPlan:
    dp: int
    ulysses: int
    ring: int
    tokens_per_group: int
    tokens_per_gpu: int
    activations: float  # bytes
    attention_buffers: float
    fixed: float
    total: float
    budget: float
    comm_bytes: float  # per rank per layer per step
    comm_seconds: float
    compute_seconds: float  # attention per layer per step per GPU
    unshared_total: float | None = None
    recommended: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def headroom(self) -> float:
        return self.budget - self.total

    @property
    def layout(self) -> str:
        if self.sp == 1:
            return "none"
        if self.ulysses == 1:
            return "ring"
        return "ulysses" if self.ring == 1 else "hybrid"


def tokens_per_group(options: PlanOptions) -> int:
    """One pair per SP group: a shared tree holds prompt + chosen + rejected + the fork token (at most max_length +
    answer + 1); unshared, two rows of at most max_length."""
    if options.share_prompt:
        return options.max_length + options.answer_length + 1
    return 2 * options.max_length


def attention_buffer_bytes(shape: ModelShape, options: PlanOptions, ulysses: int, ring: int, tokens: int) -> float:
    """Transient attention memory per GPU that sp does not divide (bytes).

    Shared prompt: tree attention needs every key of the tree for its queries. Ulysses (u ranks) holds the group's
    tokens for 1/u of the (replicated) kv heads: its backward accumulates fp32 dK/dV for them (8 B per kv value).
    With a ring of r > 1, K/V of the other ring ranks arrive too: all-gathered (bf16, 4 B) with fp32 dK/dV over the
    gathered length (8 B) when `tree_chunked_grads` is off (12 B per kv value per group token: the README's earlier
    figure); per owner rank otherwise (one owner's K/V and fp32 dK/dV at a time, sizes of a ring shard).
    Ulysses also keeps one more hidden-wide bf16 copy of the attention output (before the reverse all-to-all).
    """
    kv_local = replicated_kv_heads(shape.heads, shape.kv_heads, ulysses) // ulysses * shape.head_dim
    sp = ulysses * ring
    extra = 0.0
    if ulysses > 1:
        extra += math.ceil(tokens / sp) * 2 * shape.heads * shape.head_dim
    if not options.share_prompt:
        return extra
    if ring == 1:
        return extra + tokens * kv_local * 8
    held = tokens if not options.tree_chunked_grads else math.ceil(tokens / ring)
    return extra + held * kv_local * 12


def comm_bytes_per_layer(
    shape: ModelShape,
    ulysses: int,
    ring: int,
    tokens: int,
    *,
    share_prompt: bool,
    ring_attn_impl: str = "zigzag",
    recompute: bool = True,
    tree_chunked_grads: bool = True,
) -> dict[str, float]:
    """Bytes one rank sends per attention layer per step (forward + backward, + the recomputed forward under gradient
    checkpointing), bf16 activations, as `benchmarks/sp_comm.py` counts them: P2P sends by size; all-to-all
    (u-1)/u of its input; all-gather (n-1) x its input; reduce-scatter (n-1)/n of its input; reduce to each owner:
    its input. Returns {"ulysses": ..., "ring": ...}."""
    n = tokens / (ulysses * ring)  # tokens per rank
    d = shape.head_dim
    kv = replicated_kv_heads(shape.heads, shape.kv_heads, ulysses)
    forward_passes = 2 if recompute else 1
    out = {"ulysses": 0.0, "ring": 0.0}
    if ulysses > 1:
        per_pass = (ulysses - 1) / ulysses * n * d * 2 * (2 * shape.heads + 2 * kv)  # q, k, v, out
        out["ulysses"] = per_pass * forward_passes + per_pass  # backward: dout, dq, dk, dv
    if ring > 1:
        kv_rank = n * kv * d  # values of K (or V) per rank, all local heads (= n * u tokens x kv / u heads)
        if share_prompt:  # all-gather K/V (forward and again in backward), dK/dV fp32 back to their owners
            gather = (ring - 1) * 2 * kv_rank * 2
            grads = (ring - 1) * 2 * kv_rank * 4
            out["ring"] = gather * forward_passes + gather + grads
        elif ring_attn_impl == "zigzag":  # K/V around the ring r-1 times; dK/dV (fp32) r times in backward
            kv_pass = (ring - 1) * 2 * kv_rank * 2
            out["ring"] = kv_pass * forward_passes + kv_pass + ring * 2 * kv_rank * 4
        else:  # llama3: all-gather K/V, again in backward, reduce-scatter dK/dV in the input dtype
            gather = (ring - 1) * 2 * kv_rank * 2
            out["ring"] = gather * forward_passes + gather + (ring - 1) * 2 * kv_rank * 2
    return out


def attention_flops(shape: ModelShape, options: PlanOptions) -> float:
    """Attention FLOPs of one layer for one pair (forward 2 matmuls, causal half; backward 2.5 x forward; + a
    recomputed forward under checkpointing)."""
    per_token_pair = 4 * shape.heads * shape.head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    length, answer = options.max_length, options.answer_length
    if options.share_prompt:  # [prompt][chosen] causal + rejected: causal on itself, full on the prompt
        prompt = length - answer
        forward = per_token_pair * ((prompt + answer) ** 2 / 2 + answer**2 / 2 + answer * prompt)
    else:
        forward = 2 * per_token_pair * length**2 / 2
    return forward * (3.5 + (1.0 if options.checkpointing else 0.0))


def valid_splits(shape: ModelShape, gpus: int) -> list[tuple[int, int, int]]:
    """Every (dp, ulysses, ring) with dp x ulysses x ring = gpus and ulysses dividing the query heads."""
    splits = []
    for sp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        for u in (d for d in range(1, sp + 1) if sp % d == 0 and shape.heads % d == 0):
            splits.append((gpus // sp, u, sp // u))
    return splits


def plan_split(shape: ModelShape, options: PlanOptions, dp: int, ulysses: int, ring: int) -> LayoutPlan:
    sp = ulysses * ring
    tokens = tokens_per_group(options)
    per_token = token_bytes(shape).total(
        options.checkpointing, replicated_kv_heads(shape.heads, shape.kv_heads, ulysses) / shape.kv_heads
    )
    local = math.ceil(tokens / sp)
    activations = local * per_token
    buffers = attention_buffer_bytes(shape, options, ulysses, ring, tokens)
    fixed = 16 * shape.num_parameters / (dp * sp) + lm_head_buffer_bytes(shape) + options.allowance_gib * GIB
    comm = comm_bytes_per_layer(
        shape, ulysses, ring, tokens, share_prompt=options.share_prompt, ring_attn_impl=options.ring_attn_impl,
        recompute=options.checkpointing, tree_chunked_grads=options.tree_chunked_grads,
    )  # fmt: skip
    ring_bandwidth = options.nvlink_gbps if sp <= options.gpus_per_node else options.network_gbps
    ulysses_bandwidth = options.nvlink_gbps if ulysses <= options.gpus_per_node else options.network_gbps
    seconds = comm["ulysses"] / (ulysses_bandwidth * 1e9) + comm["ring"] / (ring_bandwidth * 1e9)
    unshared = None
    if options.share_prompt:
        unshared_options = replace(options, share_prompt=False)
        unshared = (
            math.ceil(tokens_per_group(unshared_options) / sp) * per_token
            + attention_buffer_bytes(shape, unshared_options, ulysses, ring, tokens_per_group(unshared_options))
            + fixed
        )
    return LayoutPlan(
        dp=dp,
        ulysses=ulysses,
        ring=ring,
        tokens_per_group=tokens,
        tokens_per_gpu=local,
        activations=activations,
        attention_buffers=buffers,
        fixed=fixed,
        total=activations + buffers + fixed,
        budget=options.gpu_memory_gib * GIB,
        comm_bytes=comm["ulysses"] + comm["ring"],
        comm_seconds=seconds,
        compute_seconds=attention_flops(shape, options) / sp / (options.attention_tflops * 1e12),
        unshared_total=unshared,
    )


def plan(shape: ModelShape, options: PlanOptions) -> list[LayoutPlan]:
    """Every valid split, the recommended one flagged: the smallest sp that leaves `min_headroom_gib` (more data
    parallelism, less traffic per token), then the least communication time per layer."""
    if options.engine not in ("zero3", "fsdp2"):
        raise ValueError(f"--engine must be zero3 or fsdp2, got {options.engine!r}")
    if options.max_length < 1 or options.gpus < 1:
        raise ValueError("--max_length and --gpus must be positive")
    splits = [
        (dp, u, r)
        for dp, u, r in valid_splits(shape, options.gpus)
        if (options.sp_sizes is None or u * r in options.sp_sizes)
        and (options.ulysses_degrees is None or u in options.ulysses_degrees)
    ]
    plans = [plan_split(shape, options, *split) for split in splits]
    good = [p for p in plans if p.headroom >= options.min_headroom_gib * GIB]
    if good:
        best = min(good, key=lambda p: (p.sp, p.comm_seconds, -p.ulysses))
        plans = [replace(p, recommended=p is best) for p in plans]
    return plans


# ----------------------------------------------------------------------------------------------- output


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.1f}"


def parse_tokens(text: str) -> int:
    """'128K' -> 131072, '1M' -> 1048576, '4096' -> 4096."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"not a token count: {text!r} (use e.g. 131072, 128K or 1M)") from None


def format_tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def format_plan(
    shape: ModelShape, options: PlanOptions, plans: list[LayoutPlan], max_lengths: dict[int, int] | None = None
) -> str:
    """Markdown: a header, one row per split (`max_lengths` maps id(plan) -> its max_length when several lengths
    are planned in one table), and the recommendation(s)."""
    budget = options.gpu_memory_gib
    lengths = sorted(set(max_lengths.values())) if max_lengths else [options.max_length]
    head = (
        f"# {shape.name}: hidden {shape.hidden}, MLP {shape.intermediate}, {shape.layers} layers, {shape.heads} / "
        f"{shape.kv_heads} heads of {shape.head_dim}, vocab {shape.vocab}, {shape.num_parameters / 1e9:.2f} B "
        f"parameters; max_length {', '.join(format_tokens(n) for n in lengths)}, answers <= {options.answer_length}, "
        f"{'shared prompt' if options.share_prompt else 'unshared'}, "
        f"{'gradient checkpointing' if options.checkpointing else 'no checkpointing'}, {options.engine}, "
        f"{options.gpus} GPUs of {budget:.1f} GiB ({options.gpus_per_node} per node)"
    )
    per_token = token_bytes(shape).total(options.checkpointing)
    lines = [
        head,
        (
            f"# activations: {per_token / 1024:,.1f} KiB per token (measured inventory scaled by widths, incl. "
            f"{token_bytes(shape).lm_head_grad / 1024:,.0f} KiB LM-head input gradient); fixed: 16 B x "
            f"{shape.num_parameters / 1e9:.2f} B params / GPUs + {lm_head_buffer_bytes(shape) / GIB:.2f} GiB LM-head "
            f"backward + {options.allowance_gib:.1f} GiB; comm: bytes per "
            f"rank per attention layer per step; time at NVLink {options.nvlink_gbps:.0f} / network "
            f"{options.network_gbps:.0f} GB/s, attention at {options.attention_tflops:.0f} TFLOPS (arithmetic)"
        ),
        "",
        (
            "| max_length | GPUs: dp × ulysses × ring | layout | tokens per SP group | tokens/GPU | activations GiB "
            "| + attention buffers | + fixed | **total** | fits? | unshared total | comm MiB/layer | comm ms/layer "
            "| attention ms/layer |"
        ),
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for p in plans:
        length = max_lengths[id(p)] if max_lengths else options.max_length
        fits = (
            f"**yes, {p.headroom / GIB:.1f} GiB headroom (recommended)**"
            if p.recommended
            else (f"yes, {p.headroom / GIB:.1f} GiB headroom" if p.fits else "no")
        )
        lines.append(
            f"| {format_tokens(length)} | {p.dp * p.sp}: {p.dp} × {p.ulysses} × {p.ring} | {p.layout} | {p.tokens_per_group:,} | {p.tokens_per_gpu:,} "
            f"| {_gib(p.activations)} | {_gib(p.attention_buffers)} | {_gib(p.fixed)} | **{_gib(p.total)}** | {fits} "
            f"| {_gib(p.unshared_total)} | {p.comm_bytes / (1 << 20):,.0f} | {p.comm_seconds * 1e3:,.2f} "
            f"| {p.compute_seconds * 1e3:,.1f} |"
        )
    lines.append("")
    for length in lengths:
        group = [p for p in plans if (max_lengths[id(p)] if max_lengths else options.max_length) == length]
        best = next((p for p in group if p.recommended), None)
        if best is None:
            lines.append(
                f"{format_tokens(length)}: no split leaves {options.min_headroom_gib:.0f} GiB headroom (more GPUs or a "
                f"shorter max_length{'' if options.share_prompt else ', or the shared prompt'})."
            )
        else:
            lines.append(
                f"{format_tokens(length)}: recommended dp {best.dp} × ulysses {best.ulysses} × ring {best.ring} -> "
                f"sequence_parallel_size={best.sp}, ulysses_degree={best.ulysses} (the smallest sp with >= "
                f"{options.min_headroom_gib:.0f} GiB headroom, then the least communication time per layer)."
            )
    return "\n".join(lines)


def plans_as_json(plans: list[LayoutPlan]) -> list[dict]:
    return [asdict(p) | {"sp": p.sp, "fits": p.fits, "layout": p.layout} for p in plans]


def main(argv: list[str]) -> int:
    """`trl-longpo plan` (see the module docstring); prints a markdown table, or JSON with --json."""
    import argparse

    defaults = PlanOptions(max_length=1, gpus=1)
    parser = argparse.ArgumentParser(
        prog="trl-longpo plan",
        description="Per-GPU memory, fit and communication of every (dp, Ulysses, ring) split for a model and length.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help=f"a config.json, a model directory, or one of: {', '.join(BUILTIN_SHAPES)}"
    )
    parser.add_argument("--max_length", required=True, help="tokens per pair's longest sequence; 128K, 1M, or a list")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in total (dp x sp)")
    parser.add_argument("--gpu_memory_gib", type=float, default=round(defaults.gpu_memory_gib, 1), help="per GPU")
    parser.add_argument("--answer_length", type=int, default=defaults.answer_length, help="longest rejected answer")
    parser.add_argument(
        "--engine", choices=["zero3", "fsdp2"], default=defaults.engine, help="both: 16 B/param / GPUs"
    )
    parser.add_argument("--no_checkpointing", action="store_true", help="plan without gradient checkpointing")
    parser.add_argument("--unshared", action="store_true", help="share_prompt=False (two rows per pair)")
    parser.add_argument("--ring_attn_impl", choices=["zigzag", "llama3"], default=defaults.ring_attn_impl)
    parser.add_argument(
        "--gathered_tree_grads", action="store_true",
        help="the SP tree's earlier backward: fp32 dK/dV over the whole gathered length on every rank",
    )  # fmt: skip
    parser.add_argument("--sp", default=None, help="only these sp sizes (comma-separated)")
    parser.add_argument("--ulysses", default=None, help="only these Ulysses degrees (comma-separated; 1 = ring)")
    parser.add_argument("--gpus_per_node", type=int, default=defaults.gpus_per_node)
    parser.add_argument("--min_headroom_gib", type=float, default=defaults.min_headroom_gib)
    parser.add_argument("--allowance_gib", type=float, default=defaults.allowance_gib, help="buffers, context, ...")
    parser.add_argument("--nvlink_gbps", type=float, default=defaults.nvlink_gbps, help="GB/s per GPU, in a node")
    parser.add_argument("--network_gbps", type=float, default=defaults.network_gbps, help="GB/s per GPU, across")
    parser.add_argument("--attention_tflops", type=float, default=defaults.attention_tflops)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    shape = load_shape(args.model)
    sps = tuple(int(x) for x in args.sp.split(",")) if args.sp else None
    degrees = tuple(int(x) for x in args.ulysses.split(",")) if args.ulysses else None
    rows, lengths = [], {}
    for max_length in (parse_tokens(x) for x in args.max_length.split(",")):
        options = PlanOptions(
            max_length=max_length,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory_gib,
            answer_length=args.answer_length,
            engine=args.engine,
            checkpointing=not args.no_checkpointing,
            share_prompt=not args.unshared,
            ring_attn_impl=args.ring_attn_impl,
            allowance_gib=args.allowance_gib,
            min_headroom_gib=args.min_headroom_gib,
            gpus_per_node=args.gpus_per_node,
            nvlink_gbps=args.nvlink_gbps,
            network_gbps=args.network_gbps,
            attention_tflops=args.attention_tflops,
            tree_chunked_grads=not args.gathered_tree_grads,
            sp_sizes=sps,
            ulysses_degrees=degrees,
        )
        for p in plan(shape, options):
            rows.append(p)
            lengths[id(p)] = max_length
    if args.json:
        print(json.dumps([d | {"max_length": lengths[id(p)]} for p, d in zip(rows, plans_as_json(rows))], indent=1))
    else:
        print(format_plan(shape, options, rows, lengths))
    return 0
