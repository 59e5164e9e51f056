"""Tensor parallelism over 8 forced host devices: same greedy tokens and logprobs as tp=1, 1/N per device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.engine.batch import ScheduledBatch, StepKey, build_step_batch
from minisgl_jax.layers.collectives import CollectiveBackend
from minisgl_jax.engine.sampler import SEARCH_BITS
from minisgl_jax.models.config import ModelConfig
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # engines of its own

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71)), list(range(100, 120))]
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)

CASES = [  # (arch, overrides, tps): KV heads fewer than, equal to and more than tp
    ("qwen3", dict(), (2, 4)),
    ("qwen2", dict(), (2, 4)),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4), (2, 8)),  # tp=8: each KV head on 2 devices
]


def run(path: str, tp: int, all_reduce: str = "auto", params: list[SamplingParams] | None = None):
    engine = Engine(EngineArgs(
        model=path, dtype="float32", attention_backend="reference", cache="naive", num_pages=64, page_size=16,
        max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=False, tp=tp,
        all_reduce=all_reduce,
    ))
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, prompt, request_params in zip(ids, PROMPTS, params or [PARAMS] * len(PROMPTS)):
        engine.add_request(rid, prompt, request_params)
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


def test_sums_placed_per_shard_match_single_device(tmp_path):
    """`--all-reduce psum`: the embedding and row-parallel layers run per shard under shard_map and
    add their partial sums themselves (the structure the GPU's peer kernel plugs into)."""
    path = save_tiny_checkpoint(str(tmp_path / "qwen3"), "qwen3", seed=3)
    _, want_tokens, want_logprobs = run(path, 1)
    for tp in (2, 4):
        engine, tokens, logprobs = run(path, tp, all_reduce="psum")
        assert engine.runner.collectives.mode == "psum"
        assert tokens == want_tokens, f"tp={tp}"
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)
        # Every forward pass advanced the sequence by its count of collectives: the embedding's sum,
        # 2 per layer, and the sampler's one exchange of the vocab shards' maxima.
        seq = int(np.asarray(engine.runner.state.all_reduce_seq.addressable_data(0))[0])
        per_forward = 1 + 2 * engine.model_config.num_layers + 1
        assert seq > 1 and (seq - 1) % per_forward == 0, seq


def test_sampled_tokens_per_shard_match_single_device(tmp_path):
    """Seeded sampling (plain temperature, and top-k / top-p rows) gives tp=1's tokens when the
    vocab shards' argmaxes meet in the step's own exchange (`Collectives.vocab_argmax`)."""
    path = save_tiny_checkpoint(str(tmp_path / "llama"), "llama", seed=4)
    params = [
        SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=12, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=13, max_tokens=10, ignore_eos=True),
    ]
    _, want_tokens, _ = run(path, 1, params=params)
    _, greedy_tokens, _ = run(path, 1)
    assert want_tokens != greedy_tokens  # the seeds do sample
    for tp in (2, 4):
        engine, tokens, _ = run(path, tp, all_reduce="psum", params=params)
        assert tokens == want_tokens, f"tp={tp}"
        # One exchange per step; XLA's own lowering makes four (a maximum and an index per argmax).
        assert len(re.findall(r" all-gather(?:-start)?\(", decode_hlo(engine))) == 1
        # Filtered: the maxima, then the threshold search's passes of counts summed over the shards,
        # then the sampled argmax; never the [rows, vocab] logits gathered whole (as a sort needs).
        filtered = decode_hlo(engine, "filtered")
        assert len(re.findall(r" all-gather(?:-start)?\(", filtered)) == 2
        ways, passes = 1 << SEARCH_BITS, -(-32 // SEARCH_BITS)
        assert len(re.findall(rf"f32\[4,{2 * ways}\]\{{1,0\}} all-reduce(?:-start)?\(", filtered)) == passes
        assert not re.search(rf"f32\[\d+,{engine.model_config.vocab_size}\][^\n]* all-gather", filtered)


def decode_hlo(engine: Engine, sample_mode: str = "plain") -> str:
    """The compiled decode step of the engine's smallest bucket."""
    batch = build_step_batch(
        ScheduledBatch(rows=[], is_decode=True), 4, 4, engine.batch_constants,
    )
    return engine.runner.lower_text(batch, StepKey(is_decode=True, sample_mode=sample_mode))


def test_peer_all_reduce_needs_gpus_of_one_process():
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    with pytest.raises(ValueError, match="all_reduce 'peer' cannot run here: it needs the mesh's GPUs"):
        CollectiveBackend("peer", mesh, jnp.bfloat16, max_decode_rows=8, hidden_size=64)
    assert CollectiveBackend("auto", mesh, jnp.bfloat16, max_decode_rows=8, hidden_size=64).mode == "xla"


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
    with pytest.raises(ValueError, match="all_reduce must be one of"):
        Engine(EngineArgs(model="Qwen/Qwen3-0.6B", load_format="dummy", all_reduce="nccl", compile_cache_dir=None))
    with pytest.raises(ValueError, match="more devices"):
        Engine(EngineArgs(model="Qwen/Qwen3-0.6B", load_format="dummy", tp=16, compile_cache_dir=None))
