"""Tiny Hugging Face tokenizers trained in the test itself (byte-level BPE on a few lines), no downloads."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

CORPUS = [
    'The weather in Paris is sunny. {"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"type": "object", "properties": {"a": 1, "b": [true, false, null]}, "required": ["a"]}',
    "Let me think about it step by step. The answer is 42, or maybe 3.14159.",
    "[TOOL_CALLS] [{\"name\": \"search\", \"arguments\": {\"query\": \"llamas\"}}]",
    '{"name": "add", "parameters": {"x": 1, "y": 2}} hello world, hello there',
]
SPECIAL_TOKENS = ["<|bos|>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "[TOOL_CALLS]"]
# Added tokens that are text, not special: they survive skip_special_tokens, as in Qwen's tokenizer.
TEXT_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]


def tiny_bpe_tokenizer(vocab_size: int = 400, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about `vocab_size` tokens: specials first (ids 0..4), then the
    256 bytes, merges learnt from CORPUS, and TEXT_TOKENS added last. EOS is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TEXT_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|eot_id|>", "[TOOL_CALLS]"]})
    tokenizer.add_tokens(TEXT_TOKENS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
