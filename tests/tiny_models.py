"""Tiny random-weight Hugging Face checkpoints, saved by `transformers` itself, for the tests."""

from __future__ import annotations

import os

TINY_SIZES = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
    rms_norm_eps=1e-6,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")


def save_tiny_checkpoint(path: str, arch: str = "qwen3", seed: int = 0, **config_overrides) -> str:
    """Save a random-weight checkpoint of `arch` to `path` (no tokenizer files) and return `path`.

    Llama gets llama3 rope scaling so that path is exercised; Qwen3 gets head_dim != hidden/heads.
    The mixtures of experts have 4 experts, top-2; Qwen3-MoE's layer 1 is dense (`mlp_only_layers`).
    """
    import torch
    import transformers

    sizes = dict(TINY_SIZES)
    if arch == "llama":
        cls, cfg_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
        sizes["rope_parameters"] = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    elif arch == "qwen2":
        cls, cfg_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
    elif arch == "qwen3":
        cls, cfg_cls = transformers.Qwen3ForCausalLM, transformers.Qwen3Config
        sizes["head_dim"] = 32
    elif arch == "mistral":
        cls, cfg_cls = transformers.MistralForCausalLM, transformers.MistralConfig
        sizes["sliding_window"] = None
    elif arch == "qwen3_moe":
        cls, cfg_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
        sizes.update(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     norm_topk_prob=True, mlp_only_layers=[1])
    elif arch == "mixtral":
        cls, cfg_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
        sizes.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=None)
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    sizes.update(config_overrides)
    torch.manual_seed(seed)
    model = cls(cfg_cls(**sizes)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so the parity tests see them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("mlp.gate.weight") or name.endswith("moe.gate.weight"):
                param.mul_(10.0)  # routers far from uniform, so no near-tie flips an expert choice
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_engine(path: str, **args):
    """An engine over a tiny checkpoint as the engine tests run it: float32, reference attention,
    no compile cache, no warm-up; `args` add or override EngineArgs fields."""
    from minisgl_jax.config import EngineArgs
    from minisgl_jax.engine import Engine

    base = dict(model=path, dtype="float32", attention_backend="reference", compile_cache_dir=None, warmup=False)
    return Engine(EngineArgs(**{**base, **args}))


def full_logits(engine, token_ids: list[int], jit: bool = False):
    """Logits at every position of `token_ids` ([len, vocab] numpy), through the engine's model
    with the reference attention, outside any step: what a step's logits must be. `jit` compiles
    the forward pass as one program (always under tp > 1), faster than eager ops for FP8 weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minisgl_jax.layers.attention import AttentionBackend, AttentionMetadata
    from minisgl_jax.layers.context import ForwardContext

    model = nnx.merge(engine.runner.graphdef, engine.runner.param_state())
    cfg = engine.model_config
    n = len(token_ids)
    pool = [(jnp.zeros((cfg.num_kv_heads, n + 1, 1, cfg.head_dim), jnp.float32),) * 2 for _ in range(cfg.num_layers)]
    meta = AttentionMetadata(
        cu_q_lens=jnp.array([0, n], jnp.int32),
        kv_lens=jnp.array([n], jnp.int32),
        page_table=jnp.arange(1, n + 1, dtype=jnp.int32)[None, :],
        slot_mapping=jnp.arange(1, n + 1, dtype=jnp.int32),
    )
    backend = AttentionBackend("reference", "reference", cfg.head_dim**-0.5,
                               dtype=jnp.float32, head_dim=cfg.head_dim, page_size=1)
    ids = jnp.array(token_ids, jnp.int32)

    def forward(model, ids, pool, meta, seq):
        collectives = engine.runner.collectives.for_step(False, seq)
        hidden, _ = model(ids, pool, ForwardContext(jnp.arange(n, dtype=jnp.int32), meta, backend, False, collectives))
        return model.logits(hidden)

    # Under tp > 1 one program: eager ops on sharded parameters each compile their own (seconds a call).
    run = jax.jit(forward) if jit or engine.runner.mesh.size > 1 else forward
    return np.asarray(run(model, ids, pool, meta, engine.runner.state.all_reduce_seq))
