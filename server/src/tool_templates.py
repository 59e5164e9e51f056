"""The bundled chat templates with tools (templates/), one per tool-call format: used where the
checkpoint's own template cannot render tools, so that tools and tool messages still reach the model."""

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


def use_tool_template(tokenizer: PreTrainedTokenizerBase, tool_call_parser: str | None, chosen: bool) -> None:
    """Give `tokenizer` the bundled template of `tool_call_parser` if its own renders no tools.

    `chosen`: the template came from --chat-template, which is kept as it is.
    """
    if tool_call_parser is None or chosen or renders_tools(tokenizer.chat_template):
        return
    tokenizer.chat_template = bundled_template(tool_call_parser)
    logger.info("the checkpoint's chat template renders no tools: using the bundled %s template "
                "(server/src/templates/%s.jinja)", tool_call_parser, tool_call_parser)
