"""What a request constrains its output to: one grammar, named by kind and source text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import llguidance

from minisgl_jax.core import GRAMMAR_FIELDS, SamplingParams

GrammarKind = Literal["json_schema", "regex", "ebnf", "lark"]  # SamplingParams' GRAMMAR_FIELDS
# JSON without free whitespace: a model cannot loop on spaces, and a bounded schema bounds the output.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = '{"type": "object"}'  # response_format {"type": "json_object"}


@dataclass(frozen=True)
class GrammarSpec:
    """One grammar: `kind` says how to read `source` (a JSON Schema's text, a regex, a GBNF grammar
    (`root ::= ...`, as llama.cpp and SGLang take it) or a Lark grammar in llguidance's syntax).

    `field` is the request field the grammar came from (`kind` by default), named in its errors.
    """

    kind: GrammarKind
    source: str
    field: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_FIELDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_FIELDS}, got {self.kind!r}")
        if not self.field:
            object.__setattr__(self, "field", self.kind)

    @property
    def size(self) -> int:
        """Bytes of source text: what the compiler's size limit bounds before any work."""
        return len(self.source.encode())

    def to_llguidance(self) -> str:
        """The grammar in llguidance's serialized form; ValueError naming `field` if it cannot be read.

        This only translates the text: errors inside the grammar (an unclosed group, an unknown
        JSON Schema type) show when llguidance builds it (`GrammarCompiler`).
        """
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.field} is not valid JSON: {err}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError(f"{self.field} must be a JSON Schema (an object or a boolean), "
                                 f"got {type(schema).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "ebnf":
            try:
                return llguidance.grammar_from("gbnf", self.source)
            except ValueError as err:
                raise ValueError(f"{self.field} is not a valid GBNF grammar: {err}") from None
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def grammar_spec(params: SamplingParams) -> GrammarSpec | None:
    """The grammar `params` asks for, or None for free output (`SamplingParams.validate` has checked
    that at most one grammar field is set)."""
    for kind in GRAMMAR_FIELDS:
        source = getattr(params, kind)
        if source is not None:
            return GrammarSpec(kind, source)
    return None
