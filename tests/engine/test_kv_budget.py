"""Sizing the KV pool from the device's free memory, and what happens when the device cannot say."""

import logging
from types import SimpleNamespace

import numpy as np

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine.setup import CPU_DEFAULT_KV_PAGES, plan_kv_pages
from minisgl_jax.models.config import ModelConfig

CFG = ModelConfig(
    architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_q_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, max_position_embeddings=4096,
    tie_word_embeddings=False, qkv_bias=False, o_bias=False, qk_norm=False,
)
ARGS = EngineArgs(model="m", page_size=16, max_running_requests=64, mem_fraction=0.5)
PAGES_PER_SEQ = 256  # so the pool is not capped by what 64 requests can use (64 * 256 + 1 pages)


def mesh_of(platform: str, stats: dict | None) -> SimpleNamespace:
    device = SimpleNamespace(platform=platform, memory_stats=lambda: stats)
    return SimpleNamespace(devices=np.array([device], dtype=object))


def test_pool_is_sized_from_free_memory():
    per_page = CFG.num_layers * 2 * CFG.num_kv_heads * ARGS.page_size * CFG.head_dim * 2  # bf16
    stats = {"bytes_limit": 4000 * per_page, "bytes_in_use": 1000 * per_page}
    assert plan_kv_pages(ARGS, CFG, mesh_of("gpu", stats), PAGES_PER_SEQ, 2) == 1000  # 4000 * 0.5 - 1000


def test_gpu_without_a_memory_limit_warns_and_names_the_flag(caplog):
    with caplog.at_level(logging.WARNING):
        pages = plan_kv_pages(ARGS, CFG, mesh_of("gpu", {}), PAGES_PER_SEQ, 2)
    assert pages == CPU_DEFAULT_KV_PAGES
    assert "--num-pages" in caplog.text


def test_cpu_takes_the_default_quietly(caplog):
    with caplog.at_level(logging.WARNING):
        assert plan_kv_pages(ARGS, CFG, mesh_of("cpu", None), PAGES_PER_SEQ, 2) == CPU_DEFAULT_KV_PAGES
    assert caplog.text == ""
