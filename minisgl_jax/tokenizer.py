"""Tokenizer loading: the checkpoint's own, or a byte-level fallback so every path runs end to end."""

from __future__ import annotations

import logging
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_SPECIAL_TOKENS = ("<|bos|>", "<|im_end|>", "<|im_start|>")  # ids 256, 257, 258


def byte_level_tokenizer(vocab_size: int = 259) -> PreTrainedTokenizerFast:
    """256 byte tokens (ids 0..255) plus ChatML specials (256..258), with a ChatML chat template.

    Ids from 259 up to vocab_size decode to made-up words (" ab", " ac", ...), so a model with
    dummy weights and no tokenizer files still streams one visible piece of text per token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of_char(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update({token: 256 + i for i, token in enumerate(FALLBACK_SPECIAL_TOKENS)})
    for token_id in range(len(vocab), vocab_size):
        vocab["\u0120" + _word(token_id)] = token_id  # U+0120 is the byte-level alphabet's space
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens(
        {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _word(n: int) -> str:
    """A distinct lowercase word for each n."""
    letters = ""
    while True:
        n, digit = divmod(n, 26)
        letters += chr(ord("a") + digit)
        if n == 0:
            return letters


def _byte_of_char(ch: str) -> int:
    """Inverse of GPT-2's byte-to-unicode map, so byte b gets token id b."""
    code = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def has_tokenizer_files(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def load_tokenizer(
    path: str, chat_template: str | None = None, local_only: bool = False, vocab_size: int = 259
) -> PreTrainedTokenizerBase:
    """The tokenizer at `path` (local folder or hub id), else the byte-level fallback over vocab_size ids.

    local_only looks in the local hub cache without touching the network (dummy weights).
    """
    if os.path.isdir(path) and not has_tokenizer_files(path):
        logger.warning("no tokenizer files in %s: using the byte-level fallback tokenizer", path)
        tokenizer = byte_level_tokenizer(vocab_size)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError) as err:
            logger.warning("could not load a tokenizer for %s (%s): using the byte-level fallback", path, err)
            tokenizer = byte_level_tokenizer(vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
