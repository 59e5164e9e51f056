"""The decoder-only transformer of the Llama family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, and the
mixtures of experts Qwen3-MoE and Mixtral (whose sparse layers take models/moe.py's block for the MLP).

One Flax NNX module tree covers them all; the differences are config flags (qkv bias, q/k norm,
tied embeddings, rope scaling). Each parameter declares its `PartitionSpec` over the `tp` mesh
axis beside it (`spec=`): column-parallel q/kv/gate_up, row-parallel o/down, vocab-parallel
embedding and lm_head. Layouts put the head axes first-class so sharding is by heads:

  embed [vocab, hidden]          q_proj [hidden, q_heads, head_dim]   kv_proj [hidden, 2, kv_heads, head_dim]
  o_proj [q_heads, head_dim, hidden]   gate_up [hidden, 2, intermediate]   down [intermediate, hidden]

With an FP8 checkpoint (`cfg.quantization`) each of those five linear weights is a float8_e4m3fn
parameter `<name>` beside its float32 `<name>_scale` (and `<name>_input_scale` for static activation
scales); models/quantization.py has the layouts and the matmul paths. Embedding, lm_head and norms
stay in the model dtype. A sparse layer's experts are FP8 the same way (models/moe.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from minisgl_jax.layers.attention import KVScales
from minisgl_jax.layers.collectives import Collectives
from minisgl_jax.layers.context import ForwardContext
from minisgl_jax.models.config import ModelConfig
from minisgl_jax.models.moe import MoE
from minisgl_jax.models.quantization import FP8_DTYPE, LinearLayout, linear, scale_spec
from minisgl_jax.models.rope import apply_rope, rope_inv_freq

KVPool = list[tuple[jax.Array, jax.Array]]  # per layer (k_pages, v_pages)


def _param(shape: tuple[int, ...], dtype: jnp.dtype, spec: P) -> nnx.Param:
    """A parameter placeholder; the loader fills in the real (or dummy) values."""
    return nnx.Param(jnp.zeros(shape, dtype), spec=spec)


def linear_layouts(cfg: ModelConfig) -> dict[str, LinearLayout]:
    """How each linear weight is built from the checkpoint's tensors (the loader's and the scales' shapes)."""
    h, nq, d, i = cfg.hidden_size, cfg.num_q_heads, cfg.head_dim, cfg.intermediate_size
    nkv = cfg.num_kv_heads // cfg.kv_head_replicas  # as stored in the checkpoint
    return {
        "q_proj": LinearLayout(("self_attn.q_proj",), (h,), (nq, d)),
        "kv_proj": LinearLayout(("self_attn.k_proj", "self_attn.v_proj"), (h,), (nkv, d), cfg.kv_head_replicas),
        "o_proj": LinearLayout(("self_attn.o_proj",), (nq, d), (h,)),
        "gate_up": LinearLayout(("mlp.gate_proj", "mlp.up_proj"), (h,), (i,)),
        "down": LinearLayout(("mlp.down_proj",), (i,), (h,)),
    }


def _linear_params(module: nnx.Module, name: str, cfg: ModelConfig, layer: int, dtype: jnp.dtype, spec: P) -> None:
    """Set module.<name> to the linear weight `name` of `layer`: plain, or FP8 with its scale parameters."""
    layout = linear_layouts(cfg)[name]
    quant = cfg.quantization
    hf = layout.module_names(f"model.layers.{layer}.")
    fp8 = quant is not None and quant.quantizes_all(hf, name)
    setattr(module, name, _param(layout.shape, FP8_DTYPE if fp8 else dtype, spec))
    scale = input_scale = None
    if fp8:
        try:
            shape = layout.scale_shape(quant)
        except ValueError as err:
            raise ValueError(f"{hf[0]}: {err}") from None
        scale = _param(shape, jnp.float32, scale_spec(spec, shape))
        input_scale = _param((), jnp.float32, P()) if quant.activations == "static" else None
    setattr(module, f"{name}_scale", scale)
    setattr(module, f"{name}_input_scale", input_scale)


