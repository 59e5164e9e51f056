"""Paged KV cache: device pool, host page allocator, prefix cache."""
