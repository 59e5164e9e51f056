"""Tensor parallelism over 8 forced host devices: same greedy tokens and logprobs as tp=1, 1/N per device."""

import numpy as np
import pytest
from flax import nnx

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.models.config import ModelConfig
from tiny_models import save_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71)), list(range(100, 120))]
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)

CASES = [  # (arch, overrides, tps): KV heads fewer than, equal to and more than tp
    ("qwen3", dict(), (2, 4)),
    ("qwen2", dict(), (2, 4)),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4), (2, 8)),  # tp=8: each KV head on 2 devices
]


def run(path: str, tp: int):
    engine = Engine(EngineArgs(
        model=path, dtype="float32", attention_backend="reference", cache="naive", num_pages=64, page_size=16,
        max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=False, tp=tp,
    ))
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS):
        engine.add_request(rid, prompt, PARAMS)
    tokens = {rid: [] for rid in ids}
    logprobs = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.new_logprobs]
    engine.check_kv_invariant()
    return engine, [tokens[r] for r in ids], np.array([logprobs[r] for r in ids])


@pytest.mark.parametrize("arch,overrides,tps", CASES, ids=[c[0] for c in CASES])
def test_tp_matches_single_device(tmp_path, arch, overrides, tps):
    path = save_tiny_checkpoint(str(tmp_path / arch), arch, seed=2, **overrides)
    _, want_tokens, want_logprobs = run(path, 1)
    for tp in tps:
        engine, tokens, logprobs = run(path, tp)
        assert tokens == want_tokens, f"tp={tp}"
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)
        check_sharded_by_tp(engine, tp)


def check_sharded_by_tp(engine: Engine, tp: int) -> None:
    """Every parameter with a tp axis in its spec holds 1/tp of itself on each device."""
    for path, var in nnx.to_flat_state(engine.runner.param_state()):
        array = var.get_value()
        shards = array.addressable_shards
        assert len(shards) == tp
        expected = array.size // tp if "tp" in var.spec else array.size
        for shard in shards:
            assert shard.data.size == expected, (path, var.spec, shard.data.shape)
    k_pages = engine.runner.kv_pool[0][0]
    assert all(s.data.shape[0] == k_pages.shape[0] // tp for s in k_pages.addressable_shards)


def test_tp_errors_name_the_problem():
    cfg = ModelConfig("qwen3", 320, 64, 128, 2, 4, 2, 32, 1e-6, 1e6, None, 512, True, False, False, True)
    with pytest.raises(ValueError, match="attention heads"):
        cfg.for_tp(3)
    assert cfg.for_tp(4).num_kv_heads == 4 and cfg.for_tp(4).kv_head_replicas == 2
    with pytest.raises(ValueError, match="more devices"):
        Engine(EngineArgs(model="Qwen/Qwen3-0.6B", load_format="dummy", tp=16, compile_cache_dir=None))
