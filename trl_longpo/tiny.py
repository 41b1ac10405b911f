"""Tiny, offline model and tokenizer for demos, CPU configs and tests.

Nothing here downloads: the tokenizer is a byte-level BPE trained with the `tokenizers` library on the help texts
that ship with Python (`pydoc_data.topics`), and the model is a randomly initialised Mistral-architecture causal LM
built from a config. `save_tiny_model(path)` writes both as an ordinary local checkpoint, so the same
`from_pretrained(path)` code path that real users take with hub names is exercised.
"""

from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from trl_longpo.data.documents import corpus_texts

# A Mistral-style template: the prompt rendered with `add_generation_prompt=True` is a prefix of prompt + answer,
# which is what DPOTrainer's (and LongPOTrainer's) completion masking relies on.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]


@functools.lru_cache(maxsize=4)
def _train_bpe(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(), trainer=trainer)
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template; `</s>` doubles as the pad token, as for Mistral."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_bpe(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    **config_kwargs,
) -> MistralForCausalLM:
    """A randomly initialised Mistral-architecture causal LM (GQA, RoPE), small enough for CPU tests."""
    import torch

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1 << 20,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    config = MistralConfig(**{**settings, **config_kwargs})
    torch.manual_seed(seed)
    return MistralForCausalLM(config)


def save_tiny_model(path: str | os.PathLike, **model_kwargs) -> str:
    """Write a tiny model and its tokenizer to `path` (a normal local checkpoint) and return the path."""
    tokenizer = build_tiny_tokenizer(model_kwargs.get("vocab_size", 1024))
    model = build_tiny_model(**model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def toy_longpo_rows(num_rows: int = 32, passages_per_document: int = 4, passage_chars: int = 400, seed: int = 0):
    """Small synthetic LongPO rows (conversational) built from the pydoc topics, for CPU demos and configs.

    The long prompt holds several passages and a question about one of them; the short prompt holds only that
    passage. The chosen answer quotes the right passage, the rejected one quotes a wrong passage — the typical
    failure of a short-context model lost in a long input. Real data comes from `trl-longpo generate`.
    """
    import random

    rng = random.Random(seed)
    texts = [t.strip() for t in corpus_texts() if len(t.strip()) >= passage_chars]
    rows = []
    for _ in range(num_rows):
        passages = [t[:passage_chars] for t in rng.sample(texts, passages_per_document)]
        target = rng.randrange(passages_per_document)
        wrong = (target + 1 + rng.randrange(passages_per_document - 1)) % passages_per_document
        question = "Quote the first sentence of the passage that explains this topic: " + passages[target][:40]
        rows.append(
            {
                "prompt": [{"role": "user", "content": "\n\n".join(passages) + "\n\n" + question}],
                "short_prompt": [{"role": "user", "content": passages[target] + "\n\n" + question}],
                "chosen": [{"role": "assistant", "content": passages[target].split("\n")[0][:200]}],
                "rejected": [{"role": "assistant", "content": passages[wrong].split("\n")[0][:200]}],
            }
        )
    return rows
