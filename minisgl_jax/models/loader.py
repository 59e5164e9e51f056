"""Weights into the sharded device layout: from safetensors checkpoints, or random (`dummy`).

Checkpoint files are memory-mapped, so a tensor is read when it is placed and no host holds a
copy of the whole model: one transformed tensor at a time goes to the devices, each device
receiving only its shard (`jax.device_put` with the parameter's `NamedSharding`).
"""

from __future__ import annotations

import functools
import json
import logging
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
from minisgl_jax.models.transformer import CausalLM

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


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
    h, nq, d = cfg.hidden_size, cfg.num_q_heads, cfg.head_dim
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
    table: dict[tuple, Callable[[SafetensorsCheckpoint], np.ndarray]] = {
        ("input_norm", "weight"): lambda ck: ck.get(pre + "input_layernorm.weight"),
        ("post_attn_norm", "weight"): lambda ck: ck.get(pre + "post_attention_layernorm.weight"),
        ("attn", "q_proj"): lambda ck: ck.get(pre + "self_attn.q_proj.weight").T.reshape(h, nq, d),
        ("attn", "kv_proj"): lambda ck: np.repeat(np.stack(
            [ck.get(pre + f"self_attn.{x}_proj.weight").T.reshape(h, nkv, d) for x in "kv"], axis=1
        ), replicas, axis=2),
        ("attn", "o_proj"): lambda ck: ck.get(pre + "self_attn.o_proj.weight").T.reshape(nq, d, h),
        ("attn", "q_bias"): lambda ck: ck.get(pre + "self_attn.q_proj.bias").reshape(nq, d),
        ("attn", "kv_bias"): lambda ck: np.repeat(np.stack(
            [ck.get(pre + f"self_attn.{x}_proj.bias").reshape(nkv, d) for x in "kv"], axis=0
        ), replicas, axis=1),
        ("attn", "o_bias"): lambda ck: ck.get(pre + "self_attn.o_proj.bias"),
        ("attn", "q_norm", "weight"): lambda ck: ck.get(pre + "self_attn.q_norm.weight"),
        ("attn", "k_norm", "weight"): lambda ck: ck.get(pre + "self_attn.k_norm.weight"),
        ("mlp", "gate_up"): lambda ck: np.stack(
            [ck.get(pre + f"mlp.{x}_proj.weight").T for x in ("gate", "up")], axis=1
        ),
        ("mlp", "down"): lambda ck: ck.get(pre + "mlp.down_proj.weight").T,
    }
    return table[tuple(rest)]


# The sparse block's tensor names: (module, router, (gate, up, down) of expert e).
_EXPERT_NAMES = {
    "qwen3_moe": ("mlp", "gate", ("experts.{e}.gate_proj", "experts.{e}.up_proj", "experts.{e}.down_proj")),
    "mixtral": ("block_sparse_moe", "gate", ("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")),
}


def _expert_source(name: str, pre: str, cfg: ModelConfig) -> Callable[[SafetensorsCheckpoint], np.ndarray]:
    """models/moe.py's parameter `name` from the per-expert tensors, stacked over experts at load."""
    module, router, (gate, up, down) = _EXPERT_NAMES[cfg.architecture]
    pre = f"{pre}{module}."

    def tensor(ck: SafetensorsCheckpoint, pattern: str, e: int) -> np.ndarray:
        return ck.get(f"{pre}{pattern.format(e=e)}.weight").T

    experts = range(cfg.num_experts)
    table: dict[str, Callable[[SafetensorsCheckpoint], np.ndarray]] = {
        "router": lambda ck: ck.get(f"{pre}{router}.weight").T,
        "gate_up": lambda ck: np.stack(
            [np.stack([tensor(ck, gate, e), tensor(ck, up, e)], axis=1) for e in experts]
        ),
        "down": lambda ck: np.stack([tensor(ck, down, e) for e in experts]),
    }
    return table[name]


@functools.lru_cache(maxsize=None)
def _dummy_maker(shape: tuple[int, ...], dtype, sharding: NamedSharding, is_norm: bool) -> Callable:
    """One compiled initializer per distinct (shape, dtype, sharding): layers share them."""
    std = 0.02 if len(shape) > 1 else 0.01

    def make(key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, shape, jnp.float32) * std
        return ((1.0 + noise) if is_norm else noise).astype(dtype)

    return jax.jit(make, out_shardings=sharding)


def _dummy_value(path: tuple, shape: tuple[int, ...], dtype, sharding: NamedSharding, key: jax.Array) -> jax.Array:
    """Random weights with the scale of a trained model's, made on the devices."""
    return _dummy_maker(tuple(shape), jnp.dtype(dtype), sharding, path[-1] == "weight")(key)


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
        shape, spec = variable.get_value().shape, variable.spec
        sharding = NamedSharding(mesh, spec)
        if checkpoint is None:
            value = _dummy_value(path, shape, dtype, sharding, jax.random.fold_in(key, index))
        else:
            host = np.asarray(_hf_source(path, cfg)(checkpoint))
            if host.shape != shape:
                raise ValueError(f"parameter {'.'.join(map(str, path))}: checkpoint shape {host.shape}, expected {shape}")
            value = jax.device_put(host.astype(dtype), sharding)
        variable.set_value(value)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if checkpoint is not None:  # static floats of each layer: an FP8 KV pool's scales (models/kv_scales.py)
        for layer, scales in zip(model.layers, read_kv_scales(checkpoint, cfg.num_layers)):
            layer.attn.kv_scales = scales
    return model
