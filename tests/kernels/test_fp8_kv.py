"""An FP8 KV pool: the write quantizes within e4m3's precision and saturates, and every Triton-lowered
kernel (interpret mode) reads FP8 pages as the jnp reference does, with the per-layer scales applied; so
does the Mosaic GPU prefill kernel on an H100/H200 (`test_hopper_prefill_attention.py` has its own checks)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_inputs import make_batch, poison_unused_slots, rel_err
from test_cascade_attention import make_cascade_batch
from test_hopper_prefill_attention import needs_hopper, on_hopper

from minisgl_jax.kernels import (
    hopper_prefill_unsupported,
    paged_decode_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_reference,
)
from minisgl_jax.kernels.reference import FP8_MAX, quantize_kv
from minisgl_jax.layers.attention import AttentionBackend, AttentionMetadata, KVScales, check_fp8_kv

FP8 = jnp.float8_e4m3fn
SCALES = KVScales(k=0.05, v=2.0)  # K stored 20x larger, V 2x smaller: both far from 1.0
F32_TOL = 1e-5
BF16_TOL = 2e-2
E4M3_STEP = 2.0**-3  # e4m3's spacing relative to a normal value (3 mantissa bits), twice its rounding error
E4M3_TINY = 2.0**-9  # its smallest subnormal: the absolute error floor near 0


def fp8_pools(k_pages, v_pages, scales: KVScales = SCALES):
    """The float pools as the engine's FP8 write leaves them (K scaled up 3x, so scores are not flat)."""
    return quantize_kv(3.0 * k_pages, scales.k, FP8), quantize_kv(v_pages, scales.v, FP8)


def dequantized(pages, scale: float):
    return pages.astype(jnp.float32) * scale


def backend_attend(q, k8, v8, meta: AttentionMetadata, *, is_decode: bool, name: str = "pallas"):
    backend = AttentionBackend(name, name, 0.3, dtype=q.dtype, head_dim=q.shape[-1], page_size=k8.shape[2],
                               kv_dtype=FP8)
    return backend.attend(q, k8, v8, meta, is_decode=is_decode, scales=SCALES)


def reference_of(q, k8, v8, lens, table, cu):
    """The reference over the dequantized pools: what the kernels with the scales must give."""
    k, v = dequantized(k8, SCALES.k), dequantized(v8, SCALES.v)
    return ragged_paged_attention_reference(q, k, v, lens, table, cu, sm_scale=0.3)


def test_write_kv_into_fp8_round_trips_within_e4m3_precision_and_saturates():
    kv_heads, num_pages, page_size, head_dim = 2, 4, 8, 16
    rng = np.random.default_rng(0)
    k = rng.standard_normal((20, kv_heads, head_dim)).astype(np.float32) * 4
    v = rng.standard_normal((20, kv_heads, head_dim)).astype(np.float32)
    k[0, 0, :2] = [1e6, -1e6]  # past the range: saturated to +-448 * k_scale, never NaN
    v[1, 1, :2] = [3.0 * FP8_MAX * SCALES.v, -5.0 * FP8_MAX * SCALES.v]
    slots = jnp.asarray(rng.permutation(np.arange(8, 32))[:20], jnp.int32)
    pool = jnp.zeros((kv_heads, num_pages, page_size, head_dim), FP8)
    k8, v8 = write_kv_reference(pool, pool, jnp.asarray(k), jnp.asarray(v), slots, SCALES.k, SCALES.v)
    assert k8.dtype == FP8 and v8.dtype == FP8
    for pages, x, scale in ((k8, k, SCALES.k), (v8, v, SCALES.v)):
        back = np.asarray(dequantized(pages, scale)).reshape(kv_heads, -1, head_dim)[:, np.asarray(slots)]
        back = back.transpose(1, 0, 2)
        assert np.isfinite(back).all()
        want = np.clip(x, -FP8_MAX * scale, FP8_MAX * scale)
        assert (np.abs(back - want) <= E4M3_STEP / 2 * np.abs(want) + E4M3_TINY * scale).all()
    saturated = np.asarray(dequantized(k8, SCALES.k)).reshape(2, -1, 16)[0, int(slots[0]), :2]
    np.testing.assert_allclose(saturated, [FP8_MAX * SCALES.k, -FP8_MAX * SCALES.k], rtol=1e-6)
    # a float pool ignores the scales: it holds the values themselves
    f32 = jnp.zeros((kv_heads, num_pages, page_size, head_dim), jnp.float32)
    k32, _ = write_kv_reference(f32, f32, jnp.asarray(k), jnp.asarray(v), slots, SCALES.k, SCALES.v)
    np.testing.assert_array_equal(np.asarray(k32).reshape(2, -1, 16)[:, np.asarray(slots)].transpose(1, 0, 2), k)


