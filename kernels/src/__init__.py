"""Attention kernels over the paged KV cache, each beside its pure-jnp reference."""

from .cascade_attention import cascade_decode_attention
from .hopper_prefill_attention import hopper_prefill_attention, hopper_prefill_unsupported
from .paged_decode_attention import paged_decode_attention
from .ragged_paged_attention import ragged_paged_attention
from .reference import ragged_paged_attention_reference, write_kv_reference

__all__ = [
    "cascade_decode_attention",
    "hopper_prefill_attention",
    "hopper_prefill_unsupported",
    "paged_decode_attention",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_reference",
]
