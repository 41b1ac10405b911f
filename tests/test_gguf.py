"""GGUF -> model directory, on a tiny llama GGUF written here with the `gguf` package (not the 93 MB SmolLM2)."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from trl_longpo.cli import main as cli_main  # noqa: E402
from trl_longpo.gguf import GGUFError, convert_gguf, is_converted  # noqa: E402
from trl_longpo.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64


def write_tiny_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A llama-architecture GGUF (F32 tensors, gpt2-style BPE tokenizer, chat template); returns the tensors."""
    tokenizer = build_tiny_tokenizer(512)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    specials = set(tokenizer.all_special_tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = control, 1 = normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (len(tokens), HIDDEN)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    tensors = {}
    for name, shape in shapes.items():
        value = (1.0 + 0.1 * rng.standard_normal(shape)) if name.endswith("norm.weight") else 0.2 * rng.standard_normal(shape)
        tensors[name] = value.astype(np.float32)
        writer.add_tensor(name, tensors[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_converted_directory_equals_the_gguf_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tensors = tiny_gguf
    out = convert_gguf(path, tmp_path / "model")
    assert is_converted(path, out)

    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: saving it again works
    # the weights are the file's (embedding and an MLP matrix are stored unpermuted), and the whole model matches
    torch.testing.assert_close(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, torch.from_numpy(tensors["blk.1.ffn_up.weight"]))
    ids = torch.tensor([[1, 17, 42, 99, 7, 300]])
    torch.testing.assert_close(model(ids).logits, direct(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = build_tiny_tokenizer(512)
    text = "Return the number of items in a container."
    assert tokenizer(text)["input_ids"][-8:] == reference(text)["input_ids"][-8:]
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == reference.apply_chat_template(messages, tokenize=False)


def test_conversion_is_reused_and_never_clobbers_other_directories(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = convert_gguf(path, tmp_path / "model")
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert convert_gguf(path, out) == out and weights.stat().st_mtime_ns == before  # reused, not redone

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(GGUFError, match="not a conversion"):
            convert_gguf(path, unrelated, overwrite=overwrite)
    assert (unrelated / "keep.txt").read_text() == "mine"

    other = path.with_name("other.gguf")
    write_tiny_gguf(other, seed=1)
    with pytest.raises(GGUFError, match="--overwrite"):  # an earlier conversion of another file
        convert_gguf(other, out)
    convert_gguf(other, out, overwrite=True)
    assert is_converted(other, out) and not is_converted(path, out)


def test_cli_convert_and_errors(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    assert cli_main(["convert-gguf", str(path), str(tmp_path / "m")]) == 0
    assert is_converted(path, tmp_path / "m")
    assert cli_main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    assert cli_main(["convert-gguf", str(garbage), str(tmp_path / "y")]) == 2
    assert "could not read" in capsys.readouterr().err


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_never_loses_data(tiny_gguf, tmp_path):
    """`--overwrite` reads the input before touching the output, never deletes the input, and replaces only a folder
    holding convert-gguf's own marker (issue 19: it deleted all three)."""
    path, _ = tiny_gguf
    good = convert_gguf(path, tmp_path / "model")
    before = _snapshot(good)

    truncated = tmp_path / "download.gguf"  # an interrupted download of a newer file
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="could not read"):
        convert_gguf(truncated, good, overwrite=True)
    assert _snapshot(good) == before  # the earlier conversion is intact

    inside = good / "newer.gguf"  # the input lies in the folder --overwrite would replace
    inside.write_bytes(path.read_bytes())
    with pytest.raises(GGUFError, match="inside"):
        convert_gguf(inside, good, overwrite=True)
    assert inside.read_bytes() == path.read_bytes()

    run = tmp_path / "trained"  # a training run: config.json, weights and checkpoints, but no convert-gguf marker
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoint-5" / "model.safetensors").write_bytes(b"weights")
    run_before = _snapshot(run)
    assert cli_main(["convert-gguf", str(path), str(run), "--overwrite"]) == 2
    assert _snapshot(run) == run_before


def test_demo_overwrite_replaces_the_model_of_an_earlier_demo_run(tiny_gguf, tmp_path):
    """`demo --overwrite` after `demo --model tiny` reaches the model folder (issue 19: the converter refused it and
    asked for the --overwrite already given); the other way round the tiny model is no longer a silent reuse of the
    converted one. Without --overwrite both are refused, naming the option."""
    from transformers import AutoConfig

    from trl_longpo.data import OutputDirError
    from trl_longpo.demo import DemoConfig, prepare_model

    path, _ = tiny_gguf
    out = str(tmp_path / "demo")
    tiny = prepare_model(DemoConfig(model="tiny", output=out))
    tiny_config = AutoConfig.from_pretrained(tiny)
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare_model(DemoConfig(model=str(path), output=out))
    converted = prepare_model(DemoConfig(model=str(path), output=out, overwrite=True))
    assert is_converted(path, converted) and AutoConfig.from_pretrained(converted).hidden_size == HIDDEN
    assert prepare_model(DemoConfig(model=str(path), output=out)) == converted  # reused
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare_model(DemoConfig(model="tiny", output=out))
    prepare_model(DemoConfig(model="tiny", output=out, overwrite=True))
    assert AutoConfig.from_pretrained(tiny).to_dict() == tiny_config.to_dict()
