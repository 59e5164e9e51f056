"""FP8 KV-cache scales come from the checkpoint under the exporters' names, and a malformed one is an
error naming its tensor (at load: tests/engine/test_fp8_kv_engine.py); a bad kv_cache_dtype is an error
naming the field."""

import numpy as np
import pytest

from minisgl_jax.config import EngineArgs
from minisgl_jax.layers.attention import KVScales
from minisgl_jax.models.kv_scales import read_kv_scales


class DictCheckpoint(dict):
    """Tensors by name, as SafetensorsCheckpoint serves them."""

    def get(self, name: str) -> np.ndarray:
        return self[name]


def attn(layer: int, name: str) -> str:
    return f"model.layers.{layer}.self_attn.{name}"


def test_each_exporters_names_are_read_and_missing_scales_are_one():
    checkpoint = DictCheckpoint({
        attn(0, "k_scale"): np.float32(0.5), attn(0, "v_scale"): np.array([2.0], np.float32),  # compressed-tensors
        attn(1, "k_proj.k_scale"): np.float32(0.25), attn(1, "v_proj.v_scale"): np.float32(4.0),  # ModelOpt
        attn(2, "k_proj.output_scale"): np.float32(3.0), attn(2, "v_proj.output_scale"): np.float32(5.0),
        attn(3, "kv_scale"): np.float32(1.5),  # the deprecated single scale: both
        attn(4, "k_scale"): np.float32(0.75),  # V absent: 1.0
    })
    assert read_kv_scales(checkpoint, 6) == [
        KVScales(0.5, 2.0), KVScales(0.25, 4.0), KVScales(3.0, 5.0), KVScales(1.5, 1.5), KVScales(0.75, 1.0),
        KVScales(1.0, 1.0),
    ]


@pytest.mark.parametrize(
    "value, match",
    [
        (np.ones(2, np.float32), r"must be a scalar .*shape \[2\]"),
        (np.ones((1, 1), np.float32), r"must be a scalar"),
        (np.float32(np.nan), "must be finite and > 0, got nan"),
        (np.float32(np.inf), "must be finite and > 0, got inf"),
        (np.float32(0.0), "must be finite and > 0, got 0.0"),
        (np.float32(-1.0), "must be finite and > 0, got -1.0"),
    ],
)
def test_a_malformed_scale_is_an_error_naming_the_tensor(value, match):
    checkpoint = DictCheckpoint({attn(0, "k_scale"): np.float32(1.0), attn(1, "v_proj.output_scale"): value})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.v_proj\.output_scale' " + match):
        read_kv_scales(checkpoint, 2)


@pytest.mark.parametrize("value", ["fp8", "float8_e4m3fn", "fp8_e5m2", ""])
def test_bad_kv_cache_dtype_names_the_field(value):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8_e4m3'\)"):
        EngineArgs(model="m", kv_cache_dtype=value).validate()
    EngineArgs(model="m", kv_cache_dtype="fp8_e4m3").validate()


def test_the_cli_flag_reaches_engine_args():
    from minisgl_jax.server.cli import parse_args

    assert parse_args(["--model", "m", "--kv-cache-dtype", "fp8_e4m3"])[0].kv_cache_dtype == "fp8_e4m3"
    assert parse_args(["--model", "m"])[0].kv_cache_dtype == "auto"
