"""The engine gives the same greedy tokens with the Pallas kernels (interpret mode here) as with the reference."""

import jax.numpy as jnp
import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # engines of its own


@pytest.mark.parametrize("backends", ["pallas", "reference,pallas"])
def test_pallas_backend_matches_reference(tmp_path_factory, backends):
    path = save_tiny_checkpoint(
        str(tmp_path_factory.mktemp("m") / "llama"), "llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2
    )
    prompts = [[1, 2, 3, 4, 5], list(range(10, 60)), list(range(70, 90))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = []
    for backend in ("reference", backends):
        engine = Engine(EngineArgs(
            model=path, dtype="float32", attention_backend=backend, cache="naive", num_pages=64,
            max_running_requests=4, max_prefill_tokens=32, compile_cache_dir=None, warmup=False,
        ))
        outputs.append(engine.generate(prompts, params))
        engine.check_kv_invariant()
    assert outputs[0] == outputs[1]


def test_mosaic_backend_needs_a_hopper_gpu():
    from minisgl_jax.layers.attention import AttentionBackend

    with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
        AttentionBackend("mosaic", "pallas", 0.1, dtype=jnp.bfloat16, head_dim=128, page_size=16)
