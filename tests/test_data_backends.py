"""Engines: transformers backend (per-request seeds, RoPE override restored) and the vLLM backend on a fake engine."""

from __future__ import annotations

import pytest
import torch

from trl_longpo.data import GenerationConfig, HFBackend, Sampling, VLLMBackend, generate_dataset, rope_theta_override
from trl_longpo.data.backends import make_backend
from trl_longpo.data.testing import FakeVLLMEngine
from trl_longpo.tiny import build_tiny_model


@pytest.fixture(scope="module")
def hf_backend(tokenizer):
    return HFBackend(build_tiny_model(seed=0), tokenizer, batch_size=4, device="cpu")


def test_answers_depend_only_on_their_own_seed(hf_backend):
    prompts = [[1, 3, 100 + i, 200 + i, 300 + i, 4] for i in range(5)]  # equal lengths: no padding involved
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    together = hf_backend.generate(prompts, sampling, seeds=[11, 12, 13, 14, 15])
    alone = [hf_backend.generate([p], sampling, seeds=[s])[0] for p, s in zip(prompts, [11, 12, 13, 14, 15])]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    reseeded = hf_backend.generate(prompts[:1], sampling, seeds=[99])[0]
    assert all(c.finish_reason in {"stop", "length"} for c in together)
    assert len(together[0].token_ids) <= 6 and reseeded.text is not None


def test_greedy_and_padding(hf_backend):
    prompts = [[1, 3, 50, 60, 4], [1, 3, 50, 60, 70, 80, 90, 4]]
    out = hf_backend.generate(prompts, Sampling(max_new_tokens=4, temperature=0.0), seeds=[0, 0])
    alone = hf_backend.generate(prompts[1:], Sampling(max_new_tokens=4, temperature=0.0), seeds=[0])
    assert out[1].token_ids == alone[0].token_ids  # left padding does not change the longer prompt's answer


def test_finish_reason_stop_on_eos(tokenizer):
    class EosHead(torch.nn.Module):  # a model that always ends its answer at once
        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], 1024)
            logits[..., tokenizer.eos_token_id] = 1.0
            return logits

    model = build_tiny_model(seed=0)
    model.lm_head = EosHead()
    backend = HFBackend(model, tokenizer, device="cpu")
    (out,) = backend.generate([[1, 3, 100, 4]], Sampling(max_new_tokens=5, temperature=0.0), seeds=[0])
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""


def test_rope_theta_override_is_applied_and_restored(tokenizer):
    model = build_tiny_model(seed=0).eval()
    x = torch.tensor([[1, 3] + list(range(100, 160)) + [4]])
    rotary = model.model.rotary_emb
    theta = model.config.rope_parameters["rope_theta"]
    inv_freq = rotary.inv_freq.clone()
    with torch.no_grad():
        base = model(x).logits
        with rope_theta_override(model, 1e7):
            assert model.config.rope_parameters["rope_theta"] == 1e7
            assert not torch.equal(rotary.inv_freq, inv_freq)
            expected = 1.0 / (
                1e7 ** (torch.arange(0, inv_freq.numel() * 2, 2, dtype=torch.float) / (inv_freq.numel() * 2))
            )
            torch.testing.assert_close(rotary.inv_freq, expected)
            long = model(x).logits
        after = model(x).logits
    assert not torch.allclose(base, long)
    assert torch.equal(base, after) and torch.equal(rotary.inv_freq, inv_freq)
    assert model.config.rope_parameters["rope_theta"] == theta


def test_hf_backend_uses_the_override_only_for_long_pass(tokenizer):
    model = build_tiny_model(seed=0)
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda m, i, o: seen.append(float(m.config.rope_parameters["rope_theta"]))
    )
    backend = HFBackend(model, tokenizer, device="cpu", long_rope_theta=5e6)
    sampling = Sampling(max_new_tokens=2, temperature=0.0)
    backend.generate([[1, 3, 100, 4]], sampling, [0], long_context=False)
    short_thetas, seen[:] = set(seen), []
    backend.generate([[1, 3, 100, 4]], sampling, [0], long_context=True)
    hook.remove()
    assert short_thetas == {model.config.rope_parameters["rope_theta"]} and set(seen) == {5e6}


# ------------------------------------------------------------------------------------------------ vLLM (fake engine)
def _fake_vllm(engines: list, answers=None):
    def respond(prompt_ids, params):
        if answers is not None:
            return answers(prompt_ids, params)
        return f"answer to {len(prompt_ids)} tokens with seed {params.seed}", "stop"

    def factory(model, hf_overrides, **kwargs):
        engine = FakeVLLMEngine(respond, hf_overrides, kwargs)
        engines.append(engine)
        return engine

    return factory


