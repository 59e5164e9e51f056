"""Greedy tokens and prompt logits match Hugging Face transformers on tiny random checkpoints."""

import numpy as np
import pytest
import torch
import transformers

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from tiny_models import full_logits, save_tiny_checkpoint

pytestmark = pytest.mark.slow  # engines of its own

CASES = [
    ("llama", dict(tie_word_embeddings=False)),  # llama3 rope scaling
    ("qwen2", dict(tie_word_embeddings=True)),  # qkv bias
    ("qwen3", dict(tie_word_embeddings=True)),  # q/k norm, head_dim != hidden / heads
    ("qwen3", dict(tie_word_embeddings=False)),
    ("mistral", dict(tie_word_embeddings=False)),
    ("qwen3_moe", dict(tie_word_embeddings=False)),  # 4 experts, top-2, normalized; layer 1 dense
    ("mixtral", dict(tie_word_embeddings=False)),
]
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(30, 71))]


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
