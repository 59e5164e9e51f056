"""Attention backends behind one narrow interface, chosen per phase by `--attention-backend`.

Every backend reads and writes the same paged layout (see kernels/src/reference.py):
one layer's pool is k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim], in the model's
dtype or float8_e4m3fn (an FP8 KV cache). An FP8 pool holds k / k_scale and v / v_scale (`KVScales`,
one pair per layer); attention multiplies q by k_scale and its output by v_scale, so the kernels
only convert the pages they load to q's dtype and never see a scale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
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

FP8_KV_DTYPE = jnp.float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper convert FP8 in hardware; Triton refuses the cast below


@dataclass(frozen=True)
class KVScales:
    """One layer's FP8 KV scales: the pool stores k / scales.k and v / scales.v; a read is stored * scale.

    Static Python floats (the layers are unrolled, so each layer's are constants of the step): they
    scale q and the output outside the kernels, so no kernel compiles once per distinct scale. A
    float pool ignores them."""

    k: float = 1.0
    v: float = 1.0


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


def check_mosaic(dtype, head_dim: int, page_size: int, kv_dtype) -> None:
    """Raise unless this machine and these shapes can run the Hopper prefill kernel."""
    if reason := kernels.hopper_prefill_unsupported(dtype, head_dim, page_size, kv_dtype=kv_dtype):
        raise ValueError(f"attention backend 'mosaic' cannot run this model: {reason}; use 'pallas'")
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability != "9.0":
        raise ValueError(
            f"attention backend 'mosaic' needs an NVIDIA Hopper GPU (sm_90), found {device.device_kind} "
            f"({device.platform}{', sm ' + capability if capability else ''}); use 'pallas'"
        )


def check_fp8_kv(device: jax.Device) -> None:
    """Raise on a GPU that cannot convert FP8 pages (before sm_89); the CPU converts in software."""
    capability = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and capability and tuple(map(int, capability.split("."))) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"kv_cache_dtype 'fp8_e4m3' needs a GPU with FP8 support (sm_89 or later: Ada, Hopper), "
            f"found {device.device_kind} (sm {capability}); use kv_cache_dtype 'auto'"
        )


class AttentionBackend:
    """Writes a step's new K/V into the pool, then attends with the backend chosen for the phase.

    With a mesh of more than one device, both run per shard under `shard_map`: each device holds
    its KV heads' pages and its q heads, so attention needs no communication at all.
    """

    def __init__(
        self, prefill: str, decode: str, sm_scale: float, mesh: Mesh | None = None, *,
        dtype, head_dim: int, page_size: int, kv_dtype=None,
    ) -> None:
        """dtype: the model's; kv_dtype: the pool's (None: dtype); head_dim, page_size: the pool's;
        all checked against what the chosen kernels and this machine support."""
        for name in (prefill, decode):
            if name not in BACKENDS:
                raise ValueError(f"attention backend must be one of {sorted(BACKENDS)}, got {name!r}")
        kv_dtype = jnp.dtype(dtype if kv_dtype is None else kv_dtype)
        if kv_dtype not in (jnp.dtype(dtype), jnp.dtype(FP8_KV_DTYPE)):
            raise ValueError(f"kv_dtype must be the model's dtype ({jnp.dtype(dtype).name}) or float8_e4m3fn, "
                             f"got {kv_dtype.name}")
        if kv_dtype == FP8_KV_DTYPE:
            check_fp8_kv(jax.devices()[0] if mesh is None else mesh.devices.flat[0])
        if "mosaic" in (prefill, decode):
            check_mosaic(dtype, head_dim, page_size, kv_dtype)
        self.prefill_name, self.decode_name = prefill, decode
        self.sm_scale = sm_scale
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None

    def _per_shard(self, fn, in_specs, out_specs):
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def write_kv(self, k_pages, v_pages, k, v, meta: AttentionMetadata, scales: KVScales = KVScales()):
        """k, v: [tokens, kv_heads, head_dim] into their slots (an FP8 pool: divided by `scales`,
        saturated); in place under donation."""
        pool, new = P("tp", None, None, None), P(None, "tp", None)
        write_local = functools.partial(kernels.write_kv_reference, k_scale=scales.k, v_scale=scales.v)
        write = self._per_shard(write_local, (pool, pool, new, new, P()), (pool, pool))
        return write(k_pages, v_pages, k, v, meta.slot_mapping)

    def attend(
        self, q, k_pages, v_pages, meta: AttentionMetadata, *, is_decode: bool, scales: KVScales = KVScales()
    ) -> jax.Array:
        """q: [tokens, q_heads, head_dim] -> [tokens, q_heads, head_dim].

        Over an FP8 pool, q @ (k_fp8 * k_scale) is (q * k_scale) @ k_fp8 and p @ (v_fp8 * v_scale) is
        (p @ v_fp8) * v_scale: the scales apply here, outside the kernels."""
        scaled = k_pages.dtype == FP8_KV_DTYPE
        if scaled and scales.k != 1.0:
            q = (q.astype(jnp.float32) * scales.k).astype(q.dtype)
        out = self._attend(q, k_pages, v_pages, meta, is_decode)
        if scaled and scales.v != 1.0:
            out = (out.astype(jnp.float32) * scales.v).astype(out.dtype)
        return out

    def _attend(self, q, k_pages, v_pages, meta: AttentionMetadata, is_decode: bool) -> jax.Array:
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
