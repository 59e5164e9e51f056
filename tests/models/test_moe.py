"""The mixture-of-experts block: grouped GEMM equals a per-token reference (idle experts included),
routing ties go to the lower expert, tensor- and expert-parallel experts equal one device, configs
read right, the Pallas experts equal ragged_dot's, FP8 experts equal their dequantized weights."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine import setup
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.models.config import ModelConfig, bundled_config_path, read_hf_config
from minisgl_jax.models.loader import SafetensorsCheckpoint, load_model
from minisgl_jax.models.moe import EXPERT_BACKENDS, MoE, experts_forward, moe_reference, route
from minisgl_jax.models.quantization import FP8_DTYPE, FP8_MAX, QuantConfig, dequantize
from minisgl_jax.models.transformer import CausalLM
from minisgl_jax.server.cli import parse_args
from tiny_models import save_tiny_checkpoint

HIDDEN, EXPERTS, INTER = 16, 6, 8
QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=16, intermediate_size=32,
                 moe_intermediate_size=6, num_hidden_layers=6, num_attention_heads=4, num_experts=4,
                 num_experts_per_tok=2)


def weights(seed: int, idle: tuple[int, ...] = (), experts: int = EXPERTS
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positive inputs x [13, hidden] and router, gate_up, down; the `idle` experts' router columns
    are negative, so with positive inputs they never win a token."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(13, HIDDEN))).astype(np.float32)
    router = rng.normal(size=(HIDDEN, experts)).astype(np.float32)
    for e in idle:
        router[:, e] = -np.abs(router[:, e]) - 1.0
    gate_up = (0.3 * rng.normal(size=(experts, HIDDEN, 2, INTER))).astype(np.float32)
    down = (0.3 * rng.normal(size=(experts, INTER, HIDDEN))).astype(np.float32)
    return x, router, gate_up, down


@functools.partial(jax.jit, static_argnums=(4, 5))
def grouped_and_reference(x, router, gate_up, down, top_k: int, normalize: bool):
    """(expert ids, the grouped-GEMM block, the per-token reference) in one program."""
    ids, w = route(x, router, top_k, normalize)
    return ids, experts_forward(x, ids, w, gate_up, down), moe_reference(x, router, gate_up, down, top_k, normalize)


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True)])
def test_grouped_gemm_equals_per_token_reference_with_idle_experts(top_k, normalize):
    x, router, gate_up, down = weights(top_k, idle=(EXPERTS - 1,))
    ids, got, want = grouped_and_reference(x, router, gate_up, down, top_k, normalize)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=EXPERTS)
    assert counts[EXPERTS - 1] == 0 and counts.sum() == 13 * top_k
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # One token, as a batch-1 decode step: most experts get nothing.
    _, one, _ = grouped_and_reference(x[:1], router, gate_up, down, top_k, normalize)
    np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=1e-6)


def test_expert_shards_add_up_whatever_ragged_dot_leaves_past_the_groups(monkeypatch):
    """Each shard of whole experts (its first expert given) computes only its pairs; the others sort
    past the group sizes' sum, rows a lowering may leave undefined (NaN here): they are masked, and
    the shards' sums equal the block. 4 experts in 4 shards: one each, fewer than top-k."""
    ragged_dot = jax.lax.ragged_dot

    def undefined_past_the_groups(lhs, rhs, group_sizes, **kwargs):
        out = ragged_dot(lhs, rhs, group_sizes, **kwargs)
        return jnp.where(jnp.arange(lhs.shape[0])[:, None] < jnp.sum(group_sizes), out, jnp.nan)

    monkeypatch.setattr(jax.lax, "ragged_dot", undefined_past_the_groups)
    x, router, gate_up, down = weights(3, experts=4)
    ids, w = route(x, router, 2, True)
    want = moe_reference(x, router, gate_up, down, 2, True)
    forward = jax.jit(experts_forward)
    for shards in (2, 4):
        n = 4 // shards
        got = sum(forward(x, ids, w, gate_up[s * n:(s + 1) * n], down[s * n:(s + 1) * n], s * n)
                  for s in range(shards))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


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


def sharded_block(mode: str, tp: int, experts: int, per_shard: bool, backend: str,
                  quant: QuantConfig | None = None) -> tuple[MoE, Collectives]:
    """The MoE module of a 2-of-`experts` model as `--moe-parallel mode --tp tp --moe-backend backend`
    builds it (FP8 experts with `quant`), and the step's collectives: XLA's sums, or the per-shard path
    of the GPUs' psum and peer all-reduce."""
    hf = {**QWEN3_MOE, "hidden_size": HIDDEN, "num_experts": experts, "moe_intermediate_size": INTER,
          "norm_topk_prob": True}
    cfg = dataclasses.replace(ModelConfig.from_hf_dict(hf).for_tp(tp, mode), moe_backend=backend, quantization=quant)
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    return MoE(cfg, jnp.float32, 0), Collectives(mesh, per_shard_sum if per_shard else None)


