"""`--shell`: chat with the model in this terminal; the engine runs in-process, no HTTP."""

from __future__ import annotations

import dataclasses
import time

from minisgl_jax.server.tokenizer_worker import RequestRefused, render_chat

from minisgl_jax.config import EngineArgs
from minisgl_jax.core import SamplingParams

HELP = "type a message and press Enter; /reset clears the history, /exit quits"


def run_shell(engine_args: EngineArgs, chat_template: str | None, max_reply_tokens: int) -> int:
    from minisgl_jax.llm import LLM  # JAX is imported only now

    fields = dataclasses.asdict(engine_args)
    llm = LLM(fields.pop("model"), **fields)
    if chat_template is not None:
        llm.tokenizer.chat_template = chat_template
    max_model_len = llm.engine.max_model_len
    history: list[dict[str, str]] = []
    print(f"minisgl-jax shell, {engine_args.model}: {HELP}", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            print("(history cleared)", flush=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            print(f"unknown command {line!r}: {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = render_chat(llm.tokenizer, history, {})
        except RequestRefused as err:
            print(f"error: {err}", flush=True)
            history.pop()
            continue
        room = max_model_len - len(prompt_ids)
        if room < 1:
            print(f"the conversation fills the context ({max_model_len} tokens): /reset to start over", flush=True)
            history.pop()
            continue
        params = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=min(max_reply_tokens, room))
        reply, reply_tokens, started = [], 0, time.perf_counter()
        try:
            for delta in llm.stream([prompt_ids], params):
                reply.append(delta.text)
                reply_tokens += len(delta.token_ids)
                print(delta.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" (interrupted)", end="")
        print(f"\n[{len(prompt_ids)} prompt tokens, {reply_tokens} reply tokens, "
              f"{time.perf_counter() - started:.1f}s]", flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})