class _Params(dict):
    """Stands in for vllm.SamplingParams (attribute access to the keyword arguments)."""

    __getattr__ = dict.__getitem__


def test_vllm_backend_request_surface():
    engines: list[FakeVLLMEngine] = []
    backend = VLLMBackend(
        "some/model",
        tensor_parallel_size=4,
        max_model_len=32768,
        long_max_model_len=131072,
        long_rope_theta=1e7,
        engine_kwargs='{"enforce_eager": true}',
        engine_factory=_fake_vllm(engines),
        sampling_params_factory=_Params,
        context_length=32768,
        device="cuda",
    )
    assert backend.context_length == 32768
    out = backend.generate([[1, 2, 3], [4, 5]], Sampling(7, 0.5, 0.9, 20), seeds=[101, 102])
    assert [c.text for c in out] == ["answer to 3 tokens with seed 101", "answer to 2 tokens with seed 102"]
    (engine,) = engines
    prompts, params = engine.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]  # no re-templating
    assert params[0] == {"n": 1, "temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_tokens": 7, "seed": 101}
    assert engine.kwargs["tensor_parallel_size"] == 4 and engine.kwargs["max_model_len"] == 32768
    assert engine.kwargs["enforce_eager"] is True and engine.hf_overrides is None
    # the long pass gets its own engine whose config carries the larger RoPE base; the short one is released first
    backend.generate([[1]], Sampling(3), seeds=[1], long_context=True)
    long_engine = engines[-1]
    assert len(engines) == 2 and long_engine.hf_overrides is not None
    from transformers import MistralConfig

    patched = long_engine.hf_overrides(MistralConfig(max_position_embeddings=32768))
    assert patched.rope_parameters["rope_theta"] == 1e7 and patched.max_position_embeddings == 131072
    assert long_engine.kwargs["max_model_len"] == 131072
    import pickle

    assert pickle.loads(pickle.dumps(long_engine.hf_overrides)).keywords["theta"] == 1e7  # reaches TP workers
    backend.generate([[1]], Sampling(3), seeds=[1], long_context=True)
    assert len(engines) == 2  # reused
    assert Sampling(3).top_k == 0 and engine.calls[0][1][0]["top_k"] == 20


def test_vllm_backend_drives_the_pipeline(tmp_path, tokenizer):
    engines: list[FakeVLLMEngine] = []

    def answers(prompt_ids, params):
        text = tokenizer.decode(prompt_ids)
        if "comprehensive English questions" in text:
            return "1. What is explained in this part of the text?\n2. Which rule is given here?", "stop"
        if params.max_tokens == 9 and len(prompt_ids) > 300:
            return "The long prompt answer has different words entirely.", "stop"
        return "The short prompt answer cites the passage precisely.", "stop"

    docs = [
        "\n\n".join(f"Paragraph {p} of document {d}: " + "alpha beta gamma " * 8 for p in range(8)) for d in range(3)
    ]
    cfg = GenerationConfig(
        model="some/model",
        backend="vllm",
        output=str(tmp_path / "out"),
        chunk_tokens=64,
        max_new_tokens=9,
        instruction_max_new_tokens=20,
        long_rope_theta=1e7,
        progress=False,
    )
    backend = VLLMBackend(
        "some/model",
        long_rope_theta=1e7,
        engine_factory=_fake_vllm(engines, answers),
        sampling_params_factory=_Params,
        context_length=4096,
        device="cuda",
    )
    result = generate_dataset(cfg, documents=docs, backend=backend, tokenizer=tokenizer)
    assert len(result.dataset) == 3
    assert len(engines) == 2 and engines[0].hf_overrides is None and engines[1].hf_overrides is not None
    row = result.dataset[0]
    assert row["rejected"][0]["content"].startswith("The long prompt answer")
    assert row["chosen"][0]["content"].startswith("The short prompt answer")


