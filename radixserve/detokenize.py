"""Incremental detokenization and stop-string helpers.

Used by the detokenizer process (streaming text) and by the scheduler (stop strings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens decoded as left context for the first output tokens, so that tokenizers whose
# decode depends on the previous token (sentencepiece leading spaces) behave as in context.
PROMPT_CONTEXT_TOKENS = 5

# Extra tokens in StopChecker's window beyond one token per stop-string byte: up to 3 tokens of a
# multi-byte character left incomplete at the previous check, plus slack for a sentencepiece
# window start that drops a leading space.
STOP_WINDOW_SLACK = 8

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


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut text before its first stop string (the stop is removed); the flag says whether it cut."""
    found = find_stop(text, stops)
    if found is None:
        return text, False
    return text[: found[0]], True


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in decoder.items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)


class StopChecker:
    """Per-request stop-string detector for the scheduler, cheap per step.

    Window choice: every ordinary token (byte-level BPE, sentencepiece with byte fallback)
    decodes to at least one UTF-8 byte, so a stop string of B bytes touches at most B tokens.
    The stop was not in the text at the previous check, so it ends at or after the last
    character that was complete then: at most 3 tokens before the previously checked length
    (an incomplete 4-byte character). Hence decoding from
    `prev_len - B - STOP_WINDOW_SLACK` covers it, even when several tokens arrived at once.
    Skipped special tokens decode to nothing, so each one inside the window widens it by one.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], skip_special_tokens: bool = True,
                 regexes: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        # regexes have no length bound: they are searched over the whole output text each check
        self.regexes = list(regexes)
        self._skip = skip_special_tokens
        self._special = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        # surrogatepass: SamplingParams refuses stops that are not valid Unicode; should one get
        # here anyway it must not kill the scheduler (it can never match decoded text).
        self._window = max((len(s.encode("utf-8", "surrogatepass")) for s in self.stops), default=0)
        self._window += STOP_WINDOW_SLACK
        self._checked_len = 0
        self._floor = 0  # output tokens passed over (skip_to): a stop may lie in them unacted on
        self._floor_text_len = (0, 0)  # (floor, length of its decoded text), for stop regexes
        self.matched: str | None = None  # the stop string found by the last True check

    def skip_to(self, n: int) -> None:
        """The first n output tokens may not end a stop string (min_new_tokens): the next check
        matches only text that ends past them."""
        self._checked_len = n
        self._floor = n

    def check(self, output_ids: Sequence[int]) -> bool:
        """True once the decoded output contains a stop string (possibly split across tokens) or
        matches a stop regex. A stop regex that searches too long raises StopRegexTimeout."""
        if not self.stops and not self.regexes:
            return False
        n = len(output_ids)
        prev = min(self._checked_len, n)
        self._checked_len = n
        if n == prev:
            return False
        if self.regexes:
            text = _decode(self._tokenizer, output_ids, self._skip, True)
            if self._floor_text_len[0] != self._floor:  # the floor moves only under min_new_tokens
                floor = _decode(self._tokenizer, output_ids[: self._floor], self._skip, True) if self._floor else ""
                self._floor_text_len = (self._floor, len(floor.rstrip(_REPLACEMENT)))
            end_after = self._floor_text_len[1]
            found = find_stop(text, self.stops, end_after=end_after)
            by_regex = find_stop_regex(text, self.regexes, end_after=end_after)
            if by_regex is not None and (found is None or by_regex[0] < found[0]):
                found = by_regex
            self.matched = found[1] if found else None
            return found is not None
        if not self.stops:
            return False
        start = max(0, prev - self._window)
        if self._special:
            start = self._widen_for_special(output_ids, start, n)
        text = _decode(self._tokenizer, output_ids[start:n], self._skip, True)
        end_after = 0
        if start < self._floor:  # the invariant above does not hold for passed-over tokens
            floor_text = _decode(self._tokenizer, output_ids[start : self._floor], self._skip, True)
            end_after = len(floor_text.rstrip(_REPLACEMENT))
        found = find_stop(text, self.stops, end_after=end_after)
        self.matched = found[1] if found else None
        return found is not None

    def _widen_for_special(self, ids: Sequence[int], start: int, end: int) -> int:
        missing = sum(1 for t in ids[start:end] if t in self._special)
        while missing and start > 0:
            new_start = max(0, start - missing)
            missing = sum(1 for t in ids[new_start:start] if t in self._special)
            start = new_start
        return start
