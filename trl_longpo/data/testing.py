"""Test doubles for the data pipeline: a scripted backend and a fake vLLM engine.

They let the pipeline's logic (filters, grouping, resuming, the vLLM request surface) be tested on a CPU without a
real model, and are small enough for users to test their own templates and filters the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .backends import Completion, GenerationBackend, Sampling

# respond(prompt_text, long_context) -> answer text, or (text, finish_reason)
Responder = Callable[[str, bool], "str | tuple[str, str]"]


def _unpack(reply: str | tuple[str, str]) -> tuple[str, str]:
    return (reply, "stop") if isinstance(reply, str) else reply


class ScriptedBackend(GenerationBackend):
    """Answers each prompt with `respond(decoded_prompt, long_context)`; records every call."""

    def __init__(self, tokenizer: Any, respond: Responder, context_length: int | None = None):
        self.tokenizer, self.respond, self._context_length = tokenizer, respond, context_length
        self.calls: list[dict[str, Any]] = []

    @property
    def context_length(self) -> int | None:
        return self._context_length

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int], long_context: bool = False
    ) -> list[Completion]:
        out = []
        for ids, seed in zip(prompts, seeds):
            text = self.tokenizer.decode(ids)
            self.calls.append({"prompt": text, "ids": ids, "seed": seed, "long_context": long_context})
            answer, reason = _unpack(self.respond(text, long_context))
            out.append(Completion(answer, self.tokenizer.encode(answer, add_special_tokens=False), reason))
        return out


@dataclass
class FakeVLLMEngine:
    """Implements the part of `vllm.LLM` the backend uses: `generate(prompts, sampling_params, use_tqdm=...)`
    returning objects shaped like `vllm.RequestOutput` (`.prompt_token_ids`, `.outputs[0].text/.token_ids/
    .finish_reason`)."""

    respond: Callable[[list[int], Any], tuple[str, str]]
    hf_overrides: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    eos_token_id: int = 2

    def generate(self, prompts: list[Any], sampling_params: Any = None, use_tqdm: bool = True) -> list[Any]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        outputs = []
        for prompt, param in zip(prompts, params):
            text, reason = self.respond(prompt["prompt_token_ids"], param)
            ids = [ord(c) % 256 for c in text] + ([self.eos_token_id] if reason == "stop" else [])
            completion = SimpleNamespace(index=0, text=text, token_ids=ids, finish_reason=reason, stop_reason=None)
            outputs.append(
                SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[completion], finished=True)
            )
        return outputs
