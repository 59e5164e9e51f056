"""Start-up decisions: where the model comes from, the mesh, the compile cache, the KV budget."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine import multihost
from minisgl_jax.kernels.grouped_gemm import grouped_gemm_unsupported
from minisgl_jax.models.config import ModelConfig, bundled_config_path, bundled_model_names, read_hf_config
from minisgl_jax.models.quantization import QuantConfig

if TYPE_CHECKING:
    from minisgl_jax.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_PAGES = 2048


# XLA captures runs of GPU kernels into CUDA graphs, by default only runs of several kernels; a decode
# step is hundreds of small kernels, so every run is worth a graph (RESULTS.md, "Batch-1 decode:
# buckets and CUDA graphs").
GPU_XLA_FLAGS = {"--xla_gpu_graph_min_graph_size": "1"}


def prepare_process(args: EngineArgs) -> None:
    """The engine's effects on the whole process, in one place and before anything else: a garbage
    collection (a dropped engine's arrays sit in reference cycles; their device memory must be free
    before this engine sizes its KV pool from what is left), our XLA flags, `jax.distributed` across
    hosts, and the persistent compilation cache."""
    gc.collect()
    set_gpu_xla_flags()
    multihost.init_distributed(args)
    enable_compile_cache(args.compile_cache_dir)


def set_gpu_xla_flags() -> None:
    """Add our GPU flags to XLA_FLAGS, unless the user set them. Takes effect if called before
    JAX initializes its backends (the engine calls it first thing)."""
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f"{flag}={value}" for flag, value in GPU_XLA_FLAGS.items() if flag not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def resolve_model(args: EngineArgs) -> tuple[ModelConfig, str | None]:
    """(config, folder with safetensors or None for dummy weights) for `--model`."""
    if os.path.isdir(args.model):
        cfg = ModelConfig.from_hf_dict(read_hf_config(args.model))
        return cfg, None if args.load_format == "dummy" else args.model
    if args.load_format == "dummy":
        path = bundled_config_path(args.model)
        if path is None:
            raise ValueError(
                f"--model {args.model!r} is not a local folder and has no bundled config; "
                f"bundled: {bundled_model_names()}"
            )
        return ModelConfig.from_hf_dict(read_hf_config(os.path.dirname(path), os.path.basename(path))), None
    return resolve_model_from_hub(args)


def resolve_model_from_hub(args: EngineArgs) -> tuple[ModelConfig, str]:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(args.model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as err:
        raise ValueError(
            f"could not download {args.model!r} from the Hugging Face hub ({type(err).__name__}); "
            f"offline, pass the local folder that holds its config.json and *.safetensors as --model, "
            f"or use --load-format dummy for random weights"
        ) from err
    args.tokenizer = args.tokenizer or folder
    return ModelConfig.from_hf_dict(read_hf_config(folder)), folder


def resolve_quantization(args: EngineArgs, cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """The config with its FP8 format (config.json's, or block-wise for `--load-format dummy
    --quantization fp8`) and the path the mesh's devices run; None stays None."""
    quant = cfg.quantization
    if quant is None and args.quantization == "fp8":
        if args.load_format != "dummy":
            raise ValueError(
                f"--quantization fp8: {args.model} has no quantization_config in its config.json; FP8 checkpoints "
                f"only (quantizing a checkpoint at load is not supported), or --load-format dummy for random weights"
            )
        quant = QuantConfig.dummy()
    if quant is None:
        return cfg
    quant = quant.for_devices(list(mesh.devices.flat))
    logger.info("FP8 weights: %s, %s scales, %s", quant.method, quant.strategy,
                "FP8 GEMMs" if quant.uses_fp8_gemm else "dequantized into the model dtype for the matmuls")
    return dataclasses.replace(cfg, quantization=quant)


def shard_config(args: EngineArgs, cfg: ModelConfig) -> ModelConfig:
    """The config as sharded over --tp devices, a mixture of experts' experts placed by --moe-parallel;
    one line says how they lie (or that the flag does nothing for a dense model)."""
    cfg = cfg.for_tp(args.tp, args.moe_parallel)
    if cfg.moe_layers and args.tp > 1:
        share = (f"{cfg.num_experts // args.tp} of the {cfg.num_experts} experts whole" if cfg.moe_parallel == "ep"
                 else f"{cfg.moe_intermediate_size // args.tp} of each expert's {cfg.moe_intermediate_size} columns")
        logger.info("experts: moe_parallel %s, %s on each of %d devices", cfg.moe_parallel, share, args.tp)
    elif not cfg.moe_layers and args.moe_parallel != "tp":
        logger.warning("moe_parallel %r changes nothing: %s has no experts", args.moe_parallel, args.model)
    return cfg


def resolve_moe_backend(args: EngineArgs, cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """The config with the experts' grouped GEMM: --moe-backend, auto meaning the Pallas kernel on GPUs
    (ragged_dot's default GPU lowering reads every expert's weights; models/moe.py) and ragged_dot
    elsewhere (the kernel would run interpreted). Dense models keep the default."""
    if not cfg.moe_layers:
        return cfg
    on_gpu = mesh.devices.flat[0].platform == "gpu"
    tp = mesh.shape["tp"]
    # Each device's experts: gate_up [hidden, 2 * inter / tp] and down [inter / tp, hidden] under
    # --moe-parallel tp; whole experts under ep.
    width = cfg.moe_intermediate_size if args.moe_parallel == "ep" else cfg.moe_intermediate_size // tp
    unsupported = grouped_gemm_unsupported(cfg.hidden_size, width)
    backend = args.moe_backend
    if backend == "auto":
        backend = "pallas" if on_gpu and unsupported is None else "ragged_dot"
        if on_gpu and unsupported:
            logger.info("experts' grouped GEMM: ragged_dot, as the Pallas kernel cannot tile them (%s)", unsupported)
    elif backend == "pallas" and on_gpu and unsupported:
        raise ValueError(f"--moe-backend pallas: {unsupported} at --tp {tp}; use --moe-backend ragged_dot")
    if on_gpu and backend == "ragged_dot" and cfg.quantization is not None:
        logger.warning("FP8 experts on ragged_dot are dequantized every step, more memory traffic than bf16 "
                       "experts; the Pallas grouped GEMM (--moe-backend pallas) reads them as FP8")
    return dataclasses.replace(cfg, moe_backend=backend)


def make_mesh(tp: int) -> Mesh:
    """A 1-D `tp` mesh. Across hosts every host gives the same number of its devices, in host order,
    so every host's scheduler drives a share of the mesh."""
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"--tp {tp} asks for more devices than the {len(devices)} available")
    hosts = jax.process_count()
    if hosts == 1:
        return Mesh(np.array(devices[:tp]), ("tp",))
    if tp % hosts:
        raise ValueError(f"--tp {tp} must be a multiple of the {hosts} hosts (each host takes tp / hosts devices)")
    per_host = tp // hosts
    chosen = []
    for host in range(hosts):
        local = [d for d in devices if d.process_index == host]
        if per_host > len(local):
            raise ValueError(
                f"--tp {tp} over {hosts} hosts needs {per_host} devices on each; host {host} has {len(local)}"
            )
        chosen += local[:per_host]
    return Mesh(np.array(chosen), ("tp",))


def enable_compile_cache(path: str | None) -> None:
    if path is None:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def plan_kv_pages(
    args: EngineArgs, cfg: ModelConfig, mesh: Mesh, pages_per_seq: int, itemsize: int, reserved_bytes: int = 0
) -> int:
    """KV pages: the flag, else mem_fraction of device memory after weights and `reserved_bytes` (the
    other device state), capped at what is usable."""
    most_useful = args.max_running_requests * pages_per_seq + 1
    if args.num_pages is not None:
        return min(args.num_pages, most_useful)
    device = mesh.devices.flat[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        pages = min(CPU_DEFAULT_KV_PAGES, most_useful)
        if device.platform != "cpu":  # e.g. XLA's VMM allocator (--xla_gpu_command_buffer_update_mode=SKIP_TEMP)
            logger.warning(
                "%s reports no memory limit, so the KV cache cannot be sized from free memory: using %d pages; "
                "set num_pages (--num-pages) to size it", device, pages,
            )
        return pages
    free = stats["bytes_limit"] * args.mem_fraction - stats["bytes_in_use"] - reserved_bytes
    per_page = cfg.num_layers * 2 * (cfg.num_kv_heads // args.tp) * args.page_size * cfg.head_dim * itemsize
    pages = int(free // per_page)
    if pages < 2:
        raise ValueError(f"no device memory left for the KV cache (free {free / 2**30:.1f} GiB after weights)")
    return min(pages, most_useful)


def log_loaded(args: EngineArgs, seconds: float, weights_bytes: int, runner: ModelRunner, num_pages: int) -> None:
    """The start-up line: what was loaded, the KV cache's size and dtype, and the tokens it holds."""
    kv_bytes = sum(k.nbytes + v.nbytes for k, v in runner.kv_pool)
    fp8_note = ": twice the tokens a bf16 pool holds in this memory" if runner.kv_dtype.itemsize == 1 else ""
    logger.info(
        "loaded %s in %.1fs: weights %.2f GiB, KV cache %.2f GiB of %s (%d pages of %d tokens, %d tokens%s), "
        "max %d running requests",
        args.model, seconds, weights_bytes / 2**30, kv_bytes / 2**30, runner.kv_dtype.name,
        num_pages, args.page_size, (num_pages - 1) * args.page_size, fp8_note, args.max_running_requests,
    )
