"""The bundled chat templates with tools (templates/), one per tool-call format: for requests with
tools or tool messages where the checkpoint's own template cannot render tools."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


def bundled_template(tool_call_parser: str) -> str:
    return (TEMPLATES / f"{tool_call_parser}.jinja").read_text()


def renders_tools(template: str | None) -> bool:
    """Whether a chat template reads `tools` at all (Hugging Face's templates that support tools do)."""
    return template is not None and "tools" in template


def tool_template(tokenizer: PreTrainedTokenizerBase, tool_call_parser: str | None, chosen: bool) -> str | None:
    """The bundled template of `tool_call_parser` if `tokenizer`'s own renders no tools, else None
    (its own serves tool requests too). Other requests keep the tokenizer's template either way.

    `chosen`: the template came from --chat-template, which serves every request as it is.
    """
    if tool_call_parser is None or chosen or renders_tools(tokenizer.chat_template):
        return None
    logger.info("the chat template renders no tools: requests with tools use the bundled %s template "
                "(server/src/templates/%s.jinja)", tool_call_parser, tool_call_parser)
    return bundled_template(tool_call_parser)