def _weights(module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """(weight, scale or None, input_scale or None) of the linear `name`."""
    scale, input_scale = getattr(module, f"{name}_scale"), getattr(module, f"{name}_input_scale")
    return (getattr(module, name)[...], None if scale is None else scale[...],
            None if input_scale is None else input_scale[...])


def _row_parallel(module: nnx.Module, name: str, equation: str, x: jax.Array, x_spec: P, w_spec: P,
                  collectives: Collectives) -> jax.Array:
    """A row-parallel linear through the step's collectives; an FP8 one runs per shard (dequantized or
    quantized locally: its scales are sharded with it) and its partial sums are added."""
    w, scale, input_scale = _weights(module, name)
    if scale is None:
        return collectives.matmul(equation, x, w, x_spec, w_spec)
    quant, s_spec = module.quant, scale_spec(w_spec, scale.shape)
    if input_scale is None:
        return collectives.sum_local(lambda x, w, s: linear(equation, x, w, s, None, quant),
                                     (x, w, scale), (x_spec, w_spec, s_spec))
    return collectives.sum_local(lambda x, w, s, i: linear(equation, x, w, s, i, quant),
                                 (x, w, scale, input_scale), (x_spec, w_spec, s_spec, P()))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, dtype: jnp.dtype) -> None:
        self.weight = _param((size,), dtype, P(None))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, layer: int) -> None:
        h, nq, nkv, d = cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        self.quant = cfg.quantization
        _linear_params(self, "q_proj", cfg, layer, dtype, P(None, "tp", None))
        _linear_params(self, "kv_proj", cfg, layer, dtype, P(None, None, "tp", None))
        _linear_params(self, "o_proj", cfg, layer, dtype, P("tp", None, None))
        self.q_bias = _param((nq, d), dtype, P("tp", None)) if cfg.qkv_bias else None
        self.kv_bias = _param((2, nkv, d), dtype, P(None, "tp", None)) if cfg.qkv_bias else None
        self.o_bias = _param((h,), dtype, P(None)) if cfg.o_bias else None
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.kv_scales = KVScales()  # the checkpoint's, set by the loader (models/kv_scales.py)

    def __call__(
        self, x: jax.Array, kv: tuple[jax.Array, jax.Array], inv_freq: jax.Array, ctx: ForwardContext
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x: [tokens, hidden] -> ([tokens, hidden], this layer's updated (k_pages, v_pages))."""
        q = linear("th,hnd->tnd", x, *_weights(self, "q_proj"), self.quant)
        kv_new = linear("th,hcnd->tcnd", x, *_weights(self, "kv_proj"), self.quant)
        if self.q_bias is not None:
            q = q + self.q_bias[...]
            kv_new = kv_new + self.kv_bias[...]
        k, v = kv_new[:, 0], kv_new[:, 1]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.positions, inv_freq)
        k = apply_rope(k, ctx.positions, inv_freq)
        k_pages, v_pages = ctx.backend.write_kv(kv[0], kv[1], k, v, ctx.attention, self.kv_scales)
        out = ctx.backend.attend(q, k_pages, v_pages, ctx.attention, is_decode=ctx.is_decode, scales=self.kv_scales)
        out = _row_parallel(self, "o_proj", "tnd,ndh->th", out, P(None, "tp", None), P("tp", None, None),
                            ctx.collectives)
        if self.o_bias is not None:
            out = out + self.o_bias[...]
        return out, (k_pages, v_pages)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, layer: int) -> None:
        self.quant = cfg.quantization
        _linear_params(self, "gate_up", cfg, layer, dtype, P(None, None, "tp"))
        _linear_params(self, "down", cfg, layer, dtype, P("tp", None))

    def __call__(self, x: jax.Array, collectives: Collectives) -> jax.Array:
        gate_up = linear("th,hci->tci", x, *_weights(self, "gate_up"), self.quant)
        act = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]
        return _row_parallel(self, "down", "ti,ih->th", act, P(None, "tp"), P("tp", None), collectives)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, index: int) -> None:
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, index)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MoE(cfg, dtype, index) if index in cfg.moe_layers else MLP(cfg, dtype, index)


class CausalLM(nnx.Module):
    """Embedding, decoder layers, final norm and lm_head (or the tied embedding)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype) -> None:
        self.config = cfg
        self.embed = _param((cfg.vocab_size, cfg.hidden_size), dtype, P("tp", None))
        self.layers = nnx.List([DecoderLayer(cfg, dtype, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings else _param((cfg.hidden_size, cfg.vocab_size), dtype, P(None, "tp"))
        )

    def __call__(self, input_ids: jax.Array, kv_pool: KVPool, ctx: ForwardContext) -> tuple[jax.Array, KVPool]:
        """input_ids: [tokens] (at ctx.positions) -> (final hidden states [tokens, hidden], updated pool).

        `ctx.collectives` adds the partial sums of the vocab-parallel embedding and the row-parallel layers."""
        x = ctx.collectives.embed(input_ids, self.embed[...])
        cfg = self.config
        inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        new_pool: KVPool = []
        for i, (layer, kv) in enumerate(zip(self.layers, kv_pool)):
            with jax.named_scope(f"layer{i}"):
                with jax.named_scope("attention"):
                    attn_out, kv = layer.attn(layer.input_norm(x), kv, inv_freq, ctx)
                x = x + attn_out
                with jax.named_scope("mlp"):
                    x = x + layer.mlp(layer.post_attn_norm(x), ctx.collectives)
            new_pool.append(kv)
        return self.norm(x), new_pool

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [rows, hidden] -> float32 logits [rows, vocab]."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, head, preferred_element_type=jnp.float32)
