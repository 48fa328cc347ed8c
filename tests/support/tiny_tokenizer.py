"""A tiny character-level tokenizer with a chat template, built offline and saved into a checkpoint folder."""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_tokenizer(folder: str | Path, vocab_size: int = 128) -> list[int]:
    """One token per character (letters, digits, space, punctuation) plus chat specials; returns the EOS id list.

    A BPE model with no merges splits text into characters; the Fuse decoder
    joins them back, so decode(encode(text)) == text.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + " .,!?:;'-\n")
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer needs {len(vocab)} ids, the model has {vocab_size}")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return [vocab["<|end|>"]]