# ---------------------------------------------------------------------------------- vLLM defaults on a CPU build
def _engine_kwargs(model: str, device: str, **options) -> dict:
    engines: list[FakeVLLMEngine] = []
    backend = VLLMBackend(
        model, engine_factory=_fake_vllm(engines), sampling_params_factory=_Params, device=device, **options
    )
    backend.generate([[1, 2]], Sampling(2), seeds=[0])
    backend.generate([[1, 2]], Sampling(2), seeds=[0], long_context=True)  # the RoPE engine gets the same settings
    assert len(engines) == (2 if options.get("long_rope_theta") else 1)
    platform_keys = ("dtype", "enforce_eager", "kv_cache_memory_bytes")
    assert len({tuple(e.kwargs.get(k) for k in platform_keys) for e in engines}) == 1
    return engines[-1].kwargs


@pytest.fixture
def fp32_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    model = build_tiny_model(seed=0)
    assert model.dtype == torch.float32
    model.config.save_pretrained(tmp_path)  # the config alone: its dtype is what the backend reads
    return str(tmp_path)


def test_vllm_on_cpu_gets_a_stated_kv_cache_eager_mode_and_the_checkpoint_dtype(fp32_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="trl_longpo.data.backends"):
        kwargs = _engine_kwargs(fp32_checkpoint, "cpu", long_rope_theta=1e6, long_max_model_len=4096)
    assert kwargs["kv_cache_memory_bytes"] == 4 * 2**30  # not 0.9 x the machine's RAM
    assert kwargs["enforce_eager"] is True
    assert kwargs["dtype"] == "float32"  # vLLM's own "auto" would be bfloat16 for these float32 weights
    assert "KV cache 4 GiB" in caplog.text and "dtype float32" in caplog.text and "enforce_eager" in caplog.text
    assert _engine_kwargs(fp32_checkpoint, "cpu", kv_cache_gib=1)["kv_cache_memory_bytes"] == 2**30


def test_vllm_on_cpu_keeps_what_the_user_chose(fp32_checkpoint, monkeypatch):
    chosen = _engine_kwargs(
        fp32_checkpoint, "cpu", dtype="bfloat16", engine_kwargs={"enforce_eager": False, "kv_cache_memory_bytes": 5}
    )
    assert chosen["dtype"] == "bfloat16" and chosen["enforce_eager"] is False and chosen["kv_cache_memory_bytes"] == 5
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM lets the variable win: do not claim another size
    assert "kv_cache_memory_bytes" not in _engine_kwargs(fp32_checkpoint, "cpu")


def test_vllm_on_gpu_keeps_vllm_defaults(fp32_checkpoint):
    kwargs = _engine_kwargs(fp32_checkpoint, "cuda")
    assert kwargs["dtype"] == "auto" and kwargs["gpu_memory_utilization"] == 0.9
    assert "enforce_eager" not in kwargs and "kv_cache_memory_bytes" not in kwargs
    assert _engine_kwargs(fp32_checkpoint, "cuda", kv_cache_gib=0.5)["kv_cache_memory_bytes"] == 2**29


def test_generate_options_reach_the_vllm_backend(tmp_path):
    config = GenerationConfig(model="m", backend="vllm", output=str(tmp_path), kv_cache_gib=1.5, dtype="float32")
    backend = make_backend(config, tokenizer=None)
    assert backend.engine_kwargs["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert backend.engine_kwargs["dtype"] == "float32"


def test_vllm_completions_exclude_the_eos_they_stopped_on():
    """vLLM returns the EOS token in `token_ids`; the backend drops it, as transformers' backend does."""
    engines: list[FakeVLLMEngine] = []
    backend = VLLMBackend(
        "m",
        engine_factory=_fake_vllm(engines, lambda ids, p: ("ab", "stop" if ids[0] else "length")),
        sampling_params_factory=_Params,
        device="cuda",
    )
    stopped, cut = backend.generate([[1], [0]], Sampling(2), seeds=[0, 0])
    assert stopped.token_ids == [ord("a"), ord("b")] and stopped.finish_reason == "stop"
    assert cut.token_ids == [ord("a"), ord("b")] and cut.finish_reason == "length"


def test_max_model_len_below_the_long_context_is_refused(tmp_path, tokenizer):
    from trl_longpo.data import DataConfigError

    lengths = {"context_length": 4096, "max_model_len": 2048, "chunk_tokens": 64}
    cfg = GenerationConfig(model="m", backend="vllm", output=str(tmp_path / "out"), **lengths)
    backend = VLLMBackend(
        "m", engine_factory=_fake_vllm([]), sampling_params_factory=_Params, device="cuda", context_length=1024
    )
    with pytest.raises(DataConfigError, match="--max_model_len 2048 is below the long context .4096"):
        generate_dataset(cfg, documents=["alpha beta " * 300], backend=backend, tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
