"""FP8 weights: tiny checkpoints quantized here into both formats run as their dequantized weights do,
dense and mixture-of-experts (Qwen3-MoE's experts FP8 too, its router left in the model dtype)."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from safetensors.torch import load_file, save_file

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.models.config import ModelConfig, bundled_config_path, bundled_model_names, read_hf_config
from minisgl_jax.models.loader import load_model
from minisgl_jax.models.moe import expert_layouts
from minisgl_jax.models.quantization import FP8_DTYPE, FP8_MAX, QuantConfig, dequantize, fp8_einsum, linear
from minisgl_jax.models.transformer import CausalLM
from tiny_models import full_logits, save_tiny_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ARGS = dict(dtype="float32", attention_backend="reference", cache="naive", num_pages=32, max_running_requests=2,
            max_prefill_tokens=64, compile_cache_dir=None, warmup=False)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = (48, 32)  # [out, in]: 48 leaves a partial last block on 64 outputs, 32 splits o_proj's heads
# Qwen3-MoE's experts 64 wide: two blocks of 32 inputs in down, so --moe-parallel tp at tp=2 slices its scale.
TINY_OVERRIDES = {"qwen3_moe": dict(moe_intermediate_size=64)}


def _config(fmt: str) -> dict:
    """quantization_config of `fmt`: fp8-block (Qwen3-*-FP8's), ct-channel (FP8_DYNAMIC, layer 1's MLP
    left unquantized by the ignore list), ct-tensor (FP8)."""
    if fmt == "fp8-block":
        return dict(quant_method="fp8", activation_scheme="dynamic", fmt="e4m3", weight_block_size=list(BLOCK))
    strategy = fmt.removeprefix("ct-")
    acts = (dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True) if strategy == "channel"
            else dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True))
    group = dict(targets=["Linear"], weights=dict(num_bits=8, type="float", strategy=strategy, dynamic=False,
                                                  symmetric=True), input_activations=acts, output_activations=None)
    return dict(quant_method="compressed-tensors", format="float-quantized", quantization_status="compressed",
                config_groups={"group_0": group},
                ignore=["lm_head", *(["re:.*layers\\.1\\.mlp\\..*"] if strategy == "channel" else [])])


def _quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (fp8 weight, its checkpoint scale, the dequantized float32 weight)."""
    out, inp = w.shape
    if fmt == "fp8-block":
        bo, bi = BLOCK
        rows, cols = -(-out // bo), -(-inp // bi)
        padded = torch.zeros(rows * bo, cols * bi)
        padded[:out, :inp] = w
        amax = padded.abs().reshape(rows, bo, cols, bi).amax(dim=(1, 3))
        scale = amax / FP8_MAX
        full = scale.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    elif fmt == "ct-channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        full = scale
    else:
        scale = w.abs().amax() / FP8_MAX
        full = scale
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> a tiny random float32 checkpoint of it (untied embeddings), made once for the module."""
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = save_tiny_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, seed=3,
                                              tie_word_embeddings=False, **TINY_OVERRIDES.get(arch, {}))
        return made[arch]

    return get


def quantized_pair(src: str, out: str, fmt: str) -> tuple[str, str]:
    """(checkpoint `src` quantized into `fmt` under `out`, a float32 checkpoint of its dequantized weights)."""
    fp8_dir, deq_dir = os.path.join(out, fmt), os.path.join(out, f"{fmt}-deq")
    fp8_tensors, deq_tensors = {}, {}
    quant = QuantConfig.from_hf(_config(fmt))
    for name, t in load_file(os.path.join(src, "model.safetensors")).items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LINEARS or not quant.quantizes(module):
            fp8_tensors[name] = deq_tensors[name] = t
            continue
        q, scale, deq = _quantize(t.float(), fmt)
        fp8_tensors[name], deq_tensors[name] = q, deq
        fp8_tensors[f"{module}.{'weight_scale_inv' if fmt == 'fp8-block' else 'weight_scale'}"] = scale
        if fmt == "ct-tensor":  # static activation scales (inputs up to 22), used by the FP8 GEMM path only
            fp8_tensors[f"{module}.input_scale"] = torch.tensor(0.05)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    for folder, tensors, quant in ((fp8_dir, fp8_tensors, _config(fmt)), (deq_dir, deq_tensors, None)):
        os.makedirs(folder)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **({"quantization_config": quant} if quant else {})}, f)
    return fp8_dir, deq_dir


def _run(path: str, jit: bool, **args) -> tuple[Engine, list[list[int]], np.ndarray]:
    """The engine, its greedy tokens of PROMPTS, and its prompt logits of the longer one (`jit`: as
    one program, faster than eager ops for FP8 weights, slower for plain ones)."""
    engine = Engine(EngineArgs(model=path, **{**ARGS, **args}))
    return engine, engine.generate(PROMPTS, GREEDY), full_logits(engine, PROMPTS[1], jit=jit)


FP8_CASES = [("llama", "fp8-block", 1), ("llama", "ct-channel", 1), ("qwen3", "fp8-block", 2),
             ("qwen3_moe", "ct-channel", 1), ("qwen3_moe", "fp8-block", 2)]  # MoE block-wise at tp=1: below


@pytest.mark.slow  # engines of its own
@pytest.mark.parametrize("arch,fmt,tp", FP8_CASES)
def test_fp8_checkpoint_runs_as_its_dequantized_weights(tmp_path, tiny, arch, fmt, tp):
    """Greedy tokens equal and float32 prompt logits within 1e-5 (relative): on a CPU the weights are
    dequantized exactly as the reference checkpoint's were, so only the order of float32 sums may differ.
    Qwen3-MoE's layer 0 is the expert block (ragged_dot backend, experts tensor-parallel at tp=2: down's
    block scale sliced one block a device), layer 1 dense."""
    fp8_dir, deq_dir = quantized_pair(tiny(arch), str(tmp_path), fmt)
    engine, tokens, logits = _run(fp8_dir, True, tp=tp)
    _, want_tokens, want_logits = _run(deq_dir, arch == "qwen3_moe", tp=tp)  # the experts: faster as one program
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(engine.runner.param_state())}
    assert params["layers.0.attn.q_proj"].dtype == FP8_DTYPE and params["layers.0.mlp.down"].dtype == FP8_DTYPE
    assert params["embed"].dtype == jnp.float32 and params["lm_head"].dtype == jnp.float32
    assert params["layers.1.mlp.down"].dtype == (jnp.float32 if fmt == "ct-channel" else FP8_DTYPE)
    if arch == "qwen3_moe":
        assert engine.model_config.moe_backend == "ragged_dot" and params["layers.0.mlp.router"].dtype == jnp.float32
        assert params["layers.0.mlp.down_scale"].shape == ((4, 2, 64) if fmt == "fp8-block" else (4, 1, 64))
        assert all(s.data.shape[1] == 2 // tp for s in params["layers.0.mlp.down_scale"].addressable_shards
                   if fmt == "fp8-block")
    assert tokens == want_tokens
    assert np.linalg.norm(logits - want_logits) / np.linalg.norm(want_logits) < 1e-5
    engine.check_kv_invariant()


@pytest.mark.slow  # engines of its own
def test_fp8_experts_on_the_pallas_kernel_equal_ragged_dot(tmp_path, tiny):
    """Block-wise FP8 Qwen3-MoE at tp=1: prompt logits of the ragged_dot backend (experts dequantized)
    within 1e-5 of the dequantized checkpoint's, and the Pallas grouped GEMM's (interpret mode; FP8
    experts, two scale blocks of gate/up's 64 inputs applied per K tile) within 1e-5 of ragged_dot's."""
    fp8_dir, deq_dir = quantized_pair(tiny("qwen3_moe"), str(tmp_path), "fp8-block")
    want = full_logits(Engine(EngineArgs(model=deq_dir, **ARGS)), PROMPTS[1], jit=True)
    ragged, pallas = (full_logits(Engine(EngineArgs(model=fp8_dir, moe_backend=b, **ARGS)), PROMPTS[1], jit=True)
                      for b in ("ragged_dot", "pallas"))
    assert np.linalg.norm(ragged - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(pallas - ragged) / np.linalg.norm(ragged) < 1e-5


@pytest.mark.slow  # engines of its own
def test_fp8_gemm_path_through_the_model_stays_close(tmp_path, tiny, monkeypatch):
    """The FP8 GEMM path (forced on the CPU: XLA:CPU runs FP8 dots) through a whole per-tensor model with
    static input scales: prompt logits within 5% (relative; 2.1% measured) of the dequantized weights'; it generates."""
    fp8_dir, deq_dir = quantized_pair(tiny("llama"), str(tmp_path), "ct-tensor")
    want = full_logits(Engine(EngineArgs(model=deq_dir, **ARGS)), PROMPTS[1])
    monkeypatch.setattr(QuantConfig, "for_devices", lambda self, devices: dataclasses.replace(self, fp8_gemm=True))
    engine = Engine(EngineArgs(model=fp8_dir, **ARGS))
    assert engine.model_config.quantization.uses_fp8_gemm
    err = np.linalg.norm(full_logits(engine, PROMPTS[1], jit=True) - want) / np.linalg.norm(want)
    assert 0 < err < 0.05, err
    assert [len(o) for o in engine.generate(PROMPTS, GREEDY)] == [12, 12]


@pytest.mark.parametrize("arch,fmt", [("qwen3", "fp8-block"), ("llama", "ct-channel"), ("llama", "ct-tensor"),
                                      ("qwen3_moe", "fp8-block"), ("qwen3_moe", "ct-tensor")])
def test_loaded_fp8_weights_dequantize_to_the_reference_at_tp4(tmp_path, tiny, arch, fmt):
    """Loaded over 4 devices (each of the 2 KV heads on 2; Qwen3-MoE's 4 experts one a device, --moe-parallel
    ep), every FP8 linear, experts included, times its scale equals the dequantized checkpoint's weight
    exactly, shard by shard."""
    fp8_dir, deq_dir = quantized_pair(tiny(arch), str(tmp_path), fmt)
    mesh = Mesh(np.array(jax.devices()[:4]), ("tp",))
    models = [load_model(ModelConfig.from_hf_dict(read_hf_config(d)).for_tp(4, "ep"), d, jnp.float32, mesh)
              for d in (fp8_dir, deq_dir)]
    fp8, deq = (dict(nnx.to_flat_state(nnx.state(m))) for m in models)
    assert models[0].config.kv_head_replicas == 2
    checked = 0
    for path, variable in fp8.items():
        w = variable.get_value()
        if w.dtype != FP8_DTYPE:
            continue
        scale = fp8[path[:-1] + (f"{path[-1]}_scale",)].get_value()
        got = jax.jit(dequantize, static_argnums=2)(w, scale, jnp.float32)
        assert got.sharding.is_equivalent_to(w.sharding, w.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(deq[path].get_value()))
        checked += 1
    assert checked == (10 if fmt != "ct-channel" else 8)  # q, kv, o, gate_up, down of 2 layers; 1 MLP ignored


@pytest.mark.parametrize("strategy,static", [("channel", False), ("tensor", True)])
def test_fp8_gemm_path_close_to_dequantized_matmul(strategy, static):
    """Activations quantized per token (or by a static scale) and an FP8 x FP8 einsum: relative error
    under 8% against the dequantized weights' float32 matmul (e4m3 keeps 3 mantissa bits: ~6% per
    element at worst, averaging down over the 256 products of a sum), and XLA:CPU runs the FP8 dot."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.float32)
    w32 = rng.normal(size=(256, 2, 48)) * 0.05
    scale = (np.abs(w32).max(axis=0, keepdims=True) if strategy == "channel" else np.abs(w32).max()[None, None, None])
    scale = jnp.asarray(scale / FP8_MAX, jnp.float32)
    w = jnp.asarray(w32 / scale, FP8_DTYPE)
    input_scale = jnp.asarray(float(jnp.abs(x).max()) / FP8_MAX) if static else None
    got = fp8_einsum("th,hcn->tcn", x, w, scale, input_scale)
    want = jnp.einsum("th,hcn->tcn", x, dequantize(w, scale, jnp.float32))
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert 0 < err < 0.08, err
    quant = QuantConfig("compressed-tensors", strategy, None, "static" if static else "dynamic", fp8_gemm=True)
    forced = linear("th,hcn->tcn", x, w, scale, input_scale, quant)
    assert np.array_equal(np.asarray(forced), np.asarray(got))  # the flag picks the FP8 GEMM path
    for off in (dataclasses.replace(quant, fp8_gemm=False), dataclasses.replace(quant, activations="none")):
        assert np.array_equal(np.asarray(linear("th,hcn->tcn", x, w, scale, input_scale, off)), np.asarray(want))


@pytest.mark.skipif(not any(d.platform == "gpu" and float(getattr(d, "compute_capability", "0")) >= 8.9
                            for d in jax.devices()), reason="needs a GPU with FP8 (compute capability >= 8.9)")
def test_fp8_gemm_on_gpu_close_to_dequantized_matmul():
    """On the GPU (cuBLASLt FP8 GEMM): a Llama-8B-shaped down projection in bf16, relative error under 5%
    against the float32 matmul of the dequantized weights."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 14336)), jnp.bfloat16)
    w32 = rng.normal(size=(14336, 4096)) * 0.02
    scale = jnp.asarray(np.abs(w32).max(axis=0, keepdims=True) / FP8_MAX, jnp.float32)
    w = jnp.asarray(w32 / scale, FP8_DTYPE)
    got = jax.jit(fp8_einsum, static_argnums=0)("ti,ih->th", x, w, scale, None).astype(jnp.float32)
    want = jnp.einsum("ti,ih->th", x.astype(jnp.float32), dequantize(w, scale, jnp.float32))
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05


@pytest.fixture(scope="module")
def llama_block(tmp_path_factory, tiny) -> str:
    return quantized_pair(tiny("llama"), str(tmp_path_factory.mktemp("llama-block")), "fp8-block")[0]


def _edited(src: str, dst: str, drop: str | None = None, replace: dict | None = None, config: dict | None = None) -> str:
    """A copy of checkpoint `src` without tensor `drop`, with tensors `replace`d and config.json's keys updated."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors.pop(drop, None)
    tensors.update(replace or {})
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**cfg, **(config or {})}, f)
    return dst


def test_bad_fp8_experts_are_refused_naming_the_tensor(tmp_path, tiny):
    """An expert's scale of the wrong shape names the tensor; under --moe-parallel tp at tp=4 each device
    would take 16 of down's 64 inputs, half a block of 32: refused, pointing to ep."""
    moe_block = quantized_pair(tiny("qwen3_moe"), str(tmp_path), "fp8-block")[0]
    scale = "model.layers.0.mlp.experts.2.down_proj.weight_scale_inv"
    with pytest.raises(ValueError, match=rf"{scale}.*shape \[3, 3\].*must be \[2, 2\]"):
        Engine(EngineArgs(model=_edited(moe_block, str(tmp_path / "bad"), replace={scale: torch.ones(3, 3)}), **ARGS))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_scale: axis 1 of size 2 does not split over 4 devices "
                                         r".*FP8 block; --moe-parallel ep keeps every expert whole"):
        Engine(EngineArgs(model=moe_block, tp=4, **ARGS))


