"""`python -m minisgl_jax` with faults injected into the engine's steps, for test_engine_failures.py.

multiprocessing starts every worker process by running this script again (as `__mp_main__`), so
the scheduler process patches its engine here before it loads it; no other process does. A
request with one of these seeds makes the steps that hold it fail as they are built:
"""

import multiprocessing

STEP_ERROR_SEED = 9001  # its prefill step raises: a step error
LATE_STEP_ERROR_SEED = 9002  # its steps raise once it has 2 tokens: a stream that has begun fails
DEVICE_ERROR_SEED = 9003  # its prefill step meets a device error: the engine is broken


def inject_faults() -> None:
    import jax

    from minisgl_jax.engine import engine

    build = engine.build_step_batch

    def faulty(batch, *args):
        for row in batch.rows:
            seed, produced = row.req.params.seed, len(row.req.output_ids)
            if seed == DEVICE_ERROR_SEED:
                raise jax.errors.JaxRuntimeError("INTERNAL: injected device error")
            if seed == STEP_ERROR_SEED or seed == LATE_STEP_ERROR_SEED and produced >= 2:
                raise ValueError("injected step error")
        return build(batch, *args)

    engine.build_step_batch = faulty


if multiprocessing.current_process().name == "scheduler":
    inject_faults()

if __name__ == "__main__":
    from minisgl_jax.server.launch import main

    main()
