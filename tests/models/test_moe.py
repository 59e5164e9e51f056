"""The mixture-of-experts block: grouped GEMM equals a per-token reference (idle experts included),
routing ties go to the lower expert, tensor-parallel experts equal one device, configs read right,
the Pallas experts equal ragged_dot's."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine import setup
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.models.config import ModelConfig, bundled_config_path, read_hf_config
from minisgl_jax.models.moe import EXPERT_BACKENDS, MoE, experts_forward, moe_reference, route
from minisgl_jax.models.transformer import CausalLM

HIDDEN, EXPERTS, INTER = 16, 6, 8


def weights(seed: int, idle: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positive inputs x [13, hidden] and router, gate_up, down; expert `idle`'s router column is
    negative, so with positive inputs it never wins a token."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(13, HIDDEN))).astype(np.float32)
    router = rng.normal(size=(HIDDEN, EXPERTS)).astype(np.float32)
    if idle is not None:
        router[:, idle] = -np.abs(router[:, idle]) - 1.0
    gate_up = (0.3 * rng.normal(size=(EXPERTS, HIDDEN, 2, INTER))).astype(np.float32)
    down = (0.3 * rng.normal(size=(EXPERTS, INTER, HIDDEN))).astype(np.float32)
    return x, router, gate_up, down


@functools.partial(jax.jit, static_argnums=(4, 5))
def grouped_and_reference(x, router, gate_up, down, top_k: int, normalize: bool):
    """(expert ids, the grouped-GEMM block, the per-token reference) in one program."""
    ids, w = route(x, router, top_k, normalize)
    return ids, experts_forward(x, ids, w, gate_up, down), moe_reference(x, router, gate_up, down, top_k, normalize)


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True)])
def test_grouped_gemm_equals_per_token_reference_with_idle_experts(top_k, normalize):
    x, router, gate_up, down = weights(top_k, idle=EXPERTS - 1)
    ids, got, want = grouped_and_reference(x, router, gate_up, down, top_k, normalize)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=EXPERTS)
    assert counts[EXPERTS - 1] == 0 and counts.sum() == 13 * top_k
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # One token, as a batch-1 decode step: most experts get nothing.
    _, one, _ = grouped_and_reference(x[:1], router, gate_up, down, top_k, normalize)
    np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=1e-6)


def test_routing_ties_go_to_the_lower_expert():
    """Experts 1, 3 and 4 score the same for every token and above the others: top-1 takes 1, top-2
    takes 1 and 3, whatever the token (torch's tie order is unspecified; ours is jax.lax.top_k's)."""
    x, router, _, _ = weights(5)
    router[:] = -np.abs(router) * 0.1
    router[:, [1, 3, 4]] = np.abs(router[:, :1]) + 0.5
    for top_k, want in ((1, [1]), (2, [1, 3]), (3, [1, 3, 4])):
        ids, w = jax.jit(route, static_argnums=(2, 3))(x, router, top_k, True)
        assert np.asarray(ids).tolist() == [want] * len(x)
        np.testing.assert_allclose(w, 1.0 / top_k, rtol=1e-6)


def per_shard_sum(partial: jax.Array, index: int) -> jax.Array:
    return jax.lax.psum(partial, "tp")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("per_shard", [False, True], ids=["xla", "per-shard"])
def test_tensor_parallel_experts_equal_one_device(tp, per_shard):
    """Each expert's intermediate dim sharded over tp (every device holds a slice of every expert):
    the summed partials equal the unsharded block, under XLA's sums and under the per-shard path."""
    x, router, gate_up, down = weights(7, idle=0)
    ids, want, _ = grouped_and_reference(x, router, gate_up, down, 2, True)
    w = jax.jit(route, static_argnums=(2, 3))(x, router, 2, True)[1]
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    specs = (P(), P(), P(), P(None, None, None, "tp"), P(None, "tp", None))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, ids, w, gate_up, down), specs)]
    collectives = Collectives(mesh, per_shard_sum if per_shard else None)
    got = jax.jit(lambda *a: collectives.sum_local(experts_forward, a, specs))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def bundled(name: str) -> ModelConfig:
    path = bundled_config_path(f"org/{name}")
    return ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))


@pytest.mark.parametrize("name,total,active", [
    ("Qwen3-30B-A3B", 30.5e9, 3.3e9), ("Qwen3-235B-A22B", 235e9, 22e9), ("Mixtral-8x7B-v0.1", 46.7e9, 12.9e9),
])
def test_bundled_moe_configs_have_the_model_cards_parameter_counts(name, total, active):
    cfg = bundled(name)
    flat = nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, jnp.bfloat16))))
    sizes = {path: int(np.prod(v.get_value().shape)) for path, v in flat}
    experts = sum(n for path, n in sizes.items() if path[-2:] in (("mlp", "gate_up"), ("mlp", "down"))
                  and path[1] in cfg.moe_layers)
    count = sum(sizes.values())
    assert abs(count - total) / total < 0.01
    assert abs(count - experts + experts * cfg.num_experts_per_tok / cfg.num_experts - active) / active < 0.03


QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=16, intermediate_size=32,
                 moe_intermediate_size=6, num_hidden_layers=6, num_attention_heads=4, num_experts=4,
                 num_experts_per_tok=2)


def test_sparse_layers_follow_mlp_only_layers_and_the_sparse_step():
    assert ModelConfig.from_hf_dict(QWEN3_MOE).moe_layers == (0, 1, 2, 3, 4, 5)
    assert ModelConfig.from_hf_dict({**QWEN3_MOE, "decoder_sparse_step": 2}).moe_layers == (1, 3, 5)
    mixed = {**QWEN3_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert ModelConfig.from_hf_dict(mixed).moe_layers == (1, 5)
    assert ModelConfig.from_hf_dict({**QWEN3_MOE, "num_experts": 0}).moe_layers == ()
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf_dict({**QWEN3_MOE, "num_experts_per_tok": 5})
    with pytest.raises(ValueError, match="expert intermediate size"):
        ModelConfig.from_hf_dict(QWEN3_MOE).for_tp(4)


@functools.partial(jax.jit, static_argnums=(4,))
def both_backends(x, router, gate_up, down, top_k: int):
    ids, w = route(x, router, top_k, True)
    return tuple(EXPERT_BACKENDS[name](x, ids, w, gate_up, down) for name in ("ragged_dot", "pallas"))


@pytest.mark.parametrize("top_k", [1, 2])
def test_pallas_experts_equal_ragged_dot_with_idle_experts(top_k):
    """The Pallas grouped GEMM (interpret mode) computes what ragged_dot does: 13 tokens with an idle
    expert, and one token (a batch-1 decode step, most experts unread)."""
    x, router, gate_up, down = weights(top_k + 10, idle=2)
    for rows in (13, 1):
        ragged, pallas = both_backends(x[:rows], router, gate_up, down, top_k)
        np.testing.assert_allclose(pallas, ragged, rtol=1e-5, atol=1e-6)


def test_pallas_experts_sharded_over_tp_equal_one_device():
    """Each device's kernel on its slice of every expert, the partials summed per shard."""
    x, router, gate_up, down = weights(7, idle=0)
    ids, want, _ = grouped_and_reference(x, router, gate_up, down, 2, True)
    w = jax.jit(route, static_argnums=(2, 3))(x, router, 2, True)[1]
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    specs = (P(), P(), P(), P(None, None, None, "tp"), P(None, "tp", None))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, ids, w, gate_up, down), specs)]
    collectives = Collectives(mesh, per_shard_sum)
    got = jax.jit(lambda *a: collectives.sum_local(EXPERT_BACKENDS["pallas"], a, specs))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_moe_layer_runs_the_configured_backend():
    cfg = dataclasses.replace(ModelConfig.from_hf_dict({**QWEN3_MOE, "hidden_size": HIDDEN, "num_experts": EXPERTS,
                                                        "moe_intermediate_size": INTER}), moe_backend="pallas")
    x, router, gate_up, down = weights(9)
    layer = MoE(cfg, jnp.float32)
    for name, value in (("router", router), ("gate_up", gate_up), ("down", down)):
        getattr(layer, name).set_value(jnp.asarray(value))
    collectives = Collectives(Mesh(np.array(jax.devices()[:1]), ("tp",)), None)
    want = grouped_and_reference(x, router, gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob)[2]
    np.testing.assert_allclose(layer(jnp.asarray(x), collectives), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"moe_backend must be one of \('ragged_dot', 'pallas'\)"):
        MoE(dataclasses.replace(cfg, moe_backend="auto"), jnp.float32)


def test_moe_backend_flag_auto_means_ragged_dot_off_the_gpu():
    cfg, mesh = ModelConfig.from_hf_dict(QWEN3_MOE), Mesh(np.array(jax.devices()[:1]), ("tp",))
    assert setup.resolve_moe_backend(EngineArgs(model="m"), cfg, mesh).moe_backend == "ragged_dot"
    assert setup.resolve_moe_backend(EngineArgs(model="m", moe_backend="pallas"), cfg, mesh).moe_backend == "pallas"
    with pytest.raises(ValueError, match=r"moe_backend must be one of \('auto', 'ragged_dot', 'pallas'\)"):
        EngineArgs(model="m", moe_backend="cudnn").validate()
