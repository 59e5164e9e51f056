"""Checkpoint loading: sharded safetensors, bundled dummy configs, clear errors."""

import os

import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams
from minisgl_jax.engine import Engine
from minisgl_jax.models.config import ModelConfig, bundled_config_path, bundled_model_names, read_hf_config
from tiny_models import save_tiny_checkpoint

ARGS = dict(dtype="float32", attention_backend="reference", cache="naive", num_pages=32, max_running_requests=2,
            max_prefill_tokens=64, compile_cache_dir=None, warmup=False)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = save_tiny_checkpoint(str(tmp_path / "single"), "qwen2", seed=5)
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(single)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    prompt, params = [[3, 1, 4, 1, 5, 9, 2, 6]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert Engine(EngineArgs(model=sharded, **ARGS)).generate(prompt, params) == Engine(
        EngineArgs(model=single, **ARGS)).generate(prompt, params)


@pytest.mark.parametrize("name", bundled_model_names())
def test_bundled_configs_parse(name):
    path = bundled_config_path(f"org/{name}")
    cfg = ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))
    assert cfg.num_q_heads % cfg.num_kv_heads == 0 and cfg.head_dim in (64, 128)


def test_unknown_model_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="bundled"):
        Engine(EngineArgs(model="nobody/NoSuchModel", load_format="dummy", compile_cache_dir=None))
    with pytest.raises(ValueError, match="local folder"):
        Engine(EngineArgs(model="nobody/NoSuchModel", compile_cache_dir=None))
    with pytest.raises(ValueError, match="page_size"):
        Engine(EngineArgs(model=str(tmp_path), page_size=3))
