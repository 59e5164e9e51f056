"""The compiled step writes the KV pool in place: every pool buffer is aliased input to output; a
program without logits processing passes the per-slot token counts through untouched."""

import re

from minisgl_jax.config import EngineArgs
from minisgl_jax.engine import Engine
from minisgl_jax.engine.batch import ScheduledBatch, StepKey, build_step_batch
from tiny_models import save_tiny_checkpoint


def test_kv_pool_is_aliased_not_copied(tmp_path):
    path = save_tiny_checkpoint(str(tmp_path / "m"), "llama")
    engine = Engine(EngineArgs(
        model=path, dtype="float32", attention_backend="reference", cache="naive", num_pages=32,
        max_running_requests=4, compile_cache_dir=None, warmup=False,
    ))
    runner = engine.runner
    batch = build_step_batch(
        ScheduledBatch(rows=[], is_decode=True), 4, 4, engine.batch_constants,
    )
    hlo = runner.lower_text(batch, StepKey(is_decode=True))
    header = hlo.splitlines()[0]
    assert "input_output_alias=" in header, "the compiled step aliases no input to an output"
    aliases = re.findall(r"\{\d+\}: \(\d+, \{\}, (?:may|must)-alias\)", header)
    # K and V of each of the 2 layers, plus the seven device-state arrays
    assert len(aliases) == 2 * 2 + 7
    slots, vocab = engine.args.max_running_requests + 1, engine.model_config.vocab_size
    entry = hlo[hlo.index("\nENTRY"):].splitlines()[2:]  # the entry computation's instructions
    touching = [line.strip()[:80] for line in entry if f"s32[{slots},{vocab}]" in line]
    assert len(touching) == 2 and "parameter(" in touching[0] and "ROOT" in touching[1], touching