def test_donated_fp8_pools_alias_their_outputs_in_the_compiled_program():
    # quantizing before the scatter must not cost a copy of the pool
    pages = jax.ShapeDtypeStruct((2, 64, 16, 8), FP8)
    rows = jax.ShapeDtypeStruct((5, 2, 8), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((5,), jnp.int32)
    write = jax.jit(write_kv_reference, donate_argnums=(0, 1), static_argnums=(5, 6))
    hlo = write.lower(pages, pages, rows, rows, slots, SCALES.k, SCALES.v).compile().as_text()
    assert hlo.count("may-alias") + hlo.count("must-alias") >= 2


def test_fp8_attention_with_scales_is_close_to_the_unquantized_attention():
    # against the pools never quantized: e4m3 costs a few percent, the scales nothing more (the kernels
    # equal the reference backend below)
    q, k, v, lens, table, cu = make_batch(1, [1, 9, 1], [40, 30, 17], page_size=16)
    k8, v8 = fp8_pools(k, v)
    meta = AttentionMetadata(cu_q_lens=cu, kv_lens=lens, page_table=table, slot_mapping=jnp.zeros(11, jnp.int32))
    out = backend_attend(q, k8, v8, meta, is_decode=False, name="reference")
    exact = ragged_paged_attention_reference(q, 3.0 * k, v, lens, table, cu, sm_scale=0.3)
    assert rel_err(out, exact) < 0.08


def test_bf16_decode_bucket_reads_fp8_pages_with_scales():
    # the engine's case: bf16 queries, FP8 pages converted to bf16 in registers
    q, k, v, lens, table, cu = make_batch(2, [1] * 5, [1, 16, 17, 47, 70], page_size=16, q_heads=8, kv_heads=2,
                                          pad_rows=1, pad_seqs=1)
    q = q.astype(jnp.bfloat16)
    k8, v8 = fp8_pools(k, v)
    meta = AttentionMetadata(cu_q_lens=cu, kv_lens=lens, page_table=table, slot_mapping=jnp.zeros(6, jnp.int32))
    out = backend_attend(q, poison_unused_slots(k8, lens, table), poison_unused_slots(v8, lens, table), meta,
                         is_decode=True)
    ref = reference_of(q.astype(jnp.float32), k8, v8, lens, table, cu)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out[:5], ref[:5]) < BF16_TOL
    np.testing.assert_array_equal(np.asarray(out[5:], np.float32), 0.0)


def test_split_k_decode_reads_fp8_pages():
    args = make_batch(3, [1] * 3, [5, 33, 129], page_size=16, q_heads=4, kv_heads=1)
    q, k, v, lens, table, cu = args
    k8, v8 = fp8_pools(k, v, KVScales())
    out = paged_decode_attention(q, k8, v8, lens, table, cu, sm_scale=0.2, num_splits=3, block_k=16, interpret=True)
    ref = ragged_paged_attention_reference(q, k8.astype(jnp.float32), v8.astype(jnp.float32), lens, table, cu,
                                           sm_scale=0.2)
    assert rel_err(out, ref) < F32_TOL


