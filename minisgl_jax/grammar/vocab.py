"""The tokenizer's vocabulary in llguidance's form, built once at start-up and shared by every grammar."""

from __future__ import annotations

import json

import llguidance
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from minisgl_jax.utils import cdiv


class GrammarVocab:
    """llguidance's token trie over the model's vocabulary, and the mask layout the step reads.

    `vocab_size` is the model's (the logits' width), which may exceed the tokenizer's: ids past the
    tokenizer's last token are never allowed. A mask row is `mask_words` int32 words; bit j of word i
    is token 32 * i + j, llguidance's layout.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(f"structured outputs need a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.mask_words = cdiv(vocab_size, 32)
        # llguidance's vocabulary covers every id either side knows of; its mask rows may be wider than ours.
        self.ll_vocab_size = max(vocab_size, len(tokenizer))
        self.ll_mask_words = cdiv(self.ll_vocab_size, 32)
        # Its own EOS is only a placeholder: each matcher allows the EOS ids its request gives.
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.ll_tokenizer = llguidance.LLTokenizer(
            _llguidance_json(tokenizer), n_vocab=self.ll_vocab_size, eos_token=eos
        )
        self.ll_eos_ids = tuple(self.ll_tokenizer.eos_tokens)


def _llguidance_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """The tokenizer's tokenizer.json for llguidance, with its added tokens that are text (special:
    false, such as Qwen's <tool_call> and <think>) moved into the BPE vocabulary.

    llguidance takes every added token for a special one, which no grammar literal matches; yet
    where a literal's text equals one, its mask offers that token, which it then refuses. As text
    tokens they mean what they say (and the model may write <tool_call> in one token, as it was
    trained to). Only byte-level BPE vocabularies are rewritten; others keep llguidance's reading.
    """
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["padding"] = data["truncation"] = None
    if data["model"].get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel":
        chars = _byte_level_chars()
        vocab = data["model"]["vocab"]
        for added in [a for a in data["added_tokens"] if not a["special"]]:
            vocab["".join(chars[b] for b in added["content"].encode())] = added["id"]
        data["added_tokens"] = [a for a in data["added_tokens"] if a["special"]]
    return json.dumps(data)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
