"""The offline workload through Hugging Face transformers' continuous batching: a peer in the same run.

Same requests as benchmarks/offline.py (256, seed 0, lengths 100..1024, ignore_eos, temperature
0.6), random weights from a bundled config, `attn_implementation="paged|sdpa"`, each request with
its own max_new_tokens through the continuous-batching manager.

    python benchmarks/peer_hf.py --model Qwen/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from offline import workload  # noqa: E402
from report import emit  # noqa: E402

from minisgl_jax.models.config import bundled_config_path, read_hf_config  # noqa: E402

PROGRESS_EVERY_S = 10.0


def build_model(model: str, device: str):
    import torch
    import transformers

    path = bundled_config_path(model)
    if os.path.isdir(model):
        config = transformers.AutoConfig.from_pretrained(model)
    elif path is not None:
        cfg = read_hf_config(os.path.dirname(path), os.path.basename(path))
        config = transformers.CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    else:
        raise ValueError(f"--model {model!r} is neither a local folder nor a bundled config")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="paged|sdpa")
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from transformers import GenerationConfig

    model = build_model(args.model, args.device)
    vocab = model.config.vocab_size
    prompts, output_lens = workload(args.num_requests, args.min_len, args.max_len)
    prompts = [[t % vocab for t in p] for p in prompts]
    config = GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=max(output_lens), eos_token_id=-1,
                              pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
                manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
            tokens, done, reported = 0, 0, start
            while done < len(prompts):
                result = manager.get_result(timeout=600)
                if result is None:
                    raise RuntimeError("the transformers manager stopped before every request finished")
                if result.is_finished():
                    tokens += len(result.generated_tokens)
                    done += 1
                now = time.perf_counter()
                if now - reported >= PROGRESS_EVERY_S:  # a run cut short still bounds the peer's time
                    print(f"after {now - start:.0f} s: {done}/{len(prompts)} requests, {tokens} output tokens",
                          flush=True)
                    reported = now
            seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    if tokens != sum(output_lens):
        raise RuntimeError(f"the peer produced {tokens} tokens, the workload asks for {sum(output_lens)}")
    report = dict(peer="transformers continuous batching (paged|sdpa)", model=args.model, requests=len(prompts),
                  output_tokens=tokens, seconds=seconds, output_tokens_per_s=tokens / seconds)
    emit(report, args.out)


if __name__ == "__main__":
    main()
