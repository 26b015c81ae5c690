"""Grammar-constrained decoding on top of xgrammar: compile specs, track per-request matchers, mask logits.

The scheduler owns the loop: per step it fills one bitmask row per constrained request, applies the
mask to the logits before sampling, then feeds each sampled token back to that request's matcher.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from radixserve.constrained.schema import GrammarError, parse_schema, schema_text

KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")
# Any JSON object: the builtin JSON grammar would also allow arrays and scalars at the top level.
_ANY_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; clients need only the rest.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")

CompiledGrammar = xgr.CompiledGrammar


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    value: str  # schema or structural-tag JSON text, regex or EBNF grammar; "" for json_object

    @classmethod
    def from_fields(
        cls,
        json_schema: str | dict[str, Any] | None = None,
        regex: str | None = None,
        ebnf: str | None = None,
        json_object: bool = False,
        structural_tag: str | dict[str, Any] | None = None,
    ) -> GrammarSpec | None:
        """The spec named by request fields (at most one may be set), or None when none is."""
        given = {
            name: value
            for name, value in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf),
                                ("structural_tag", structural_tag))
            if value is not None
        }
        if json_object:
            given["json_object"] = ""
        if len(given) > 1:
            raise GrammarError(f"only one of json_schema, json_object, regex, ebnf, structural_tag may be set, "
                               f"got {sorted(given)}")
        if not given:
            return None
        kind, value = given.popitem()
        if isinstance(value, dict):  # a client may send the schema as an object, not as text
            value = schema_text(value, kind)
        if not isinstance(value, str):
            raise GrammarError(f"{kind}: must be a string, got {type(value).__name__}")
        return cls(kind, value)


def _error(kind: str, exc: BaseException) -> GrammarError:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return GrammarError(f"{kind}: {_CPP_PREFIX.sub('', line)}")


def _check_shape(spec: GrammarSpec) -> None:
    """Checks that need no grammar library: known kind, string value, parseable schema JSON."""
    if spec.kind not in KINDS:
        raise GrammarError(f"unknown grammar kind {spec.kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(spec.value, str):
        raise GrammarError(f"{spec.kind}: must be a string, got {type(spec.value).__name__}")
    if spec.kind == "json_object":
        if spec.value:
            raise GrammarError("json_object: takes no value")
        return
    if not spec.value:
        raise GrammarError(f"{spec.kind}: must not be empty")
    if spec.kind == "structural_tag":
        tag = parse_schema(spec.value, "structural_tag")
        if not isinstance(tag, dict):
            raise GrammarError(f"structural_tag: must be a JSON object, got {type(tag).__name__}")
    if spec.kind == "json_schema":
        schema = parse_schema(spec.value)
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"json_schema: must be a JSON object, got {type(schema).__name__}")


def validate_spec(spec: GrammarSpec) -> None:
    """Syntax-check a spec without a tokenizer (cheap: tens of microseconds), for the API process."""
    _check_shape(spec)
    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.value)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.value)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.value)
        elif spec.kind == "structural_tag":
            xgr.Grammar.from_structural_tag(spec.value)
    except Exception as e:  # xgrammar reports every bad input as a RuntimeError from C++
        raise _error(spec.kind, e) from e


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._stop_ids = list(self._matcher.stop_token_ids)
        self._vocab_size = compiled.tokenizer_info.vocab_size

    def accept_token(self, token_id: int) -> bool:
        if self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(int(token_id)))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def allows_nothing(self) -> bool:
        """No token may come next, not even a stop: from here the grammar matches no text (an empty
        language, such as EBNF `root ::= a  a ::= a` or the regex `[^\\x00-\\U0010FFFF]`)."""
        if self._matcher.is_terminated():
            return False
        bitmask = allocate_bitmask(1, self._vocab_size)
        self._matcher.fill_next_token_bitmask(bitmask, 0)
        return not bool(bitmask.any())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._matcher.is_terminated():
            # xgrammar refuses to fill after the stop token; only a stop token can follow anyway
            bitmask[row].zero_()
            for tid in self._stop_ids:
                bitmask[row, tid // 32] |= _bit(tid % 32)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)


def _bit(i: int) -> int:
    # bit 31 of an int32 word is its sign bit
    return 1 << i if i < 31 else -(1 << 31)


class GrammarBackend:
    """Compiles specs against one tokenizer; compiled grammars are shared by all requests using them."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int] | None = None,
        *,
        cache_size: int = 128,
        any_whitespace: bool = True,
        max_whitespace: int | None = 32,
        max_threads: int = 8,
    ) -> None:
        # vocab_size is the model's: ids past the tokenizer's vocabulary (padding) are always masked.
        # stop_token_ids (the model's EOS ids) are what a complete grammar allows next.
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        # Our own LRU bounds memory; xgrammar's cache would grow without limit.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._any_whitespace = any_whitespace
        # Bounded whitespace runs: weak models can otherwise emit whitespace forever inside JSON.
        self._max_whitespace = max_whitespace if any_whitespace else None

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.tokenizer_info.stop_token_ids)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        key = (spec.kind, spec.value)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec))

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        _check_shape(spec)
        try:
            if spec.kind in ("json_schema", "json_object"):
                return self._compiler.compile_json_schema(
                    spec.value or _ANY_OBJECT_SCHEMA,
                    any_whitespace=self._any_whitespace,
                    max_whitespace_cnt=self._max_whitespace,
                )
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "structural_tag":
                return self._compiler.compile_structural_tag(spec.value)
            return self._compiler.compile_grammar(spec.value)
        except Exception as e:  # C++ RuntimeError for any invalid input
            raise _error(spec.kind, e) from e


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """CPU int32 [batch_size, ceil(vocab_size / 32)], every token allowed."""
    return xgr.allocate_token_bitmask(batch_size, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set the logits of disallowed tokens to -inf in place, for `rows` (all rows when None).

    Row i of the bitmask masks row i of the logits. The bitmask is copied to the logits' device.
    """
    if rows is not None and not rows:
        return
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    vocab = logits.shape[-1]
    if bitmask.shape[-1] * 32 < vocab:
        raise ValueError(f"bitmask covers {bitmask.shape[-1] * 32} tokens but the logits have {vocab}")
    bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows, backend=_backend(logits))


def _backend(logits: torch.Tensor) -> str:
    if logits.device.type == "cpu":
        return "cpu"
    # the Triton kernel needs unit stride along the vocabulary; plain torch handles the rest
    if logits.device.type == "cuda" and logits.stride(-1) == 1 and _has_triton():
        return "triton"
    return "torch_native"


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