def test_mixed_prefill_and_decode_read_fp8_pages():
    # chunks over cached prefixes, ragged q_len incl. 1 and 2, shuffled pages, NaN in unused slots
    q_lens, kv_lens = [1, 2, 9], [33, 18, 41]
    q, k, v, lens, table, cu = make_batch(4, q_lens, kv_lens, page_size=16, q_heads=4, kv_heads=2,
                                          pad_rows=3, pad_seqs=1)
    k8, v8 = fp8_pools(k, v)
    meta = AttentionMetadata(cu_q_lens=cu, kv_lens=lens, page_table=table, slot_mapping=jnp.zeros(15, jnp.int32))
    out = backend_attend(q, poison_unused_slots(k8, lens, table), poison_unused_slots(v8, lens, table), meta,
                         is_decode=False)
    ref = reference_of(q, k8, v8, lens, table, cu)
    assert rel_err(out[:12], ref[:12]) < F32_TOL
    np.testing.assert_array_equal(np.asarray(out[12:], np.float32), 0.0)


def test_cascade_decode_reads_fp8_pages_with_scales():
    groups = [(2, [33, 40]), (1, [16, 20])]
    args, prefix_lens, rows = make_cascade_batch(5, groups, [21], page_size=16)
    q, _, _, lens, table, cu, k, v = args
    k8, v8 = fp8_pools(k, v)
    meta = AttentionMetadata(cu_q_lens=cu, kv_lens=lens, page_table=table, slot_mapping=jnp.zeros(6, jnp.int32),
                             prefix_lens=prefix_lens, cascade_groups=rows)
    out = backend_attend(q, poison_unused_slots(k8, lens, table), poison_unused_slots(v8, lens, table), meta,
                         is_decode=True)
    ref = reference_of(q, k8, v8, lens, table, cu)
    assert rel_err(out[:5], ref[:5]) < F32_TOL


def test_pools_of_another_dtype_are_refused_by_name():
    q, k, v, lens, table, cu = make_batch(6, [2], [5], page_size=16)
    with pytest.raises(ValueError, match="k_pages and v_pages must both be"):
        ragged_paged_attention(q, k.astype(jnp.float16), v.astype(jnp.float16), lens, table, cu, sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_dtype"):
        AttentionBackend("pallas", "pallas", 1.0, dtype=jnp.float32, head_dim=64, page_size=16, kv_dtype=jnp.float16)


def test_gpus_without_fp8_conversion_are_refused_with_the_reason():
    def gpu(capability: str):
        return SimpleNamespace(platform="gpu", compute_capability=capability, device_kind=f"GPU sm {capability}")

    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp8_e4m3' needs a GPU with FP8 support.*sm 8\.0"):
        check_fp8_kv(gpu("8.0"))
    for capability in ("8.9", "9.0", "10.0"):
        check_fp8_kv(gpu(capability))
    check_fp8_kv(jax.devices()[0])  # the CPU converts in software


@pytest.mark.skipif(on_hopper(), reason="the GPU test below runs it")
def test_mosaic_prefill_takes_fp8_pages_and_is_refused_only_for_the_machine():
    assert hopper_prefill_unsupported(jnp.bfloat16, 128, 16, kv_dtype=FP8) is None
    with pytest.raises(ValueError, match="attention backend 'mosaic' needs an NVIDIA Hopper GPU"):
        AttentionBackend("mosaic", "pallas", 0.1, dtype=jnp.bfloat16, head_dim=128, page_size=16, kv_dtype=FP8)


@needs_hopper
def test_mosaic_prefill_reads_fp8_pages_with_scales():
    # the engine's case on Hopper: bf16 queries, FP8 pages converted in the kernel, scales outside it
    q, k, v, lens, table, cu = make_batch(7, [1, 2, 130, 64], [40, 18, 300, 200], page_size=16, q_heads=8,
                                          kv_heads=2, head_dim=128, pad_rows=3, pad_seqs=1)
    q = q.astype(jnp.bfloat16)
    k8, v8 = fp8_pools(k, v)
    meta = AttentionMetadata(cu_q_lens=cu, kv_lens=lens, page_table=table, slot_mapping=jnp.zeros(200, jnp.int32))
    out = backend_attend(q, k8, v8, meta, is_decode=False, name="mosaic")
    ref = reference_of(q.astype(jnp.float32), k8, v8, lens, table, cu)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out[:197], ref[:197]) < BF16_TOL
    np.testing.assert_array_equal(np.asarray(out[197:], np.float32), 0.0)
