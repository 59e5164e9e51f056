"""Attention kernels over the paged KV cache, each beside its pure-jnp reference."""

from .cascade_attention import cascade_decode_attention
from .paged_decode_attention import paged_decode_attention
from .ragged_paged_attention import ragged_paged_attention
from .reference import ragged_paged_attention_reference, write_kv_reference
from .write_kv import write_kv

__all__ = [
    "cascade_decode_attention",
    "paged_decode_attention",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
]
