"""Per-layer FP8 KV-cache scales from a checkpoint, under the names the common exporters give them.

A scale s means the FP8 pool stores k / s and reads back stored * s (as vLLM and SGLang use them).
Names tried for layer N, first found wins (prefix `model.layers.N.self_attn.`):
  k_scale / v_scale                   llm-compressor / compressed-tensors (`kv_cache_scheme`), vLLM's own
  k_proj.k_scale / v_proj.v_scale     NVIDIA ModelOpt
  k_proj.output_scale / v_proj.output_scale   older compressed-tensors exports
  kv_scale                            the deprecated single scale, used for both K and V
A layer with none of them gets 1.0. A scale must be one finite number > 0 (shape [] or [1]).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

from minisgl_jax.layers.attention import KVScales

logger = logging.getLogger(__name__)

SCALE_NAMES = {
    "k": ("k_scale", "k_proj.k_scale", "k_proj.output_scale", "kv_scale"),
    "v": ("v_scale", "v_proj.v_scale", "v_proj.output_scale", "kv_scale"),
}


class Checkpoint(Protocol):
    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> np.ndarray: ...


def read_scale(checkpoint: Checkpoint, name: str) -> float:
    """The scalar tensor `name`; ValueError naming it unless it is one finite number > 0."""
    tensor = np.asarray(checkpoint.get(name), np.float32)
    if tensor.size != 1 or tensor.ndim > 1:
        raise ValueError(f"KV scale {name!r} must be a scalar (shape [] or [1]), got shape {list(tensor.shape)}")
    value = float(tensor.reshape(()))
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"KV scale {name!r} must be finite and > 0, got {value}")
    return value


def layer_scale(checkpoint: Checkpoint, layer: int, which: str) -> float | None:
    """Layer `layer`'s K ("k") or V ("v") scale, or None when the checkpoint has none."""
    prefix = f"model.layers.{layer}.self_attn."
    for suffix in SCALE_NAMES[which]:
        if prefix + suffix in checkpoint:
            return read_scale(checkpoint, prefix + suffix)
    return None


def read_kv_scales(checkpoint: Checkpoint, num_layers: int) -> list[KVScales]:
    """Every layer's scales, 1.0 where the checkpoint has none."""
    scales, found = [], 0
    for layer in range(num_layers):
        k, v = layer_scale(checkpoint, layer, "k"), layer_scale(checkpoint, layer, "v")
        found += (k is not None) + (v is not None)
        scales.append(KVScales(1.0 if k is None else k, 1.0 if v is None else v))
    if found:
        logger.info("KV cache scales: %d of %d layers' K/V scales from the checkpoint, the rest 1.0",
                    found, 2 * num_layers)
    return scales
