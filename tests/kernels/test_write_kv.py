"""The KV write scatters new rows into their slots, in place when the pools are donated."""

import jax
import jax.numpy as jnp
import numpy as np

from minisgl_jax.kernels import write_kv_reference


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
