"""benchmarks/tp_scaling.py's shardN runs: the config of one GPU's share of a tensor-parallel model."""

import sys
from pathlib import Path

import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine.setup import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tp_scaling import write_shard_config  # noqa: E402


def shard(model: str, tp: int, folder: Path):
    return resolve_model(EngineArgs(model=write_shard_config(model, tp, str(folder)), load_format="dummy"))[0]


def test_a_share_divides_what_tensor_parallelism_splits_and_keeps_the_rest(tmp_path):
    whole = resolve_model(EngineArgs(model="meta-llama/Llama-3.1-8B", load_format="dummy"))[0]
    half = shard("meta-llama/Llama-3.1-8B", 2, tmp_path)
    assert (half.num_q_heads, half.num_kv_heads, half.intermediate_size, half.vocab_size) == (16, 4, 7168, 64128)
    for field in ("architecture", "hidden_size", "num_layers", "head_dim", "rope_theta", "rope_scaling",
                  "rms_norm_eps", "tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
        assert getattr(half, field) == getattr(whole, field), field


@pytest.mark.parametrize("model,tp,kv_heads", [("Qwen/Qwen3-32B", 4, 2), ("Qwen/Qwen3-32B", 16, 1),
                                               ("Qwen/Qwen2.5-7B", 2, 2)])
def test_a_share_holds_one_kv_head_when_tp_outnumbers_them(tmp_path, model, tp, kv_heads):
    config = shard(model, tp, tmp_path)
    assert config.num_kv_heads == kv_heads
    assert config.qkv_bias == (model == "Qwen/Qwen2.5-7B")
