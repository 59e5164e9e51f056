"""Mixture-of-experts models through the whole engine: transformers' tokens and logits at tp=2 and 4,
experts tensor- or expert-parallel (tp=1: test_parity.py's CASES); a batch (radix cache, chunked prefill, overlap, bursts, seeded
sampling with and without top-p) equals each prompt alone."""

import numpy as np
import pytest
import torch
import transformers

from minisgl_jax.core import SamplingParams
from tiny_models import full_logits, save_tiny_checkpoint, tiny_engine

pytestmark = pytest.mark.slow  # engines of its own

HF_CLASSES = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM}
PROMPT = list(range(30, 71))
TP_CASES = [("qwen3_moe", 2, "auto", "tp"), ("mixtral", 4, "psum", "tp"), ("qwen3_moe", 2, "psum", "ep"),
            ("mixtral", 4, "auto", "ep")]


@pytest.mark.parametrize("arch,tp,all_reduce,moe_parallel", TP_CASES,
                         ids=[f"{a}-tp{t}-{r}-{m}" for a, t, r, m in TP_CASES])
def test_parallel_moe_matches_transformers(tmp_path, arch, tp, all_reduce, moe_parallel):
    """`tp`: every expert sharded over the devices along its intermediate dim; `ep`: whole experts per
    device (Mixtral's 4 at tp=4: one each, fewer than top-2, and each batch-1 decode step leaves at
    least two devices without a pair). `psum` runs the experts' partial sums per shard (the path of
    the GPUs' peer all-reduce), `auto` leaves them to XLA on CPU."""
    path = save_tiny_checkpoint(str(tmp_path / arch), arch, seed=4)
    engine = tiny_engine(path, cache="naive", num_pages=64, page_size=16, max_running_requests=4,
                         max_prefill_tokens=64, tp=tp, all_reduce=all_reduce, moe_parallel=moe_parallel)
    hf_model = HF_CLASSES[arch].from_pretrained(path, torch_dtype=torch.float32).eval()
    [got] = engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, min_new_tokens=16,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
        ref_logits = hf_model(torch.tensor([PROMPT])).logits[0].numpy()
    assert got == ref
    logits = full_logits(engine, PROMPT)
    assert np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits) < 1e-4
    engine.check_kv_invariant()


def mixed_requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that share prefixes (radix hits) and cross chunk boundaries; greedy and seeded rows."""
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 256, size=40).tolist()
    prompts = [shared + rng.integers(0, 256, size=int(n)).tolist() for n in (3, 17, 30)]
    prompts += [rng.integers(0, 256, size=int(n)).tolist() for n in (5, 60)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    ]
    return prompts, params


def test_moe_batch_equals_each_prompt_alone(tmp_path):
    path = save_tiny_checkpoint(str(tmp_path / "qwen3_moe"), "qwen3_moe", seed=3)
    prompts, params = mixed_requests()
    # The same buckets in both engines, so the second loads its programs from the session's compile cache.
    args = dict(num_pages=256, page_size=4, max_running_requests=8, max_prefill_tokens=16)
    alone_engine = tiny_engine(path, cache="naive", overlap=False, **args)
    alone = [alone_engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    engine = tiny_engine(path, cache="radix", **args)
    assert engine.generate(prompts, params) == alone
    assert engine.generate(prompts, params) == alone  # again, from the radix cache
    assert engine.stats()["burst_steps"] > 0 and engine.stats()["cache_hit_tokens"] > 0
    engine.check_kv_invariant()
