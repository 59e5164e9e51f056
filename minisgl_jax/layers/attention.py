"""Attention backends behind one narrow interface, chosen per phase by `--attention-backend`.

Every backend reads and writes the same paged layout (see kernels/src/reference.py):
one layer's pool is k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from minisgl_jax import kernels


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    """Per-step arrays every layer's attention needs; padded to the step's bucket.

    cu_q_lens: [seqs + 1] int32, kv_lens: [seqs] int32, page_table: [seqs, pages_per_seq] int32,
    slot_mapping: [tokens] int32 (padding tokens write into the scratch page 0).
    prefix_lens: [seqs] int32 and cascade_groups: [groups, 3] int32, only in a decode step that
    runs cascade attention (engine/cascade.py); other backends ignore them (same result).
    """

    cu_q_lens: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    slot_mapping: jax.Array
    prefix_lens: jax.Array | None = None
    cascade_groups: jax.Array | None = None


AttendFn = Callable[..., jax.Array]


def _reference(q, k_pages, v_pages, meta: AttentionMetadata, *, sm_scale: float, max_q_len: int | None):
    return kernels.ragged_paged_attention_reference(
        q, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, sm_scale=sm_scale
    )


def _pallas(q, k_pages, v_pages, meta: AttentionMetadata, *, sm_scale: float, max_q_len: int | None):
    if meta.cascade_groups is not None:
        return kernels.cascade_decode_attention(
            q, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, meta.prefix_lens, meta.cascade_groups,
            sm_scale=sm_scale,
        )
    return kernels.ragged_paged_attention(
        q, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, sm_scale=sm_scale, max_q_len=max_q_len
    )


def _mosaic(q, k_pages, v_pages, meta: AttentionMetadata, *, sm_scale: float, max_q_len: int | None):
    """The Hopper prefill kernel (Pallas Mosaic GPU); decode buckets keep the Pallas decode kernels."""
    if max_q_len == 1 or meta.cascade_groups is not None:
        return _pallas(q, k_pages, v_pages, meta, sm_scale=sm_scale, max_q_len=max_q_len)
    return kernels.hopper_prefill_attention(
        q, k_pages, v_pages, meta.kv_lens, meta.page_table, meta.cu_q_lens, sm_scale=sm_scale
    )


BACKENDS: dict[str, AttendFn] = {"reference": _reference, "pallas": _pallas, "mosaic": _mosaic}


def check_mosaic(dtype, head_dim: int, page_size: int) -> None:
    """Raise unless this machine and these shapes can run the Hopper prefill kernel."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability != "9.0":
        raise ValueError(
            f"attention backend 'mosaic' needs an NVIDIA Hopper GPU (sm_90), found {device.device_kind} "
            f"({device.platform}{', sm ' + capability if capability else ''}); use 'pallas'"
        )
    if reason := kernels.hopper_prefill_unsupported(dtype, head_dim, page_size):
        raise ValueError(f"attention backend 'mosaic' cannot run this model: {reason}; use 'pallas'")


class AttentionBackend:
    """Writes a step's new K/V into the pool, then attends with the backend chosen for the phase.

    With a mesh of more than one device, both run per shard under `shard_map`: each device holds
    its KV heads' pages and its q heads, so attention needs no communication at all.
    """

    def __init__(
        self, prefill: str, decode: str, sm_scale: float, mesh: Mesh | None = None, *,
        dtype, head_dim: int, page_size: int,
    ) -> None:
        """dtype, head_dim, page_size: the pool's, checked against what the chosen kernels support."""
        for name in (prefill, decode):
            if name not in BACKENDS:
                raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {name!r}")
        if "mosaic" in (prefill, decode):
            check_mosaic(dtype, head_dim, page_size)
        self.prefill_name, self.decode_name = prefill, decode
        self.sm_scale = sm_scale
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def _per_shard(self, fn, in_specs, out_specs):
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def write_kv(self, k_pages, v_pages, k, v, meta: AttentionMetadata):
        """k, v: [tokens, kv_heads, head_dim] into their slots; in place under donation."""
        pool, new = P("tp", None, None, None), P(None, "tp", None)
        write = self._per_shard(kernels.write_kv_reference, (pool, pool, new, new, P()), (pool, pool))
        return write(k_pages, v_pages, k, v, meta.slot_mapping)

    def attend(self, q, k_pages, v_pages, meta: AttentionMetadata, *, is_decode: bool) -> jax.Array:
        """q: [tokens, q_heads, head_dim] -> [tokens, q_heads, head_dim]."""
        backend = BACKENDS[self.decode_name if is_decode else self.prefill_name]

        def attend_local(q, k_pages, v_pages, meta):
            return backend(q, k_pages, v_pages, meta, sm_scale=self.sm_scale, max_q_len=1 if is_decode else None)

        heads, pool = P(None, "tp", None), P("tp", None, None, None)
        cascade_spec = None if meta.cascade_groups is None else P()
        meta_spec = AttentionMetadata(
            cu_q_lens=P(), kv_lens=P(), page_table=P(), slot_mapping=P(),
            prefix_lens=cascade_spec, cascade_groups=cascade_spec,
        )
        return self._per_shard(attend_local, (heads, pool, pool, meta_spec), heads)(q, k_pages, v_pages, meta)
