"""Model configuration: the facts of a Hugging Face config.json that the engine needs."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from minisgl_jax.config import MOE_PARALLEL_MODES
from minisgl_jax.models.quantization import QuantConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
BUNDLED_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: bias on q/k/v only
    o_bias: bool  # Llama's attention_bias: bias on q/k/v and o
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k
    eos_token_ids: list[int] = field(default_factory=list)
    kv_head_replicas: int = 1  # >1 when tensor parallelism has more devices than KV heads
    moe_parallel: str = "tp"  # the experts over the tp devices: sliced ("tp") or whole ("ep"); set by for_tp
    # Mixture of experts (models/moe.py); num_experts 0 for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's
    norm_topk_prob: bool = False  # renormalize the top-k router probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the expert block; the rest are dense
    quantization: QuantConfig | None = None  # FP8 linear weights (config.json's quantization_config)
    moe_backend: str = "ragged_dot"  # the experts' grouped GEMM: "ragged_dot" or "pallas" (models/moe.py)

    def for_tp(self, tp: int, moe_parallel: str = "tp") -> "ModelConfig":
        """The config as sharded over `tp` devices: KV heads repeated when there are fewer than tp; a
        mixture of experts' experts sliced over the devices (`moe_parallel` "tp") or placed whole ("ep")."""
        if moe_parallel not in MOE_PARALLEL_MODES:
            raise ValueError(f"moe_parallel must be one of {MOE_PARALLEL_MODES}, got {moe_parallel!r}")
        for name, count in (("attention heads", self.num_q_heads), ("intermediate size", self.intermediate_size),
                            ("vocab size", self.vocab_size)):
            if count % tp:
                raise ValueError(f"--tp {tp} must divide the model's {name} ({count})")
        if moe_parallel == "tp" and self.moe_intermediate_size % tp:
            raise ValueError(
                f"--moe-parallel tp slices every expert over the devices: --tp {tp} must divide the model's "
                f"expert intermediate size ({self.moe_intermediate_size}); --moe-parallel ep keeps experts whole"
            )
        if moe_parallel == "ep" and self.num_experts % tp:
            raise ValueError(
                f"--moe-parallel ep places whole experts on each device: --tp {tp} must divide the model's "
                f"{self.num_experts} experts per layer; use --moe-parallel tp (experts sliced over the devices)"
            )
        cfg = dataclasses.replace(self, moe_parallel=moe_parallel)
        if self.num_kv_heads % tp == 0:
            return cfg
        if tp % self.num_kv_heads:
            raise ValueError(
                f"--tp {tp} must divide the model's key/value heads ({self.num_kv_heads}) or be a multiple of them"
            )
        replicas = tp // self.num_kv_heads
        return dataclasses.replace(cfg, num_kv_heads=tp, kv_head_replicas=replicas)

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Per token, over all layers, K and V, at `itemsize` bytes an element (the pool's dtype)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architectures {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_q_heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        legacy_scaling = cfg.get("rope_scaling")
        if legacy_scaling:
            rope.update(legacy_scaling)
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        num_layers = cfg["num_hidden_layers"]
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
        if arch == "mixtral":  # every layer sparse; intermediate_size is each expert's
            moe_layers = tuple(range(num_layers))
            moe_intermediate = cfg["intermediate_size"]
        elif arch == "qwen3_moe":  # transformers' Qwen3MoeDecoderLayer: sparse unless listed or off the step
            dense = set(cfg.get("mlp_only_layers") or [])
            step = cfg.get("decoder_sparse_step", 1)
            moe_layers = tuple(i for i in range(num_layers) if i not in dense and num_experts and (i + 1) % step == 0)
            moe_intermediate = cfg["moe_intermediate_size"]
        else:
            num_experts, moe_layers, moe_intermediate = 0, (), 0
        if moe_layers and not 1 <= cfg.get("num_experts_per_tok", 0) <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{num_experts} (the experts), "
                             f"got {cfg.get('num_experts_per_tok')}")
        quant = cfg.get("quantization_config")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_q_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_q_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=arch != "qwen2" and bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            eos_token_ids=eos_ids,
            num_experts=num_experts if moe_layers else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if moe_layers else 0,
            moe_intermediate_size=moe_intermediate if moe_layers else 0,
            norm_topk_prob=arch == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            quantization=None if quant is None else QuantConfig.from_hf(quant),
        )


def bundled_config_path(model: str) -> str | None:
    """The bundled config.json of a known hub id (e.g. Qwen/Qwen3-0.6B), for `--load-format dummy`."""
    name = model.rstrip("/").split("/")[-1]
    path = os.path.join(BUNDLED_CONFIG_DIR, f"{name}.json")
    return path if os.path.exists(path) else None


def bundled_model_names() -> list[str]:
    return sorted(f[: -len(".json")] for f in os.listdir(BUNDLED_CONFIG_DIR) if f.endswith(".json"))


def read_hf_config(model_dir: str, name: str = "config.json") -> dict[str, Any]:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {name} in {model_dir}")
    with open(path) as f:
        return json.load(f)
