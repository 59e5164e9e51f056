"""The tokenizer process: chat templates and tokenization, off the API server's event loop.

It is also the one path from the API to the scheduler, so an abort can never overtake the
request it aborts.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from minisgl_jax.server import ipc
from minisgl_jax.server.messages import (
    AbortReq,
    AddReq,
    ErrorReply,
    FlushCacheReq,
    GenerateReq,
    NewRequest,
    TokenizeReply,
    TokenizeReq,
)
from minisgl_jax.server.tool_templates import tool_template
from transformers import PreTrainedTokenizerBase

from minisgl_jax.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# apply_chat_template's own arguments: not for chat_template_kwargs to override.
RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "add_generation_prompt", "chat_template", "return_dict"}


class RequestRefused(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None, tool_template: str | None = None,
) -> list[int]:
    """Token ids of `messages` (and the `tools` offered) through the chat template, ready for the
    assistant's turn; through `tool_template` instead when there are tools or tool messages."""
    reserved = RESERVED_TEMPLATE_KWARGS & set(template_kwargs)
    if reserved:
        raise RequestRefused(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
    if tools is not None:
        template_kwargs = {**template_kwargs, "tools": tools}
    if tool_template is not None and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
        template_kwargs = {**template_kwargs, "chat_template": tool_template}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    except Exception as err:  # jinja raises its own errors (e.g. roles that do not alternate)
        raise RequestRefused(f"the chat template could not render these messages: {err}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)  # the template already holds the specials


class TokenizerWorker:
    def __init__(self, run_dir: ipc.RunDir, tokenizer: PreTrainedTokenizerBase,
                 tool_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.tool_template = tool_template  # for requests with tools, where the tokenizer's renders none
        context = zmq.Context()
        self.inbox = ipc.bind_inbox(context, run_dir, "tokenizer")
        self.to_scheduler = ipc.connect_outbox(context, run_dir, "scheduler")
        self.to_api = ipc.connect_outbox(context, run_dir, "api")

    def serve_forever(self) -> None:
        while True:
            for message in ipc.receive_all(self.inbox, timeout_ms=1000):
                self.handle(message)

    def handle(self, message: Any) -> None:
        if isinstance(message, GenerateReq):
            self._generate(message)
        elif isinstance(message, TokenizeReq):
            self._tokenize(message)
        elif isinstance(message, AbortReq | FlushCacheReq):
            ipc.send(self.to_scheduler, message)
        else:
            logger.warning("tokenizer: dropped an unexpected %s", type(message).__name__)

    def _generate(self, req: GenerateReq) -> None:
        try:
            if req.messages is not None:
                prompts = [render_chat(self.tokenizer, req.messages, req.chat_template_kwargs, req.tools,
                                       self.tool_template)]
            else:
                prompts = [self._encode(p) for p in req.prompts]
        except RequestRefused as err:
            ipc.send(self.to_api, ErrorReply(req.rid, str(err), err.param))
            return
        except Exception as err:
            logger.exception("tokenizer: request %s failed", req.rid)
            ipc.send(self.to_api, ErrorReply(req.rid, f"tokenization failed: {err}", None, status=500))
            return
        seed = req.params.get("seed")
        requests = []
        for p, prompt_ids in enumerate(prompts):
            for i in range(req.n):
                params = dict(req.params)
                if seed is not None:
                    params["seed"] = (seed + i) % 2**63  # n samples of one seed differ, reproducibly
                echo_text = None
                if req.echo:
                    prompt = req.prompts[p]
                    echo_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
                requests.append(NewRequest(f"{req.rid}/{p * req.n + i}", prompt_ids, params, echo_text))
        ipc.send(self.to_scheduler, AddReq(req.rid, requests))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _tokenize(self, req: TokenizeReq) -> None:
        try:
            if req.token_ids is not None:
                reply = TokenizeReply(req.rid, req.token_ids, self.tokenizer.decode(req.token_ids))
            elif req.messages is not None:
                ids = render_chat(self.tokenizer, req.messages, {}, tool_template=self.tool_template)
                reply = TokenizeReply(req.rid, ids, "")
            else:
                ids = self.tokenizer.encode(req.text or "", add_special_tokens=req.add_special_tokens)
                reply = TokenizeReply(req.rid, ids, "")
        except RequestRefused as err:
            ipc.send(self.to_api, ErrorReply(req.rid, str(err), err.param))
            return
        except Exception as err:  # e.g. ids outside the vocabulary
            ipc.send(self.to_api, ErrorReply(req.rid, f"could not (de)tokenize: {err}", "tokens"))
            return
        ipc.send(self.to_api, reply)


def run_tokenizer(
    run_dir: str, tokenizer_path: str, local_only: bool, vocab_size: int, chat_template: str | None,
    tool_call_parser: str | None = None,
) -> None:
    tokenizer = load_tokenizer(tokenizer_path, chat_template, local_only, vocab_size)
    template = tool_template(tokenizer, tool_call_parser, chosen=chat_template is not None)
    TokenizerWorker(ipc.RunDir(run_dir), tokenizer, template).serve_forever()
