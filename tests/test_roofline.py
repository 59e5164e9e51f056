"""benchmarks/roofline.py's decode floor: a mixture of experts' steps read only the experts hit."""

import os
import sys
from pathlib import Path

import pytest

from minisgl_jax.models.config import ModelConfig, bundled_config_path, read_hf_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from roofline import Experts, decode_roofline_bytes  # noqa: E402


def test_one_token_reads_top_k_experts_and_a_large_batch_reads_them_all():
    experts = Experts(bytes=128 * 1000, num_experts=128, top_k=8)
    assert experts.bytes_read(1) == pytest.approx(8 * 1000)
    assert experts.bytes_read(4096) == pytest.approx(128 * 1000)
    assert experts.bytes_read(1) < experts.bytes_read(2) < 2 * experts.bytes_read(1)  # two tokens may share


def test_the_floor_counts_dense_weights_every_step_and_experts_by_live_requests():
    experts = Experts(bytes=600, num_experts=6, top_k=1)
    # Two requests: both live for 1 step, one for a second; KV 10 bytes a token.
    want = (1000 - 600 + experts.bytes_read(2) + (3 + 5) * 10) + (1000 - 600 + experts.bytes_read(1) + 6 * 10)
    assert decode_roofline_bytes([3, 5], [1, 2], 10, 1000, experts) == int(want)
    assert decode_roofline_bytes([3, 5], [1, 2], 10, 1000) == 1000 + 80 + 1000 + 60


def test_experts_of_a_bundled_config():
    path = bundled_config_path("Qwen/Qwen3-30B-A3B")
    cfg = ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path)))
    experts = Experts.of(cfg, "bfloat16")
    assert experts.num_experts == 128 and experts.top_k == 8
    assert experts.bytes == 48 * 128 * 3 * 2048 * 768 * 2  # 48 sparse layers of 128 experts, bf16
    assert Experts.of(cfg, "bfloat16", tp=2).bytes == experts.bytes // 2
