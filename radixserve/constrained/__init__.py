"""Structured output: constrain sampling to a JSON schema, any JSON object, a regex or an EBNF grammar."""

from __future__ import annotations

from radixserve.constrained.grammar import (
    KINDS,
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    allocate_bitmask,
    apply_bitmask,
    validate_spec,
)

__all__ = [
    "KINDS",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarError",
    "GrammarMatcher",
    "GrammarSpec",
    "allocate_bitmask",
    "apply_bitmask",
    "validate_spec",
]
