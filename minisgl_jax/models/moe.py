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

Parallelism (`--moe-parallel`; attention stays as it is either way). Tokens are replicated on every
device at the block's input (attention's output is all-reduced), so neither choice exchanges tokens:
each device computes a partial [T, hidden] sum and one all-reduce per layer adds them up through the
step's `Collectives.sum_local`, as the dense MLP's down projection does. No all-to-all.
  tp  every expert tensor-parallel like the dense MLP (gate/up column-parallel, down row-parallel over
      the expert's intermediate dim): each device holds a slice of every expert and computes every
      routed pair, so the load is balanced whatever the routing. The price: each expert's matrices
      get thin at large tp (Qwen3-30B-A3B's 768 columns / tp), and every device reads a slice of
      every expert hit.
  ep  whole experts per device (experts / tp of them; the expert count must divide by tp): a device
      computes only the pairs routed to its own experts, on full-width matrices, and the other pairs
      add zero. The price: a device's work follows the routing, so the step waits for the device
      whose experts got the most pairs. Its grouped GEMMs keep all T*k rows (static shapes), the
      other devices' pairs sorted past the group sizes' sum and masked: the generic lowering computes
      them against each local expert ([experts / tp, T*k, hidden]), and whether the cuDNN fusion
      skips them is for the GPU to show. Fewer experts per device than top-k is fine.
`tp` is the default until the GPU runs (benchmarks/RESULTS.md) say which is faster.

Weights: router [hidden, experts]; gate_up [experts, hidden, 2, inter]; down [experts, inter, hidden].
FP8 checkpoints (Qwen3-30B-A3B-FP8 and the like) keep the experts float8_e4m3fn beside their float32
scales `gate_up_scale` / `down_scale` (models/quantization.py's layout with a leading expert axis;
`expert_layouts`), sharded with them; the router stays in the model dtype, as vLLM keeps it. Under
--moe-parallel tp a block-wise scale of `down` is sliced along its input blocks, so each device's
slice of the intermediate dim must be whole blocks (the loader refuses it otherwise; ep keeps
experts whole). `ragged_dot` dequantizes the experts into the model dtype before its products: exact,
fine on a CPU, but on a GPU it reads the FP8 experts and writes and reads them again dequantized,
more traffic than bf16 experts would take. `pallas` is the FP8 path: the kernel converts each loaded
FP8 tile and applies the scales (per K block for block-wise ones) to its float32 sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from minisgl_jax.kernels.grouped_gemm import align_to_tiles, default_block_m, grouped_gemm
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.models.config import ModelConfig
from minisgl_jax.models.quantization import FP8_DTYPE, LinearLayout, dequantize, scale_spec

# The sparse block's checkpoint names under a layer: (block, router, (gate, up, down) of expert {e}).
EXPERT_NAMES = {
    "qwen3_moe": ("mlp", "gate", ("experts.{e}.gate_proj", "experts.{e}.up_proj", "experts.{e}.down_proj")),
    "mixtral": ("block_sparse_moe", "gate", ("experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")),
}


def expert_layouts(cfg: ModelConfig) -> dict[str, LinearLayout]:
    """How gate_up and down are built from every expert's checkpoint tensors (the loader's and the scales' shapes)."""
    block, _, (gate, up, down) = EXPERT_NAMES[cfg.architecture]
    h, e, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    return {
        "gate_up": LinearLayout((f"{block}.{gate}", f"{block}.{up}"), (h,), (i,), experts=e),
        "down": LinearLayout((f"{block}.{down}",), (i,), (h,), experts=e),
    }


def route(x: jax.Array, router: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """x: [tokens, hidden], router: [hidden, experts] -> (expert ids [tokens, k] int32, weights [tokens, k] f32).

    The logits in x's dtype, then a float32 softmax, as transformers computes them."""
    probs = jax.nn.softmax(jnp.dot(x, router).astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def experts_forward(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array,
    first_expert: jax.Array | int = 0, gate_up_scale: jax.Array | None = None, down_scale: jax.Array | None = None,
) -> jax.Array:
    """The weighted sum of each token's experts: x [T, hidden], ids/weights [T, k] -> [T, hidden] in x's dtype.

    gate_up [local, hidden, 2, inter] and down [local, inter, hidden] hold experts first_expert ..
    first_expert + local - 1 (all of them, or one device's under expert parallelism), and may be one
    shard of the intermediate dim (tensor parallelism): the result is then this shard's partial sum,
    the pairs routed to other experts adding zero. FP8 experts come with their scales and are
    dequantized into x's dtype first (on a GPU more bytes than bf16 experts: the pallas backend is
    the FP8 path)."""
    if gate_up_scale is not None:
        gate_up = dequantize(gate_up, gate_up_scale, x.dtype)
    if down_scale is not None:
        down = dequantize(down, down_scale, x.dtype)
    tokens, k = ids.shape
    local, hidden, _, inter = gate_up.shape
    flat_ids = ids.reshape(-1) - first_expert
    mine = (flat_ids >= 0) & (flat_ids < local)
    # Other devices' pairs sort last, as group `local` (no such expert here): they lie past the group
    # sizes' sum, where ragged_dot's rows are not ours to trust (zeros on CPU), and are masked.
    groups = jnp.where(mine, flat_ids, local)
    order = jnp.argsort(groups, stable=True)  # pair positions (token * k + slot) in expert order
    group_sizes = jnp.bincount(groups, length=local + 1)[:local].astype(jnp.int32)
    h = jax.lax.ragged_dot(x[order // k], gate_up.reshape(local, hidden, 2 * inter), group_sizes)
    h = h.reshape(-1, 2, inter)
    act = jax.nn.silu(h[:, 0]) * h[:, 1]
    out = jax.lax.ragged_dot(act, down, group_sizes)  # [T*k, hidden], expert order
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    out = jnp.where(mine[order][:, None], out, 0.0)
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return jnp.sum(unsorted.reshape(tokens, k, hidden), axis=1).astype(x.dtype)


def _kernel_scale(scale: jax.Array | None, w: jax.Array) -> jax.Array | None:
    """An expert weight's scale [local, in blocks or 1, out axes or 1s] as the kernel's [local, k_blocks, N]."""
    if scale is None:
        return None
    return jnp.broadcast_to(scale, scale.shape[:2] + w.shape[2:]).reshape(*scale.shape[:2], -1)


def grouped_gemm_experts(
    x: jax.Array, ids: jax.Array, weights: jax.Array, gate_up: jax.Array, down: jax.Array,
    first_expert: jax.Array | int = 0, gate_up_scale: jax.Array | None = None, down_scale: jax.Array | None = None,
) -> jax.Array:
    """`experts_forward` through the Pallas grouped GEMM (kernels/src/grouped_gemm.py): the same
    inputs and result, reading only the experts that some token is routed to; FP8 experts stay FP8
    in memory, the kernel applying their scales.

    The pairs go to the kernel's padded, expert-grouped order once; gate/up gathers x's rows there
    inside the kernel, down takes the activations in that order, and each pair's row is read back.
    Pairs routed to another device's experts (expert parallelism) form one extra group whose tiles
    are marked unused: the kernel skips them and their rows are masked to zero."""
    tokens, k = ids.shape
    local, hidden, _, inter = gate_up.shape
    flat_ids = ids.reshape(-1) - first_expert
    mine = (flat_ids >= 0) & (flat_ids < local)
    layout = align_to_tiles(jnp.where(mine, flat_ids, local), local + 1, default_block_m(tokens * k, local))
    tile_experts = jnp.where(layout.tile_experts == local, -1, layout.tile_experts)
    h = grouped_gemm(x, gate_up.reshape(local, hidden, 2 * inter), tile_experts, layout.pair_of_row // k,
                     _kernel_scale(gate_up_scale, gate_up))
    h = h.reshape(-1, 2, inter)
    out = grouped_gemm(jax.nn.silu(h[:, 0]) * h[:, 1], down, tile_experts, None,
                       _kernel_scale(down_scale, down))  # [padded, hidden]
    out = out[layout.row_of_pair].astype(jnp.float32) * weights.reshape(-1)[:, None]
    out = jnp.where(mine[:, None], out, 0.0)
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


# (gate_up, down) of each `--moe-parallel`: tp slices every expert's intermediate dim over the devices
# (gate/up column-parallel, down row-parallel); ep shards the expert axis, whole experts per device.
EXPERT_SPECS = {
    "tp": (P(None, None, None, "tp"), P(None, "tp", None)),
    "ep": (P("tp", None, None, None), P("tp", None, None)),
}
EXPERT_WEIGHTS = ("gate_up", "down", "gate_up_scale", "down_scale")  # the parameters the backends take


class MoE(nnx.Module):
    """The sparse block in place of a decoder layer's MLP: same call, same single all-reduce; its
    experts placed by `cfg.moe_parallel` (EXPERT_SPECS), FP8 with their scales when the checkpoint's are."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, layer: int) -> None:
        h, e = cfg.hidden_size, cfg.num_experts
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        if cfg.moe_backend not in EXPERT_BACKENDS:
            raise ValueError(f"moe_backend must be one of {tuple(EXPERT_BACKENDS)}, got {cfg.moe_backend!r}")
        self.backend = cfg.moe_backend
        self.router = nnx.Param(jnp.zeros((h, e), dtype), spec=P(None, None))
        layouts = expert_layouts(cfg)
        for name, spec in zip(("gate_up", "down"), EXPERT_SPECS[cfg.moe_parallel]):
            self._expert_weight(name, layouts[name], f"model.layers.{layer}.", cfg, dtype, spec)
        self.num_experts = e

    def _expert_weight(self, name: str, layout: LinearLayout, prefix: str, cfg: ModelConfig, dtype: jnp.dtype,
                       spec: P) -> None:
        """Set self.<name> (every expert's, stacked) and self.<name>_scale (None unless the checkpoint's are FP8)."""
        quant = cfg.quantization
        fp8 = quant is not None and quant.quantizes_all(layout.module_names(prefix), name)
        setattr(self, name, nnx.Param(jnp.zeros(layout.shape, FP8_DTYPE if fp8 else dtype), spec=spec))
        scale = None
        if fp8:
            try:
                shape = layout.scale_shape(quant)
            except ValueError as err:
                raise ValueError(f"{prefix}{layout.expert(0).modules[0]}: {err}") from None
            scale = nnx.Param(jnp.zeros(shape, jnp.float32), spec=scale_spec(spec, shape))
        setattr(self, f"{name}_scale", scale)

    def __call__(self, x: jax.Array, collectives: Collectives) -> jax.Array:
        """x: [tokens, hidden] -> [tokens, hidden]."""
        ids, weights = route(x, self.router[...], self.top_k, self.normalize)
        params = {name: getattr(self, name) for name in EXPERT_WEIGHTS if getattr(self, name) is not None}
        experts = {name: p[...] for name, p in params.items()}
        specs = {name: p.spec for name, p in params.items()}
        return collectives.sum_local(self._local_experts, (x, ids, weights, experts), (P(), P(), P(), specs))

    def _local_experts(self, x: jax.Array, ids: jax.Array, weights: jax.Array,
                       experts: dict[str, jax.Array]) -> jax.Array:
        """One device's partial sum; under expert parallelism its experts start at its index times their count."""
        local = experts["gate_up"].shape[0]
        first = 0 if local == self.num_experts else jax.lax.axis_index("tp") * local
        return EXPERT_BACKENDS[self.backend](x, ids, weights, experts["gate_up"], experts["down"], first,
                                             experts.get("gate_up_scale"), experts.get("down_scale"))
