"""A character-level HF fast tokenizer with a chat template, built offline with `tokenizers`."""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIALS = [PAD, UNK, BOS, EOS, USER, ASSISTANT, SYSTEM]
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz :,.?!-\n"

# Zephyr-like: each turn starts with its role marker; an assistant turn ends with EOS. The BOS
# is written by the template (the tokenizer adds no special tokens itself), so text rendered
# by apply_chat_template and then tokenized carries exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the bundled tokenizer, ``save_pretrained`` it to ``out_dir`` and return it.

    One token per character (lowercase letters, digits, a little punctuation), plus the
    special tokens; anything else maps to ``<unk>``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        padding_side="right",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok
