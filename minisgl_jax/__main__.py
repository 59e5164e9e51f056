"""`python -m minisgl_jax --model ...`: the OpenAI-compatible server (or `--shell`)."""

from minisgl_jax.server.launch import main

if __name__ == "__main__":
    main()
