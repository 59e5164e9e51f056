"""Weights into the sharded device layout: from safetensors checkpoints, or random (`dummy`).

Checkpoint files are memory-mapped, so a tensor is read when it is placed and no host holds a
copy of the whole model: one transformed tensor at a time goes to the devices, each device
receiving only its shard (`jax.device_put` with the parameter's `NamedSharding`). A mixture's
experts are one parameter per projection and layer: each expert's tensors (FP8 ones with their
scales, checked against their weights like a dense linear's) are stacked on the host first.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from minisgl_jax.models.config import ModelConfig
from minisgl_jax.models.kv_scales import read_kv_scales
from minisgl_jax.models.moe import EXPERT_NAMES, expert_layouts
from minisgl_jax.models.quantization import FP8_DTYPE, LinearLayout, QuantConfig
from minisgl_jax.models.transformer import CausalLM, linear_layouts

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
}
LINEAR_PARTS = ("_input_scale", "_scale", "")  # our parameter name's suffix: see models/transformer.py


class SafetensorsCheckpoint:
    """Lazily memory-mapped tensors of a single-file or index-sharded safetensors checkpoint."""

    def __init__(self, model_dir: str) -> None:
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {model_dir}")
        self._tensors: dict[str, tuple[str, str, list[int], int, int]] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self._tensors[key] = (path, info["dtype"], info["shape"], 8 + header_len + start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        path, dtype, shape, offset, nbytes = self._tensors[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {dtype}")
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        count = nbytes // np_dtype.itemsize
        return np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)


def _hf_source(path: tuple, cfg: ModelConfig) -> Callable[[SafetensorsCheckpoint], np.ndarray]:
    """How to build our parameter at `path` from the Hugging Face tensors."""
    nq, d = cfg.num_q_heads, cfg.head_dim
    replicas = cfg.kv_head_replicas
    nkv = cfg.num_kv_heads // replicas  # as stored in the checkpoint
    if path == ("embed",):
        return lambda ck: ck.get("model.embed_tokens.weight")
    if path == ("lm_head",):
        return lambda ck: ck.get("lm_head.weight").T
    if path == ("norm", "weight"):
        return lambda ck: ck.get("model.norm.weight")
    _, i, *rest = path
    pre = f"model.layers.{i}."
    if i in cfg.moe_layers and rest[0] == "mlp":
        return _expert_source(rest[1], pre, cfg)
    part = next(p for p in LINEAR_PARTS if rest[-1].endswith(p))
    layout = linear_layouts(cfg).get(rest[-1][: len(rest[-1]) - len(part)])
    if layout is not None:
        return _linear_source(layout, pre, part, cfg.quantization)
    table: dict[tuple, Callable[[SafetensorsCheckpoint], np.ndarray]] = {
        ("input_norm", "weight"): lambda ck: ck.get(pre + "input_layernorm.weight"),
        ("post_attn_norm", "weight"): lambda ck: ck.get(pre + "post_attention_layernorm.weight"),
        ("attn", "q_bias"): lambda ck: ck.get(pre + "self_attn.q_proj.bias").reshape(nq, d),
        ("attn", "kv_bias"): lambda ck: np.repeat(np.stack(
            [ck.get(pre + f"self_attn.{x}_proj.bias").reshape(nkv, d) for x in "kv"], axis=0
        ), replicas, axis=1),
        ("attn", "o_bias"): lambda ck: ck.get(pre + "self_attn.o_proj.bias"),
        ("attn", "q_norm", "weight"): lambda ck: ck.get(pre + "self_attn.q_norm.weight"),
        ("attn", "k_norm", "weight"): lambda ck: ck.get(pre + "self_attn.k_norm.weight"),
    }
    return table[tuple(rest)]


def _linear_source(layout: LinearLayout, pre: str, part: str,
                   quant: QuantConfig | None) -> Callable[[SafetensorsCheckpoint], np.ndarray]:
    """A linear weight (part ''), its scale ('_scale') or its static input scale ('_input_scale') in our layout."""
    n_in = len(layout.in_shape)

    def place(per_module: list[np.ndarray], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
              replicate: bool) -> np.ndarray:
        """[out, in] tensors -> transposed, split into our axes, stacked, the first output axis replicated."""
        parts = [t.T.reshape(in_shape + out_shape) for t in per_module]
        stacked = np.stack(parts, axis=n_in) if len(parts) > 1 else parts[0]
        return np.repeat(stacked, layout.replicas, axis=n_in + len(layout.stack)) if replicate else stacked

    def weight(ck: SafetensorsCheckpoint) -> np.ndarray:
        tensors = []
        for m in layout.modules:
            name = f"{pre}{m}.weight"
            t = ck.get(name)
            expected = (math.prod(layout.out_shape), math.prod(layout.in_shape))
            if t.shape != expected:
                raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(expected)}")
            tensors.append(t)
        return place(tensors, layout.in_shape, layout.out_shape, replicate=True)

    def scale(ck: SafetensorsCheckpoint) -> np.ndarray:
        shape = layout.scale_shape(quant)
        per_tensor = quant.strategy == "tensor"  # one scale for all outputs: nothing to replicate
        out = (1,) * len(layout.out_shape) if per_tensor else layout.out_shape
        return place([_scale_2d(ck, f"{pre}{m}", quant, layout) for m in layout.modules], shape[:n_in], out,
                     replicate=not per_tensor)

    def input_scale(ck: SafetensorsCheckpoint) -> np.ndarray:
        # One input, several modules (k and v, gate and up): the largest scale clips none of them.
        values = []
        for m in layout.modules:
            name = f"{pre}{m}.input_scale"
            if name not in ck:
                raise ValueError(f"tensor {name!r} is missing: quantization_config asks for static activation scales")
            t = ck.get(name)
            if t.size != 1:
                raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected a scalar (per-tensor scale)")
            values.append(float(t.reshape(())))
        return np.array(max(values), np.float32)

    return {"": weight, "_scale": scale, "_input_scale": input_scale}[part]


def _scale_2d(ck: SafetensorsCheckpoint, module: str, quant: QuantConfig, layout: LinearLayout) -> np.ndarray:
    """A module's weight scale as float32 [out or 1, input blocks or 1], its shape checked against the weight."""
    name = f"{module}.{quant.scale_name}"
    if name not in ck:
        raise ValueError(f"FP8 weight {module}.weight has no scale tensor {name!r}")
    t = np.asarray(ck.get(name), np.float32)
    n_out, n_in = math.prod(layout.out_shape), math.prod(layout.in_shape)
    if quant.strategy == "tensor":
        expected: tuple[int, ...] = (1, 1)
        ok = t.size == 1
    elif quant.strategy == "channel":
        expected = (n_out, 1)
        ok = t.shape in ((n_out, 1), (n_out,))
    else:
        block_out, block_in = quant.block
        expected = (-(-n_out // block_out), -(-n_in // block_in))
        ok = t.shape == expected
    if not ok:
        raise ValueError(f"tensor {name!r} has shape {list(t.shape)}; a {quant.strategy} scale of "
                         f"{module}.weight [{n_out}, {n_in}] must be {list(expected)}")
    if quant.strategy == "block":  # one scale per output channel: repeat each block row (exact)
        return np.repeat(t, quant.block[0], axis=0)[:n_out]
    return t.reshape(expected)


def _expert_source(name: str, pre: str, cfg: ModelConfig) -> Callable[[SafetensorsCheckpoint], np.ndarray]:
    """models/moe.py's parameter `name` from the per-expert tensors: each expert's weight (or its scale)
    built as a linear's, stacked over the experts at load."""
    if name == "router":
        block, router, _ = EXPERT_NAMES[cfg.architecture]
        return lambda ck: ck.get(f"{pre}{block}.{router}.weight").T
    part = "_scale" if name.endswith("_scale") else ""
    layout = expert_layouts(cfg)[name.removesuffix(part)]
    sources = [_linear_source(layout.expert(e), pre, part, cfg.quantization) for e in range(layout.experts)]
    return lambda ck: np.stack([source(ck) for source in sources])


# Dummy FP8 weights: values spread over the FP8 range, scales that bring them to a trained model's size.
DUMMY_FP8_SPREAD = 64.0
DUMMY_ACTIVATION_SCALE = 4.0 / 448.0  # static input scales: activations up to about 4


@functools.lru_cache(maxsize=None)
def _dummy_maker(shape: tuple[int, ...], dtype, sharding: NamedSharding, kind: str) -> Callable:
    """One compiled initializer per distinct (shape, dtype, sharding, kind): layers share them."""
    std = 0.02 if len(shape) > 1 else 0.01

    def make(key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, shape, jnp.float32)
        if kind == "norm":
            return (1.0 + noise * std).astype(dtype)
        if kind == "fp8":
            return jnp.clip(noise * DUMMY_FP8_SPREAD, -448.0, 448.0).astype(dtype)
        if kind == "scale":
            return ((1.0 + 0.1 * noise) * (0.02 / DUMMY_FP8_SPREAD)).astype(dtype)
        if kind == "input_scale":
            return jnp.full(shape, DUMMY_ACTIVATION_SCALE, dtype)
        return (noise * std).astype(dtype)

    return jax.jit(make, out_shardings=sharding)


def _dummy_value(path: tuple, shape: tuple[int, ...], dtype, sharding: NamedSharding, key: jax.Array) -> jax.Array:
    """Random weights with the scale of a trained model's, made on the devices."""
    name = path[-1]
    if name == "weight":
        kind = "norm"
    elif jnp.dtype(dtype) == FP8_DTYPE:
        kind = "fp8"
    elif isinstance(name, str) and name.endswith("_input_scale"):
        kind = "input_scale"
    elif isinstance(name, str) and name.endswith("_scale"):
        kind = "scale"
    else:
        kind = "plain"
    return _dummy_maker(tuple(shape), jnp.dtype(dtype), sharding, kind)(key)


def _check_shardable(name: str, shape: tuple[int, ...], spec, mesh: Mesh, expert: bool) -> None:
    """Every sharded axis splits evenly; `expert`: a mixture's expert weight, which ep would keep whole."""
    for axis, mesh_axis in enumerate(spec):
        if mesh_axis is not None and shape[axis] % mesh.shape[mesh_axis]:
            why = ""
            if name.endswith("_scale"):
                why = (" (a tensor-parallel shard would cut an FP8 block"
                       + ("; --moe-parallel ep keeps every expert whole on one device)" if expert else ")"))
            raise ValueError(f"parameter {name}: axis {axis} of size {shape[axis]} does not split over "
                             f"{mesh.shape[mesh_axis]} devices{why}")


def load_model(
    cfg: ModelConfig, model_dir: str | None, dtype: jnp.dtype, mesh: Mesh, dummy_seed: int | None = None
) -> CausalLM:
    """Build the model with every parameter placed by its PartitionSpec over `mesh`.

    model_dir None (with dummy_seed set) gives random weights from the config alone (KV scales 1.0).
    """
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype))
    graphdef, state = nnx.split(abstract)
    checkpoint = SafetensorsCheckpoint(model_dir) if model_dir is not None else None
    key = jax.random.key(dummy_seed or 0)
    flat = nnx.to_flat_state(state)
    for index, (path, variable) in enumerate(flat):
        placeholder, spec = variable.get_value(), variable.spec
        shape, param_dtype, name = placeholder.shape, placeholder.dtype, ".".join(map(str, path))
        expert = path[0] == "layers" and path[1] in cfg.moe_layers and path[2] == "mlp"
        _check_shardable(name, shape, spec, mesh, expert)
        sharding = NamedSharding(mesh, spec)
        if checkpoint is None:
            value = _dummy_value(path, shape, param_dtype, sharding, jax.random.fold_in(key, index))
        else:
            host = np.asarray(_hf_source(path, cfg)(checkpoint))
            if host.shape != shape:
                raise ValueError(f"parameter {name}: checkpoint shape {host.shape}, expected {shape}")
            if (host.dtype == FP8_DTYPE) != (param_dtype == FP8_DTYPE):
                raise ValueError(
                    f"parameter {name}: the checkpoint's tensor is {host.dtype}, the model expects {param_dtype} "
                    f"(config.json's quantization_config: {cfg.quantization}; embedding, lm_head, norms and "
                    f"ignored modules stay in the model dtype)"
                )
            value = jax.device_put(host.astype(param_dtype), sharding)
        variable.set_value(value)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if checkpoint is not None:  # static floats of each layer: an FP8 KV pool's scales (models/kv_scales.py)
        for layer, scales in zip(model.layers, read_kv_scales(checkpoint, cfg.num_layers)):
            layer.attn.kv_scales = scales
    return model