PARALLEL_CASES = [  # (moe_parallel, tp, experts, moe_backend); the Pallas kernel runs interpreted here
    ("tp", 2, 6, "ragged_dot"), ("tp", 4, 6, "ragged_dot"), ("ep", 2, 6, "ragged_dot"), ("ep", 4, 8, "ragged_dot"),
    ("ep", 4, 4, "ragged_dot"), ("tp", 2, 6, "pallas"), ("ep", 4, 4, "pallas"),
]


@pytest.mark.parametrize("mode,tp,experts,backend", PARALLEL_CASES,
                         ids=[f"{m}{t}-{e}experts-{b}" for m, t, e, b in PARALLEL_CASES])
@pytest.mark.parametrize("per_shard", [False, True], ids=["xla", "per-shard"])
def test_parallel_experts_equal_one_device(mode, tp, experts, backend, per_shard):
    """tp: each expert's intermediate dim sharded (every device holds a slice of every expert); ep:
    whole experts per device, each device computing only its experts' pairs (4 experts at tp=4: one
    expert a device, fewer than top-k). The summed partials equal the unsharded block. The last
    device's experts are never routed (under ep a device with no pair), and one token leaves most
    devices without a pair."""
    block, collectives = sharded_block(mode, tp, experts, per_shard, backend)
    idle = range(experts - experts // tp, experts) if mode == "ep" else (0,)
    x, router, gate_up, down = weights(7, idle=tuple(idle), experts=experts)
    ids, want, _ = grouped_and_reference(x, router, gate_up, down, 2, True)
    assert not set(np.asarray(ids).ravel().tolist()) & set(idle)
    for name, value in (("router", router), ("gate_up", gate_up), ("down", down)):
        param = getattr(block, name)
        param.set_value(jax.device_put(value, NamedSharding(collectives.mesh, param.spec)))
    held = experts // tp if mode == "ep" else experts
    assert all(s.data.shape[0] == held for s in block.gate_up.get_value().addressable_shards)
    graphdef, state = nnx.split(block)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, collectives))
    np.testing.assert_allclose(run(state, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(state, x[:1]), want[:1], rtol=1e-5, atol=1e-6)


def test_the_loader_places_whole_experts_per_device_under_ep(tmp_path):
    """Mixtral's 4 experts at tp=4 ep: device d holds expert d's checkpoint tensors whole (w1/w3 as
    gate/up, w2 as down), and dummy weights shard the same way."""
    path = save_tiny_checkpoint(str(tmp_path / "mixtral"), "mixtral", seed=1)
    cfg = ModelConfig.from_hf_dict(read_hf_config(path)).for_tp(4, "ep")
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    checkpoint = SafetensorsCheckpoint(path)
    for model_dir in (path, None):
        block = load_model(cfg, model_dir, jnp.float32, mesh, dummy_seed=0).layers[1].mlp
        gate_up, down = block.gate_up.get_value(), block.down.get_value()
        for d, (gate_up_shard, down_shard) in enumerate(zip(gate_up.addressable_shards, down.addressable_shards)):
            assert gate_up_shard.index[0] == down_shard.index[0] == slice(d, d + 1)
            assert gate_up_shard.data.shape == (1, 64, 2, 64) and down_shard.data.shape == (1, 64, 64)
            if model_dir is None:
                continue
            expert = f"model.layers.1.block_sparse_moe.experts.{d}."
            np.testing.assert_array_equal(gate_up_shard.data[0, :, 0], checkpoint.get(expert + "w1.weight").T)
            np.testing.assert_array_equal(gate_up_shard.data[0, :, 1], checkpoint.get(expert + "w3.weight").T)
            np.testing.assert_array_equal(down_shard.data[0], checkpoint.get(expert + "w2.weight").T)


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


def test_expert_parallelism_needs_the_experts_to_divide_by_tp():
    """Whole experts per device: the expert count must split evenly (the expert's own size need not)."""
    assert ModelConfig.from_hf_dict(QWEN3_MOE).for_tp(4, "ep").moe_parallel == "ep"
    with pytest.raises(ValueError, match=r"--tp 4 must divide the model's 6 experts per layer; use --moe-parallel tp"):
        ModelConfig.from_hf_dict({**QWEN3_MOE, "num_experts": 6}).for_tp(4, "ep")
    with pytest.raises(ValueError, match="moe_parallel must be one of"):
        ModelConfig.from_hf_dict(QWEN3_MOE).for_tp(2, "dp")


def test_the_choice_travels_from_the_command_line():
    assert parse_args(["--model", "m", "--moe-parallel", "ep"])[0].moe_parallel == "ep"
    assert parse_args(["--model", "m"])[0].moe_parallel == EngineArgs(model="m").moe_parallel == "tp"
    with pytest.raises(ValueError, match=r"moe_parallel must be one of \('tp', 'ep'\), got 'dp'"):
        EngineArgs(model="m", moe_parallel="dp").validate()


@functools.partial(jax.jit, static_argnums=(4,))
def both_backends(x, router, gate_up, down, top_k: int):
    ids, w = route(x, router, top_k, True)
    return tuple(EXPERT_BACKENDS[name](x, ids, w, gate_up, down) for name in ("ragged_dot", "pallas"))


@pytest.mark.parametrize("top_k", [1, 2])
def test_pallas_experts_equal_ragged_dot_with_idle_experts(top_k):
    """The Pallas grouped GEMM (interpret mode) computes what ragged_dot does: 13 tokens with an idle
    expert, and one token (a batch-1 decode step, most experts unread)."""
    x, router, gate_up, down = weights(top_k + 10, idle=(2,))
    for rows in (13, 1):
        ragged, pallas = both_backends(x[:rows], router, gate_up, down, top_k)
        np.testing.assert_allclose(pallas, ragged, rtol=1e-5, atol=1e-6)


def test_moe_layer_runs_the_configured_backend():
    cfg = dataclasses.replace(ModelConfig.from_hf_dict({**QWEN3_MOE, "hidden_size": HIDDEN, "num_experts": EXPERTS,
                                                        "moe_intermediate_size": INTER}), moe_backend="pallas")
    x, router, gate_up, down = weights(9)
    layer = MoE(cfg, jnp.float32, 0)
    for name, value in (("router", router), ("gate_up", gate_up), ("down", down)):
        getattr(layer, name).set_value(jnp.asarray(value))
    collectives = Collectives(Mesh(np.array(jax.devices()[:1]), ("tp",)), None)
    want = grouped_and_reference(x, router, gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob)[2]
    np.testing.assert_allclose(layer(jnp.asarray(x), collectives), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"moe_backend must be one of \('ragged_dot', 'pallas'\)"):
        MoE(dataclasses.replace(cfg, moe_backend="auto"), jnp.float32, 0)


def test_moe_backend_flag_auto_means_ragged_dot_off_the_gpu():
    cfg, mesh = ModelConfig.from_hf_dict(QWEN3_MOE), Mesh(np.array(jax.devices()[:1]), ("tp",))
    assert setup.resolve_moe_backend(EngineArgs(model="m"), cfg, mesh).moe_backend == "ragged_dot"
    assert setup.resolve_moe_backend(EngineArgs(model="m", moe_backend="pallas"), cfg, mesh).moe_backend == "pallas"
    with pytest.raises(ValueError, match=r"moe_backend must be one of \('auto', 'ragged_dot', 'pallas'\)"):
        EngineArgs(model="m", moe_backend="cudnn").validate()


def quantized(w: np.ndarray, scale_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """w quantized to FP8 with a scale of `scale_shape` (each axis w's size / a whole ratio): amax / 448
    per group -> (the FP8 weight, its float32 scale)."""
    split = [d for n, s in zip(w.shape, scale_shape) for d in (s, n // s)]
    amax = np.abs(w).reshape(split).max(axis=tuple(range(1, len(split), 2)))
    scale = (amax / FP8_MAX).astype(np.float32)
    full = np.asarray(dequantize(jnp.ones(w.shape, FP8_DTYPE), jnp.asarray(scale), jnp.float32))
    return np.asarray(jnp.asarray(w / full, FP8_DTYPE)), scale


FP8_EXPERT_CASES = [  # (weight scales, moe_parallel, tp, moe_backend)
    ("tensor", "tp", 1, "pallas"), ("channel", "ep", 2, "pallas"), ("block", "tp", 2, "pallas"),
    ("block", "ep", 2, "ragged_dot"),
]


@pytest.mark.parametrize("strategy,mode,tp,backend", FP8_EXPERT_CASES,
                         ids=[f"{s}-{m}{t}-{b}" for s, m, t, b in FP8_EXPERT_CASES])
def test_fp8_experts_equal_their_dequantized_weights(strategy, mode, tp, backend):
    """FP8 experts beside scales per tensor, per channel or per block of 4 inputs (gate/up's 16 inputs in
    4 blocks, down's 8 in 2: one a device under tp=2) equal the block over their dequantized weights,
    sharded either way; the Pallas kernel takes per-tensor scales broadcast over its columns."""
    quant = QuantConfig("compressed-tensors", strategy, (4, 4) if strategy == "block" else None, "dynamic")
    block, collectives = sharded_block(mode, tp, EXPERTS, False, backend, quant)
    x, router, gate_up, down = weights(8, idle=(1,))
    block.router.set_value(jax.device_put(router, NamedSharding(collectives.mesh, block.router.spec)))
    dequantized = []
    for name, value in (("gate_up", gate_up), ("down", down)):
        w, scale = quantized(value, getattr(block, f"{name}_scale").shape)
        for param, v in ((getattr(block, name), w), (getattr(block, f"{name}_scale"), scale)):
            param.set_value(jax.device_put(v, NamedSharding(collectives.mesh, param.spec)))
        dequantized.append(dequantize(jnp.asarray(w), jnp.asarray(scale), jnp.float32))
    assert block.gate_up.get_value().dtype == FP8_DTYPE and block.router.get_value().dtype == jnp.float32
    want = moe_reference(jnp.asarray(x), jnp.asarray(router), *dequantized, 2, True)
    graphdef, state = nnx.split(block)
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, collectives))
    np.testing.assert_allclose(run(state, x), want, rtol=1e-5, atol=1e-6)
