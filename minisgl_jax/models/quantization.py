"""FP8 weights: the checkpoint formats read, the scale layout kept on the device, and the two matmul paths.

Formats (config.json's `quantization_config`):
  fp8                 block-wise (`weight_block_size: [out, in]`, Qwen3-*-FP8, DeepSeek): `weight` F8_E4M3
                      [out, in] and `weight_scale_inv` float32 [ceil(out/bo), ceil(in/bi)], the weight being
                      fp8 * scale_inv per block; without a block size, one `weight_scale` per tensor.
                      `activation_scheme` dynamic, or static with an `input_scale` per tensor.
  compressed-tensors  one config group of 8-bit float weights (llm-compressor's FP8_DYNAMIC, FP8, FP8_BLOCK):
                      `weight_scale` [out, 1] (channel), scalar (tensor) or [out/bo, in/bi] (block); input
                      activations dynamic (per token or per group) or static per tensor (`input_scale`).

On the device every linear weight stays FP8 in its usual layout (models/transformer.py) beside a
float32 scale whose every axis is the weight's size or that size divided by a whole ratio: all 1s
per tensor (the stacked k/v or gate/up axis excepted, each its own tensor), the output axes per
channel, and for blocks the input axes reduced by the block and the output axes expanded to one
scale per channel at load (exact). `dequantize` multiplies each axis's groups by their scale, so one
function serves all three, and a scale shards with its weight's PartitionSpec (`scale_spec`).
A mixture's experts (models/moe.py) are the same layouts stacked over a leading expert axis, each
expert its own tensors: gate_up [experts, hidden, 2, inter] beside [experts, hidden / block or 1, 2,
inter or 1], down [experts, inter, hidden] beside [experts, inter / block or 1, hidden or 1]. The
router stays in the model dtype, and the experts never run the FP8 GEMM path (their static input
scales are not read): models/moe.py dequantizes them or hands them to the Pallas grouped GEMM.

Paths (`QuantConfig.fp8_gemm`, set per device at start-up, a test may force it on a CPU):
  dequantize  einsum(x, dequantize(w, scale)), activations unquantized (a static input_scale is not
              used): CPUs, block-wise weights everywhere, weight-only checkpoints. On a GPU XLA may
              fuse the convert into its GEMM's operand (its Triton GEMM fusions take FP8 operands) or
              materialize the dequantized weight each step; which one, and whether a Pallas
              block-scaled GEMM is needed, is a GPU measurement (benchmarks/RESULTS.md, pending runs).
  fp8 GEMM    per-channel or per-tensor weight scales on GPUs of compute capability >= 8.9: the
              activations quantized (dynamic: per token, amax / 448; static: the checkpoint's
              input_scale), one einsum of two float8_e4m3fn operands accumulated in float32 (XLA
              rewrites it into a cuBLASLt FP8 GEMM), then times x_scale * w_scale.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
METHODS = ("fp8", "compressed-tensors")
STRATEGIES = ("tensor", "channel", "block")
MIN_FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores


@dataclass(frozen=True)
class QuantConfig:
    """What a checkpoint's `quantization_config` says about its FP8 linear weights, and the path to run."""

    method: str  # one of METHODS
    strategy: str  # weight scales: one of STRATEGIES
    block: tuple[int, int] | None  # (out, in) of a block, strategy "block" only
    # "dynamic" (quantized per token at run time), "static" (the checkpoint's input_scale per tensor)
    # or "none" (weight-only: activations stay in the model dtype, so the dequantize path runs)
    activations: str
    ignore: tuple[str, ...] = ()  # modules left unquantized: names, parents, or "re:" patterns
    fp8_gemm: bool = False  # run the FP8 GEMM path where the weight scales allow it

    @classmethod
    def from_hf(cls, qc: dict[str, Any]) -> "QuantConfig":
        """Parse config.json's `quantization_config`; ValueError names the field that is not supported."""
        method = qc.get("quant_method")
        if method == "fp8":
            return cls._from_fp8(qc)
        if method == "compressed-tensors":
            return cls._from_compressed_tensors(qc)
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported; supported: {METHODS}")

    @classmethod
    def _from_fp8(cls, qc: dict[str, Any]) -> "QuantConfig":
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt {qc['fmt']!r} is not supported; supported: 'e4m3'")
        block = qc.get("weight_block_size")
        if block is not None:
            block = _block(block, "quantization_config.weight_block_size")
            if scheme != "dynamic":
                raise ValueError("quantization_config: block-wise weights take dynamic activations only, "
                                 f"got activation_scheme {scheme!r}")
        ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
        return cls("fp8", "tensor" if block is None else "block", block, scheme, ignore)

    @classmethod
    def _from_compressed_tensors(cls, qc: dict[str, Any]) -> "QuantConfig":
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise ValueError(f"quantization_config.config_groups: exactly one group is supported, got {len(groups)}")
        (name, group), = groups.items()
        where = f"quantization_config.config_groups.{name}"
        if group.get("targets") != ["Linear"]:
            raise ValueError(f"{where}.targets must be ['Linear'], got {group.get('targets')!r}")
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(f"{where}.weights must be 8-bit float (FP8), got type {weights.get('type')!r} "
                             f"num_bits {weights.get('num_bits')!r}")
        strategy = weights.get("strategy")
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported; supported: {STRATEGIES}")
        block = _block(weights.get("block_structure"), f"{where}.weights.block_structure") if strategy == "block" else None
        acts = group.get("input_activations")
        activations = "none"
        if acts is not None:
            if acts.get("type") != "float" or acts.get("num_bits") != 8:
                raise ValueError(f"{where}.input_activations must be 8-bit float, got type {acts.get('type')!r}")
            activations = "dynamic" if acts.get("dynamic", False) else "static"
            if activations == "static" and acts.get("strategy") != "tensor":
                raise ValueError(f"{where}.input_activations: static scales must be per tensor, "
                                 f"got strategy {acts.get('strategy')!r}")
        if group.get("output_activations") is not None:
            raise ValueError(f"{where}.output_activations (quantized outputs) is not supported")
        return cls("compressed-tensors", strategy, block, activations, tuple(qc.get("ignore") or ()))

    @classmethod
    def dummy(cls) -> "QuantConfig":
        """Random weights' format (`--load-format dummy --quantization fp8`): block-wise 128 x 128, as Qwen3-*-FP8."""
        return cls("fp8", "block", (128, 128), "dynamic")

    @property
    def scale_name(self) -> str:
        """The checkpoint's name of a weight's scale tensor (DeepSeek's block format calls it the inverse)."""
        return "weight_scale_inv" if self.method == "fp8" and self.strategy == "block" else "weight_scale"

    @property
    def uses_fp8_gemm(self) -> bool:
        """Whether the linear layers quantize their activations and run FP8 GEMMs (block scales and
        weight-only checkpoints never do)."""
        return self.fp8_gemm and self.strategy != "block" and self.activations != "none"

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint module (e.g. 'model.layers.0.self_attn.q_proj') holds FP8 weights."""
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return False
            elif module == pattern or module.endswith("." + pattern) or module.startswith(pattern + "."):
                return False
        return True

    def quantizes_all(self, modules: list[str], weight: str) -> bool:
        """Whether the weight `weight`, built from these checkpoint modules, holds FP8: all of them or none."""
        fp8 = self.quantizes(modules[0])
        odd = next((m for m in modules[1:] if self.quantizes(m) != fp8), None)
        if odd is not None:
            raise ValueError(f"{modules[0]} and {odd} share one weight ({weight}) but the ignore list quantizes "
                             f"only {'the first' if fp8 else 'the second'}")
        return fp8

    def for_devices(self, devices: list) -> "QuantConfig":
        """This config with the path these devices run; a GPU without FP8 support is refused."""
        device = devices[0]
        if device.platform != "gpu":
            return dataclasses.replace(self, fp8_gemm=False)
        capability = tuple(int(p) for p in str(getattr(device, "compute_capability", "0.0")).split("."))
        if capability < MIN_FP8_CAPABILITY:
            raise ValueError(
                f"FP8 weights need a GPU of compute capability >= 8.9 (Ada, Hopper); {device.device_kind} "
                f"has {'.'.join(map(str, capability))}"
            )
        return dataclasses.replace(self, fp8_gemm=True)


def _block(value: Any, field: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"{field} must be two positive integers [out, in], got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class LinearLayout:
    """One of our linear weights as built from the checkpoint's [out, in] tensors: each module's transpose,
    its input split into `in_shape` and output into `out_shape`, several modules stacked on the axis
    after the input axes, and the first output axis repeated `replicas` times (KV heads under tp).
    With `experts` > 0 all that is one expert's, stacked over the experts on a leading axis."""

    modules: tuple[str, ...]  # under the layer, e.g. ('self_attn.k_proj', 'self_attn.v_proj'); '{e}': the expert
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  # one module's, before replication
    replicas: int = 1
    experts: int = 0  # a mixture's experts (models/moe.py), 0 for a plain linear

    @property
    def stack(self) -> tuple[int, ...]:
        return (len(self.modules),) if len(self.modules) > 1 else ()

    @property
    def lead(self) -> tuple[int, ...]:
        return (self.experts,) if self.experts else ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lead + self.in_shape + self.stack + (self.out_shape[0] * self.replicas,) + self.out_shape[1:]

    def scale_shape(self, quant: QuantConfig) -> tuple[int, ...]:
        """The device scale's shape: the weight's, input axes reduced (1 per channel and tensor; by the block)."""
        out = (self.out_shape[0] * self.replicas,) + self.out_shape[1:]
        if quant.strategy == "tensor":
            return self.lead + (1,) * len(self.in_shape) + self.stack + (1,) * len(out)
        ins = input_block_shape(self.in_shape, quant.block[1]) if quant.strategy == "block" else (1,) * len(self.in_shape)
        return self.lead + ins + self.stack + out

    def expert(self, e: int) -> "LinearLayout":
        """Expert e's own layout: its module names, no expert axis."""
        return dataclasses.replace(self, modules=tuple(m.format(e=e) for m in self.modules), experts=0)

    def module_names(self, prefix: str) -> list[str]:
        """The checkpoint modules this weight is built from (every expert's), each `prefix` + name."""
        layouts = [self.expert(e) for e in range(self.experts)] if self.experts else [self]
        return [prefix + m for layout in layouts for m in layout.modules]


