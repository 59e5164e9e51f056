"""The KV write scatters new rows into their slots, in place when the pools are donated."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minisgl_jax.kernels import write_kv, write_kv_reference


def test_write_kv_puts_each_token_in_its_slot():
    kv_heads, num_pages, page_size, head_dim = 2, 5, 4, 8
    k_pages = jnp.zeros((kv_heads, num_pages, page_size, head_dim))
    v_pages = jnp.ones((kv_heads, num_pages, page_size, head_dim))
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((3, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, kv_heads, head_dim)), jnp.float32)
    slots = jnp.array([17, 4, 9], jnp.int32)
    k_out, v_out = write_kv_reference(k_pages, v_pages, k, v, slots)
    for t, slot in enumerate([17, 4, 9]):
        np.testing.assert_array_equal(k_out[:, slot // page_size, slot % page_size], k[t])
        np.testing.assert_array_equal(v_out[:, slot // page_size, slot % page_size], v[t])
    assert float(jnp.sum(k_out != 0)) == k.size


def test_donated_pools_alias_their_outputs_in_the_compiled_program():
    pages = jax.ShapeDtypeStruct((2, 64, 16, 8), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((5, 2, 8), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((5,), jnp.int32)
    compiled = jax.jit(write_kv_reference, donate_argnums=(0, 1)).lower(pages, pages, rows, rows, slots).compile()
    hlo = compiled.as_text()
    assert "input_output_alias" in hlo
    assert hlo.count("may-alias") + hlo.count("must-alias") >= 2


def test_pallas_write_kv_matches_reference_and_aliases_donated_pools():
    kv_heads, num_pages, page_size, head_dim = 2, 6, 16, 64
    rng = np.random.default_rng(1)
    k_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((5, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, kv_heads, head_dim)), jnp.float32)
    slots = jnp.asarray(rng.permutation(np.arange(page_size, num_pages * page_size))[:5].astype(np.int32))
    want = write_kv_reference(k_pages, v_pages, k, v, slots)
    got = write_kv(k_pages, v_pages, k, v, slots, interpret=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    donated = jax.jit(functools.partial(write_kv, interpret=True), donate_argnums=(0, 1))
    assert "input_output_alias" in donated.lower(k_pages, v_pages, k, v, slots).compile().as_text()
