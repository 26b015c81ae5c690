"""Incremental detokenization and the stop-string and stop-regex searches, used by request_text.py
(in the detokenizer process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded as left context for the first output tokens, so that tokenizers whose
# decode depends on the previous token (sentencepiece leading spaces) behave as in context.
PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT = "\ufffd"

# An incomplete UTF-8 character has at most 3 of its bytes present, each token carries at least one.
MAX_TAIL_TOKENS = 3


def _decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool, spaces_between: bool) -> str:
    if not ids:
        return ""
    kwargs: dict[str, Any] = {"skip_special_tokens": skip_special_tokens}
    if not spaces_between:
        # Only slow tokenizers know this flag (default True); fast ones ignore it.
        kwargs["spaces_between_special_tokens"] = False
    return tokenizer.decode(list(ids), **kwargs)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text increments, one request at a time.

    Keeps a prefix offset and a read offset into a short id window: each step decodes
    ids[prefix:read] and ids[prefix:] and emits the difference. Decoding from the same start
    keeps context-dependent decoders consistent; the tokens of a trailing incomplete UTF-8
    character (text ending in U+FFFD) are held back until a later token completes it, while the
    tokens before them are emitted.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._spaces = spaces_between_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context  # only the window still needed; older ids are dropped
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of add() and flush() results)."""
        return self._text

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids and return the newly completed text ("" while a character is incomplete)."""
        self._ids.extend(new_ids)
        return self._advance(final=False)

    def peek(self) -> str:
        """All output text so far as flush() would make it, without emitting anything: the held-back
        tail of an incomplete character included (as U+FFFD)."""
        if self._read_offset >= len(self._ids):
            return self._text
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._text + self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a trailing incomplete character) at end of request."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        end, full_text = self._complete_end(final)
        if len(full_text) <= len(prefix_text) and not final:
            return ""  # e.g. only skipped special tokens so far, or every new token ends mid-character
        delta = full_text[len(prefix_text) :]
        # The emitted ids become the left context of the next step; ids past `end` (the tokens of an
        # incomplete trailing character) stay unread.
        drop = self._read_offset
        self._ids = self._ids[drop:]
        self._prefix_offset = 0
        self._read_offset = end - drop
        self._text += delta
        return delta

    def _complete_end(self, final: bool) -> tuple[int, str]:
        """The largest end <= len(ids) whose decode does not end in U+FFFD (an incomplete UTF-8
        character split over tokens), and that decode. Emitting up to it, rather than holding back
        every new token, keeps a stream flowing while a character is incomplete. Only the last
        MAX_TAIL_TOKENS ends are tried: tokens that straddle characters may leave no end on a
        character boundary, and then nothing is emitted until one arrives. At the end of a request
        (final) everything is emitted, an incomplete tail as U+FFFD, as tokenizer.decode gives."""
        end = len(self._ids)
        text = self._decode(self._ids[self._prefix_offset : end])
        if final:
            return end, text
        lowest = max(self._read_offset + 1, end - MAX_TAIL_TOKENS)
        while text.endswith(_REPLACEMENT) and end > lowest:
            end -= 1
            text = self._decode(self._ids[self._prefix_offset : end])
        if text.endswith(_REPLACEMENT):
            return self._read_offset, ""  # nothing complete yet
        return end, text

    def _decode(self, ids: Sequence[int]) -> str:
        return _decode(self._tokenizer, ids, self._skip, self._spaces)


def find_stop(text: str, stops: Sequence[str], start: int = 0, end_after: int = 0) -> tuple[int, str] | None:
    """Earliest position >= start where a stop string begins and ends past `end_after` (text before
    that may not end a match: it was generated under min_new_tokens), with that stop (ties: the
    longest)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        pos = text.find(stop, max(start, end_after - len(stop) + 1))
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(stop) > len(best[1])):
            best = (pos, stop)
    return best


# A stop regex is matched against the whole output text at each check: a pathological pattern must not
# stall the scheduler (the third-party `regex` module, which transformers needs anyway, has a timeout).
STOP_REGEX_TIMEOUT = 0.05  # seconds per search


class StopRegexTimeout(RuntimeError):
    """A stop_regex took longer than STOP_REGEX_TIMEOUT to search the output."""


def find_stop_regex(text: str, patterns: Sequence[str], end_after: int = 0) -> tuple[int, str] | None:
    """Earliest match of any pattern that ends past `end_after` (and is not empty), with its pattern."""
    import regex

    best: tuple[int, str] | None = None
    for pattern in patterns:
        try:
            for m in regex.finditer(pattern, text, timeout=STOP_REGEX_TIMEOUT):
                if m.end() > end_after and m.end() > m.start():
                    if best is None or m.start() < best[0]:
                        best = (m.start(), pattern)
                    break
        except TimeoutError:
            raise StopRegexTimeout(f"stop_regex {pattern!r} took over {STOP_REGEX_TIMEOUT:g} s to search "
                                   "the output") from None
    return best
