"""The per-call metadata of one forward pass, handed whole to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from minisgl_jax.layers.attention import AttentionBackend, AttentionMetadata
from minisgl_jax.layers.collectives import Collectives


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward pass shares besides its input."""

    positions: jax.Array  # [tokens] int32
    attention: AttentionMetadata
    backend: AttentionBackend  # the prefill or decode kernel, by `is_decode`
    is_decode: bool
    collectives: Collectives  # this step's tensor-parallel sums and vocab reductions, numbered in call order
