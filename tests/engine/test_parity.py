"""Greedy tokens and prompt logits match Hugging Face transformers on tiny random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.layers.attention import AttentionBackend, AttentionMetadata
from minisgl_jax.layers.context import ForwardContext
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # engines of its own

CASES = [
    ("llama", dict(tie_word_embeddings=False)),  # llama3 rope scaling
    ("qwen2", dict(tie_word_embeddings=True)),  # qkv bias
    ("qwen3", dict(tie_word_embeddings=True)),  # q/k norm, head_dim != hidden / heads
    ("qwen3", dict(tie_word_embeddings=False)),
    ("mistral", dict(tie_word_embeddings=False)),
]
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71))]


def full_logits(engine: Engine, token_ids: list[int]) -> np.ndarray:
    """Logits at every prompt position, through our model with the reference attention."""
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
    collectives = engine.runner.collectives.for_step(False, engine.runner.state.all_reduce_seq)
    hidden, _ = model(ids, pool, ForwardContext(jnp.arange(n, dtype=jnp.int32), meta, backend, False, collectives))
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("arch,overrides", CASES, ids=[f"{a}-tied{o['tie_word_embeddings']}" for a, o in CASES])
def test_greedy_tokens_and_logits_match_transformers(tmp_path, arch, overrides):
    path = save_tiny_checkpoint(str(tmp_path / arch), arch, seed=1, **overrides)
    engine = Engine(EngineArgs(
        model=path, dtype="float32", attention_backend="reference", cache="naive", num_pages=64, page_size=16,
        max_running_requests=4, max_prefill_tokens=64, compile_cache_dir=None, warmup=False,
    ))
    hf = getattr(transformers, type(transformers.AutoConfig.from_pretrained(path)).__name__.replace("Config", "ForCausalLM"))
    hf_model = hf.from_pretrained(path, torch_dtype=torch.float32).eval()

    ours = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=0
            )[0, len(prompt):].tolist()
            ref_logits = hf_model(torch.tensor([prompt])).logits[0].numpy()
        assert got == ref
        logits = full_logits(engine, prompt)
        err = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
        assert err < 1e-4, err
    engine.check_kv_invariant()