def test_bad_fp8_checkpoints_are_refused_naming_the_tensor_or_field(tmp_path, llama_block):
    scale = "model.layers.1.mlp.down_proj.weight_scale_inv"
    cases = [
        (dict(config={"quantization_config": {"quant_method": "awq"}}), r"quant_method 'awq'.*'compressed-tensors'"),
        (dict(config={"quantization_config": {**_config("ct-channel"), "config_groups": {"g": {
            "targets": ["Linear"], "weights": dict(num_bits=8, type="float", strategy="group")}}}}),
         r"config_groups\.g\.weights\.strategy 'group'"),
        (dict(replace={scale: torch.ones(3, 3)}), rf"{scale}.*shape \[3, 3\].*must be \[2, 4\]"),
        (dict(drop=scale), rf"down_proj.weight has no scale tensor '{scale}'"),
        (dict(config={"quantization_config": {**_config("fp8-block"), "weight_block_size": [32, 48]}}),
         r"model.layers.0.self_attn.q_proj: FP8 block of 48 inputs does not tile"),
        (dict(replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}),
         r"layers.0.mlp.gate_up: the checkpoint's tensor is float32, the model expects float8_e4m3fn"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            Engine(EngineArgs(model=_edited(llama_block, str(tmp_path / str(i)), **edit), **ARGS))
    with pytest.raises(ValueError, match=r"o_proj_scale: axis 0 of size 2 does not split over 4 devices.*FP8 block"):
        Engine(EngineArgs(model=llama_block, tp=4, **ARGS))


def test_fp8_requests_that_cannot_run_are_refused(tmp_path, tiny):
    plain = tiny("llama")
    with pytest.raises(ValueError, match="no quantization_config"):
        Engine(EngineArgs(model=plain, quantization="fp8", **ARGS))
    with pytest.raises(ValueError, match=r"quantization must be None or one of \('fp8',\)"):
        EngineArgs(model=plain, quantization="int4").validate()

    class Ampere:
        platform, compute_capability, device_kind = "gpu", "8.0", "NVIDIA A100-SXM4-80GB"

    with pytest.raises(ValueError, match="compute capability >= 8.9.*A100-SXM4-80GB has 8.0"):
        QuantConfig.dummy().for_devices([Ampere()])
    Ampere.compute_capability = "9.0"
    assert QuantConfig.dummy().for_devices([Ampere()]).fp8_gemm


@pytest.mark.slow  # engines of its own
def test_dummy_fp8_weights_build_and_generate(tmp_path, tiny):
    """--load-format dummy --quantization fp8: block-wise 128 x 128 FP8 linears (1 byte a weight, one
    float32 scale per output channel and block of 128 inputs), the rest float32; it generates."""
    path = str(tmp_path)  # the config alone
    shutil.copy(os.path.join(tiny("llama"), "config.json"), path)
    engine = Engine(EngineArgs(model=path, load_format="dummy", quantization="fp8", **ARGS))
    cfg = engine.model_config
    assert cfg.quantization.strategy == "block" and cfg.quantization.block == (128, 128)
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_q_heads * cfg.head_dim, 2 * cfg.num_kv_heads * cfg.head_dim
    linear = h * (2 * q + kv) + 3 * h * i  # q, k, v, o; gate, up, down
    scales = (q + kv + h + 2 * i + h) * 4  # per output channel: every input (64 or 128) is one block
    plain = (2 * cfg.vocab_size * h + (2 * layers + 1) * h) * 4
    assert engine.weights_bytes == layers * (linear + scales) + plain
    outputs = engine.generate(PROMPTS, GREEDY)
    assert [len(o) for o in outputs] == [12, 12] and all(0 <= t < cfg.vocab_size for o in outputs for t in o)
    engine.check_kv_invariant()


@pytest.mark.parametrize("name", [n for n in bundled_model_names() if "A3B" not in n and "A22B" not in n
                                  and "Mixtral" not in n])
def test_bundled_configs_take_dummy_fp8_blocks(name):
    """Every dense bundled model's linears tile into 128 x 128 blocks: scales of input / 128 rows."""
    path = bundled_config_path(f"org/{name}")
    cfg = ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))
    cfg = dataclasses.replace(cfg, quantization=QuantConfig.dummy())
    layer = nnx.eval_shape(lambda: CausalLM(cfg, jnp.bfloat16)).layers[0]
    assert layer.mlp.down.dtype == FP8_DTYPE
    assert layer.mlp.down_scale.shape == (cfg.intermediate_size // 128, cfg.hidden_size)
    assert layer.attn.o_proj_scale.shape == (cfg.num_q_heads, 1, cfg.hidden_size)


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "Qwen3-235B-A22B", "Mixtral-8x7B-v0.1"])
def test_bundled_moe_configs_take_dummy_fp8_experts(name):
    """Every expert FP8 with one scale per output channel and block of 128 inputs (down's intermediate dim
    in whole blocks: 768 = 6 x 128, 1536, 14336), the router in the model dtype."""
    path = bundled_config_path(f"org/{name}")
    cfg = ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))
    cfg = dataclasses.replace(cfg, quantization=QuantConfig.dummy())
    block = nnx.eval_shape(lambda: CausalLM(cfg, jnp.bfloat16)).layers[cfg.moe_layers[0]].mlp
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert block.gate_up.dtype == block.down.dtype == FP8_DTYPE and block.router.dtype == jnp.bfloat16
    assert block.gate_up_scale.shape == (e, h // 128, 2, i) and block.down_scale.shape == (e, i // 128, h)


def test_ignored_experts_stay_in_the_model_dtype():
    """The ignore list reaches the experts as any linear: every expert's down ignored leaves down unquantized
    (no scale) beside FP8 gate/up; one expert ignored alone cannot be part of one stacked weight: refused."""
    path = bundled_config_path("org/Qwen3-30B-A3B")
    cfg = ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))
    ignoring = dataclasses.replace(cfg, quantization=dataclasses.replace(
        QuantConfig.dummy(), ignore=("re:.*mlp\\.experts\\.\\d+\\.down_proj",)))
    block = nnx.eval_shape(lambda: CausalLM(ignoring, jnp.bfloat16)).layers[0].mlp
    assert block.gate_up.dtype == FP8_DTYPE and block.down.dtype == jnp.bfloat16 and block.down_scale is None
    one = dataclasses.replace(cfg, quantization=dataclasses.replace(
        QuantConfig.dummy(), ignore=("model.layers.0.mlp.experts.5.up_proj",)))
    with pytest.raises(ValueError, match=r"experts.0.gate_proj and model.layers.0.mlp.experts.5.up_proj share one "
                                         r"weight \(gate_up\) but the ignore list quantizes only the first"):
        nnx.eval_shape(lambda: CausalLM(one, jnp.bfloat16))


