"""The tokenizer's vocabulary in llguidance's form, built once at start-up and shared by every grammar."""

from __future__ import annotations

import llguidance
import llguidance.hf
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
        self.ll_tokenizer: llguidance.LLTokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=self.ll_vocab_size, eos_token=eos
        )
        self.ll_eos_ids = tuple(self.ll_tokenizer.eos_tokens)
