"""The sparse mixture-of-experts block of Qwen3-MoE and Mixtral: route, sort by expert, grouped GEMM, un-sort.

Routing: softmax (float32) over the router logits, the top-k experts per token, their probabilities
renormalized to sum to 1 when `norm_topk_prob` (always for Mixtral). Ties go to the lower expert
index (`jax.lax.top_k`'s order); transformers' `torch.topk` leaves tie order unspecified.

The expert computation is one grouped GEMM per projection over the token-expert pairs grouped by
expert: the T*k pairs (T the bucket's tokens, padding rows included) in expert order, multiplied by
their expert's gate/up and down weights, weighted, and summed back per token. Every shape is static
per bucket; only the grouping changes with the routing, so no routing pattern recompiles. Two
backends (`EXPERT_BACKENDS`, chosen by --moe-backend; auto: pallas on GPUs, ragged_dot elsewhere):

- `ragged_dot` (`experts_forward`): `jax.lax.ragged_dot` over the [T*k] sorted pairs. What it reads
  is XLA's lowering: the generic one (CPU; NVIDIA GPUs by default: XLA's RaggedDotRewriter) is a
  dense product over an [experts, T*k, hidden] masked copy of the pairs, so every expert's weights
  are read once per projection, hit or not, and the FLOPs are `experts` times the routed pairs'
  (128x for Qwen3-MoE: fine for tiny tests, too slow to serve). With
  XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true (Ampere/Hopper, recent cuDNN) XLA
  hands the bf16 ragged dot to a cuDNN grouped-GEMM fusion that computes only the routed rows.
- `pallas` (`grouped_gemm_experts`): our Triton-lowered kernel (kernels/src/grouped_gemm.py) over
  the pairs padded to whole row tiles per expert. It reads only the weights of the experts that some
  pair is routed to (at most T*k of them: a batch-1 decode step of Qwen3-30B-A3B reads 8 of 128),
  each once per row tile, and computes the routed rows plus under one tile of padding per expert.
  On CPU it runs in Pallas interpret mode: correct, slow.

Whether a decode step then moves only the hit experts' bytes, and how the two compare, is what the
pending GPU runs in benchmarks/RESULTS.md measure (benchmarks/kernel_bench.py --only moe).

Parallelism: each expert is tensor-parallel like the dense MLP (gate/up column-parallel, down
row-parallel over the expert's intermediate dim, one all-reduce of [T, hidden] per layer through
the step's `Collectives`), and attention stays as it is. So every device holds a slice of every
expert: any top-k works on any tp that divides the expert's intermediate size ("fewer experts per
device than top-k" cannot arise; it is a case of expert parallelism), the load is balanced whatever
the routing, and no all-to-all is needed. The price: each expert's matrices get thin at large tp
(Qwen3-30B-A3B's 768 columns / tp). Expert parallelism (whole experts per device, tokens exchanged
all-to-all) is not built; which of the two is faster is for the GPU runs to say.

Weights: router [hidden, experts]; gate_up [experts, hidden, 2, inter]; down [experts, inter, hidden].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from minisgl_jax.kernels.grouped_gemm import align_to_tiles, default_block_m, grouped_gemm
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.models.config import ModelConfig


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """x: [tokens, hidden], router: [hidden, experts] -> (expert ids [tokens, k] int32, weights [tokens, k] f32).

    The logits in x's dtype, then a float32 softmax, as transformers computes them."""
    probs = jax.nn.softmax(jnp.dot(x, router).astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def experts_forward(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """The weighted sum of each token's experts: x [T, hidden], ids/weights [T, k] -> [T, hidden] in x's dtype.

    gate_up [experts, hidden, 2, inter] and down [experts, inter, hidden] may be one shard of the
    intermediate dim: the result is then that shard's partial sum."""
    tokens, k = ids.shape
    experts, hidden, _, inter = gate_up.shape
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)  # pair positions (token * k + slot) in expert order
    group_sizes = jnp.bincount(flat_ids, length=experts).astype(jnp.int32)
    h = jax.lax.ragged_dot(x[order // k], gate_up.reshape(experts, hidden, 2 * inter), group_sizes)
    h = h.reshape(-1, 2, inter)
    act = jax.nn.silu(h[:, 0]) * h[:, 1]
    out = jax.lax.ragged_dot(act, down, group_sizes)  # [T*k, hidden], expert order
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return jnp.sum(unsorted.reshape(tokens, k, hidden), axis=1).astype(x.dtype)


def grouped_gemm_experts(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """`experts_forward` through the Pallas grouped GEMM (kernels/src/grouped_gemm.py): the same
    inputs and result, reading only the experts that some token is routed to.

    The pairs go to the kernel's padded, expert-grouped order once; gate/up gathers x's rows there
    inside the kernel, down takes the activations in that order, and each pair's row is read back."""
    tokens, k = ids.shape
    experts, hidden, _, inter = gate_up.shape
    layout = align_to_tiles(ids.reshape(-1), experts, default_block_m(tokens * k, experts))
    h = grouped_gemm(x, gate_up.reshape(experts, hidden, 2 * inter), layout.tile_experts, layout.pair_of_row // k)
    h = h.reshape(-1, 2, inter)
    out = grouped_gemm(jax.nn.silu(h[:, 0]) * h[:, 1], down, layout.tile_experts)  # [padded, hidden]
    out = out[layout.row_of_pair].astype(jnp.float32) * weights.reshape(-1)[:, None]
    return jnp.sum(out.reshape(tokens, k, hidden), axis=1).astype(x.dtype)


# --moe-backend's names (EngineArgs.moe_backend; "auto" is resolved at engine set-up).
EXPERT_BACKENDS = {"ragged_dot": experts_forward, "pallas": grouped_gemm_experts}


def moe_reference(x: jax.Array, router: jax.Array, gate_up: jax.Array, down: jax.Array, top_k: int,
                  normalize: bool) -> jax.Array:
    """The same block token by token with dense per-expert products: the test oracle."""
    ids, weights = route(x, router, top_k, normalize)
    h = jnp.einsum("th,tkhci->tkci", x, gate_up[ids])
    act = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
    out = jnp.einsum("tki,tkih->tkh", act, down[ids]).astype(jnp.float32)
    return jnp.sum(out * weights[..., None], axis=1).astype(x.dtype)


class MoE(nnx.Module):
    """The sparse block in place of a decoder layer's MLP: same call, same single all-reduce."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype) -> None:
        h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        if cfg.moe_backend not in EXPERT_BACKENDS:
            raise ValueError(f"moe_backend must be one of {tuple(EXPERT_BACKENDS)}, got {cfg.moe_backend!r}")
        self.backend = cfg.moe_backend
        self.router = nnx.Param(jnp.zeros((h, e), dtype), spec=P(None, None))
        self.gate_up = nnx.Param(jnp.zeros((e, h, 2, i), dtype), spec=P(None, None, None, "tp"))
        self.down = nnx.Param(jnp.zeros((e, i, h), dtype), spec=P(None, "tp", None))

    def __call__(self, x: jax.Array, collectives: Collectives) -> jax.Array:
        """x: [tokens, hidden] -> [tokens, hidden]."""
        ids, weights = route(x, self.router[...], self.top_k, self.normalize)
        specs = (P(), P(), P(), P(None, None, None, "tp"), P(None, "tp", None))
        experts = EXPERT_BACKENDS[self.backend]
        return collectives.sum_local(experts, (x, ids, weights, self.gate_up[...], self.down[...]), specs)
