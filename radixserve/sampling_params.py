"""SamplingParams: the per-request decoding knobs, their defaults and their validation."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from radixserve.utils.text import lone_surrogate_at


class SamplingParamsError(ValueError):
    """A sampling parameter has a bad value or type. The message names the field; `param` is that
    field's name (None when the error is about several), so that an API can point at its own name."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Field groups drive the type checks; keep them in sync with the struct below.
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("min_new_tokens", "top_k", "n")
_OPTIONAL_INT_FIELDS = ("max_new_tokens", "seed", "stream_interval")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
# Integers must fit in 64 bits (OpenAI's bounds for seed): the messages to the scheduler carry them
# as MessagePack ints, which cannot hold a larger one (a JSON body can).
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"top_k": true` is a client bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int64(name: str, value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        text = str(value)
        got = text if len(text) <= 40 else f"an integer of {len(text.lstrip('-'))} digits"
        raise SamplingParamsError(f"{name} must be a 64-bit integer (in [-2**63, 2**63 - 1]), got {got}", name)


def wrap_int64(value: int) -> int:
    """value as a 64-bit two's-complement integer (seed + sample index may pass 2**63 - 1; a step's
    seed depends on the seed modulo 2**64 only, so the samples are the same)."""
    return (value - INT64_MIN) % (1 << 64) + INT64_MIN


def _token_key(key: Any) -> int | None:
    """A logit_bias key as a token id: an int, or a string of ASCII digits (JSON object keys are
    strings); None for anything else (int() would also take "+7", " 7", "7_0" or "٧")."""
    if _is_int(key):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def _check_unicode(name: str, value: str) -> None:
    """Text that is not valid Unicode (a lone UTF-16 surrogate, as JSON "\\ud800" gives) cannot be
    encoded to UTF-8: refuse it here, before the scheduler encodes it and dies."""
    at = lone_surrogate_at(value)
    if at is not None:
        raise SamplingParamsError(
            f"{name} must be valid Unicode text: {value!r} has a lone surrogate at position {at}", name
        )


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True):
    """Checked and normalized on construction and again when decoded from a message (__post_init__),
    so a scheduler takes them from a socket as they are, without a dict in between."""

    max_new_tokens: int | None = 128  # None: generate up to the context length
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0, normalized to -1) disables top-k
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # After validation `stop` and `stop_token_ids` are always lists (possibly empty).
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    # SGLang's stop_regex: the output stops where a pattern first matches (the match trimmed like a stop)
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # OpenAI's logit_bias: token id -> value in [-100, 100], added to that token's logit before sampling
    # (keys may arrive as JSON strings; validation makes them ints)
    logit_bias: dict[int, float] | None = None
    # structured output (xgrammar): at most one of these
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # xgrammar's structural tag ({"type": "structural_tag", "format": {...}}) as JSON text, as SGLang takes it
    structural_tag: str | None = None
    # SGLang's: a streaming request reports every this many tokens (None: the server's --stream-interval)
    stream_interval: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        """Build from a JSON request body; unknown keys and wrong types raise SamplingParamsError."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise SamplingParamsError(f"sampling_params must be an object, got {type(d).__name__}", "sampling_params")
        d = dict(d)
        # SGLang's spellings: sampling_seed is seed; custom_params feed a custom logit processor,
        # which radixserve does not run (as SGLang without one), so they are checked and dropped
        if "sampling_seed" in d:
            seed = d.pop("sampling_seed")
            if d.get("seed") is None:
                d["seed"] = seed
        custom = d.pop("custom_params", None)
        if custom is not None and not isinstance(custom, dict):
            raise SamplingParamsError(f"custom_params must be an object, got {type(custom).__name__}",
                                      "custom_params")
        known = set(cls.__struct_fields__)
        for key in d:
            if key not in known:
                raise SamplingParamsError(f"unknown sampling parameter {key!r}", str(key))
        # null is "not given" (SGLang's reading) for fields whose default is not null; max_new_tokens
        # keeps its null, which means up to the context length
        return cls(**{k: v for k, v in d.items() if v is not None or k in _KEEPS_NULL})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists copied) suitable for msgpack/JSON messages; from_dict round-trips it."""
        return {k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
                for k, v in msgspec.structs.asdict(self).items()}

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        """Check types and ranges, normalizing in place (ints to floats, top_k 0 to -1, stop to a list)."""
        self._check_types()
        if self.top_k == 0:
            self.top_k = -1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._check_stop_regex()
        self._check_logit_bias()
        self._check_ranges()
        self._check_grammar()

    def _check_stop_regex(self) -> None:
        value = self.stop_regex
        patterns = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
            raise SamplingParamsError(f"stop_regex must be a non-empty string or a list of them, got {value!r}",
                                      "stop_regex")
        import regex

        for pattern in patterns:
            _check_unicode("stop_regex", pattern)
            try:
                regex.compile(pattern)
            except regex.error as e:
                raise SamplingParamsError(f"stop_regex {pattern!r} is not a valid regular expression: {e}",
                                          "stop_regex") from None
        self.stop_regex = list(patterns)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise SamplingParamsError(
                f"logit_bias must be an object of token id -> bias, got {type(bias).__name__}", "logit_bias")
        clean: dict[int, float] = {}
        for key, value in bias.items():
            token = _token_key(key)
            if token is None:
                raise SamplingParamsError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100.0 <= value <= 100.0:
                raise SamplingParamsError(
                    f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
            clean[token] = float(value)
        self.logit_bias = clean or None

    def grammar_spec(self):
        """The structured-output constraint, or None."""
        if self.json_schema is None and self.regex is None and self.ebnf is None and self.structural_tag is None:
            return None
        from radixserve.constrained import GrammarSpec

        return GrammarSpec.from_fields(json_schema=self.json_schema, regex=self.regex, ebnf=self.ebnf,
                                       structural_tag=self.structural_tag)

    def _check_grammar(self) -> None:
        for name in ("json_schema", "structural_tag"):
            if isinstance(getattr(self, name), dict):
                from radixserve.constrained.schema import GrammarError, schema_text

                try:
                    setattr(self, name, schema_text(getattr(self, name), name))
                except GrammarError as e:
                    raise SamplingParamsError(str(e), name) from None
        given = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in given:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise SamplingParamsError(f"{name} must be a string, got {type(value).__name__}", name)
            _check_unicode(name, value)
        try:
            spec = self.grammar_spec()
            if spec is None:
                return
            from radixserve.constrained import validate_spec

            validate_spec(spec)
        except ValueError as e:
            raise SamplingParamsError(str(e), given[0] if len(given) == 1 else None) from None
        if self.min_new_tokens > 0:
            raise SamplingParamsError(
                "min_new_tokens cannot be combined with json_schema, regex, ebnf or structural_tag (the grammar "
                "decides the end)",
                "min_new_tokens",
            )

    def _check_types(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingParamsError(f"{name} must be a number, got {value!r}", name)
            try:
                value = float(value)
            except OverflowError:  # an integer past float's range (a JSON number of 400 digits)
                raise SamplingParamsError(f"{name} must be finite, got an integer too large for a float",
                                          name) from None
            if not math.isfinite(value):
                raise SamplingParamsError(f"{name} must be finite, got {value!r}", name)
            setattr(self, name, value)
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise SamplingParamsError(f"{name} must be an integer, got {value!r}", name)
            _check_int64(name, value)
        for name in _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise SamplingParamsError(f"{name} must be an integer or null, got {value!r}", name)
            if value is not None:
                _check_int64(name, value)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SamplingParamsError(f"{name} must be a boolean, got {value!r}", name)
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
                raise SamplingParamsError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
            self.stop = list(stop)
        for s in [stop] if isinstance(stop, str) else self.stop or []:
            _check_unicode("stop", s)
        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
                raise SamplingParamsError(f"stop_token_ids must be a list of integers, got {ids!r}", "stop_token_ids")
            for i in ids:
                _check_int64("stop_token_ids", i)
            self.stop_token_ids = list(ids)

    def _check_ranges(self) -> None:
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamsError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}", "top_k")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {value}", name)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}", "max_new_tokens")
        if self.min_new_tokens < 0:
            raise SamplingParamsError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}", "min_new_tokens")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError(
                f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}",
                "min_new_tokens",
            )
        if self.n < 1:
            raise SamplingParamsError(f"n must be >= 1, got {self.n}", "n")
        if self.stream_interval is not None and self.stream_interval < 1:
            raise SamplingParamsError(f"stream_interval must be >= 1, got {self.stream_interval}", "stream_interval")
        for s in self.stop:  # type: ignore[union-attr]
            if not s:
                raise SamplingParamsError("stop must not contain empty strings", "stop")
        for i in self.stop_token_ids:  # type: ignore[union-attr]
            if i < 0:
                raise SamplingParamsError(f"stop_token_ids must be >= 0, got {i}", "stop_token_ids")


# Fields whose null is a value of its own (their default, or max_new_tokens' "up to the context")
_KEEPS_NULL = frozenset(
    [f.name for f in msgspec.structs.fields(SamplingParams) if f.default is None] + ["max_new_tokens"]
)