def scale_spec(weight_spec: P, shape: tuple[int, ...]) -> P:
    """A scale shards like its weight, except along the axes where it has one entry (broadcast)."""
    return P(*(axis if n > 1 else None for axis, n in zip(weight_spec, shape)))


def input_block_shape(in_shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The scale's sizes over a weight's input axes (flattened row-major, `block` elements a block).

    A block must cover whole trailing axes or split one evenly; an input shorter than the block is one block."""
    remaining = min(block, math.prod(in_shape))
    sizes = []
    for n in reversed(in_shape):
        if remaining >= n and remaining % n == 0:
            sizes.append(1)
            remaining //= n
        elif remaining < n and n % remaining == 0:
            sizes.append(n // remaining)
            remaining = 1
        else:
            raise ValueError(f"FP8 block of {block} inputs does not tile an input of shape {in_shape}")
    return tuple(reversed(sizes))


def dequantize(w: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """w (FP8, any shape) times its scale (each axis w's size / a whole ratio), in `dtype`."""
    split, scale_split = [], []
    for n, s in zip(w.shape, scale.shape):
        split += [s, n // s]
        scale_split += [s, 1]
    full = w.astype(jnp.float32).reshape(split) * scale.reshape(scale_split)
    return full.reshape(w.shape).astype(dtype)


def quantize_activations(x: jax.Array, axes: tuple[int, ...], input_scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """x -> (FP8 x, float32 scale): per row over `axes` (amax / 448) or the static per-tensor input_scale."""
    x32 = x.astype(jnp.float32)
    if input_scale is None:
        amax = jnp.max(jnp.abs(x32), axis=axes, keepdims=True)
        scale = jnp.maximum(amax, 1e-12) / FP8_MAX
    else:
        scale = input_scale.astype(jnp.float32)
    return jnp.clip(x32 / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE), scale


def _onto(values: jax.Array, sub: str, out: str) -> jax.Array:
    """values (axes named by `sub`, the contracted ones of size 1) broadcastable onto the output `out`."""
    if values.ndim == 0:
        return values
    sizes = dict(zip(sub, values.shape))
    return values.reshape([sizes[c] if c in sizes and c in out else 1 for c in out])


def fp8_einsum(equation: str, x: jax.Array, w: jax.Array, scale: jax.Array,
               input_scale: jax.Array | None) -> jax.Array:
    """The FP8 GEMM path: einsum(x, w * scale) with x quantized too, in x's dtype.

    scale must be 1 on every contracted axis (per channel or per tensor); the equation's output lists
    x's free axes, then w's, in their order (as every linear of models/transformer.py does)."""
    inputs, out = equation.split("->")
    x_sub, w_sub = inputs.split(",")
    contracted = set(x_sub) & set(w_sub) - set(out)
    xq, x_scale = quantize_activations(x, tuple(i for i, c in enumerate(x_sub) if c in contracted), input_scale)
    y = jnp.einsum(equation, xq, w, preferred_element_type=jnp.float32)
    return (y * _onto(x_scale, x_sub, out) * _onto(scale, w_sub, out)).astype(x.dtype)


def linear(equation: str, x: jax.Array, w: jax.Array, scale: jax.Array | None, input_scale: jax.Array | None,
           quant: QuantConfig | None) -> jax.Array:
    """einsum(equation, x, w) for a plain weight (scale None) or an FP8 one on the path `quant` picks."""
    if scale is None:
        return jnp.einsum(equation, x, w)
    if quant is not None and quant.uses_fp8_gemm:
        return fp8_einsum(equation, x, w, scale, input_scale)
    return jnp.einsum(equation, x, dequantize(w, scale, x.dtype))
