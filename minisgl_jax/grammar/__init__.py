"""Grammar-constrained decoding on the host: the vocabulary in llguidance's form (built once), what
a request asks for (`GrammarSpec`), compilation off the caller's thread (`GrammarCompiler`) and one
matcher per request that fills the token bitmask the step applies (`GrammarMatcher`)."""

from minisgl_jax.grammar.compiler import CompiledGrammar, CompileHandle, CompilerConfig, GrammarCompiler, check_grammar
from minisgl_jax.grammar.matcher import GrammarMatcher, fill_masks
from minisgl_jax.grammar.spec import ANY_JSON_OBJECT, GrammarSpec, grammar_spec
from minisgl_jax.grammar.vocab import GrammarVocab

__all__ = [
    "ANY_JSON_OBJECT", "CompileHandle", "CompiledGrammar", "CompilerConfig", "GrammarCompiler", "GrammarMatcher",
    "GrammarSpec", "GrammarVocab", "check_grammar", "fill_masks", "grammar_spec",
]