def test_dummy_fp8_experts_are_random_fp8_of_a_trained_models_size(tiny):
    """--load-format dummy --quantization fp8 on a mixture of experts at tp=2 ep: FP8 experts (two a
    device) whose dequantized weights have a trained model's spread (std ~0.02), scales beside them."""
    cfg = ModelConfig.from_hf_dict(read_hf_config(tiny("qwen3_moe")))
    cfg = dataclasses.replace(cfg, quantization=QuantConfig.dummy())
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    block = load_model(cfg.for_tp(2, "ep"), None, jnp.float32, mesh, dummy_seed=0).layers[0].mlp
    layouts = expert_layouts(cfg)
    for name in ("gate_up", "down"):
        w, scale = getattr(block, name).get_value(), getattr(block, f"{name}_scale").get_value()
        assert w.dtype == FP8_DTYPE and w.shape == layouts[name].shape and scale.shape == layouts[name].scale_shape(
            cfg.quantization)
        assert [s.data.shape[0] for s in w.addressable_shards] == [2, 2]
        std = float(jnp.std(dequantize(w, scale, jnp.float32)))
        assert 0.01 < std < 0.04, (name, std)


def test_quantization_flag_reaches_the_engine_args():
    from minisgl_jax.server.cli import parse_args

    assert parse_args(["--model", "m", "--load-format", "dummy", "--quantization", "fp8"])[0].quantization == "fp8"
    assert parse_args(["--model", "m"])[0].quantization is None
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--quantization", "int4"])


def test_quantization_configs_parse_into_their_scheme():
    parse = QuantConfig.from_hf
    assert parse(_config("fp8-block")) == QuantConfig("fp8", "block", BLOCK, "dynamic")
    assert parse(_config("ct-channel")) == QuantConfig("compressed-tensors", "channel", None, "dynamic",
                                                       ("lm_head", "re:.*layers\\.1\\.mlp\\..*"))
    assert parse(_config("ct-tensor")).activations == "static"
    assert parse(dict(quant_method="fp8", activation_scheme="static")) == QuantConfig("fp8", "tensor", None, "static")
    weight_only = _config("ct-channel")
    weight_only["config_groups"]["group_0"]["input_activations"] = None
    assert parse(weight_only).activations == "none"
    ignoring = dataclasses.replace(parse(_config("ct-channel")), ignore=("re:.*layers\\.1\\.mlp.*", "model.layers.0.self_attn"))
    assert [ignoring.quantizes(m) for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                            "model.layers.1.self_attn.o_proj")] == [False, False, True]
