"""OpenAI-compatible HTTP server, tokenizer/detokenizer workers and process launch."""
