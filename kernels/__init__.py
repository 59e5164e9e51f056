"""Attention kernels over the paged KV cache, each beside its pure-jnp reference."""

from .reference import ragged_paged_attention_reference, write_kv_reference

__all__ = ["ragged_paged_attention_reference", "write_kv_reference"]
