"""A request's output text: the one place where its tokens become text and where stop strings and
stop regexes end it (the min_new_tokens floor included). The detokenizer process keeps one per
request; the scheduler decodes no text and learns of a stop from the detokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixserve.detokenize import IncrementalDetokenizer, StopRegexTimeout, find_stop, find_stop_regex
from radixserve.messages import ReqOutput

# characters of a stream held back while a stop_regex could still match them (a longer match that
# starts earlier may already have been sent when it completes)
REGEX_HOLDBACK = 32


@dataclass
class StopHit:
    tokens: int  # output tokens up to and including the one that completed the stop
    matched: str  # the stop string, or the stop_regex pattern
    start: int  # where the match begins in the text: the text ends there (unless no_stop_trim)


class RequestText:
    """Decodes one request's output tokens, finds its stops and says how much text may be sent.

    Without stops, tokens are decoded as they come. With stops, they are decoded one at a time and
    the text is searched after each, so a stop is found at the token that completes it. The first
    min_new_tokens - 1 tokens may not end a stop (their text is the floor a match must end past): a
    request that asks for at least min_new_tokens tokens is not ended before its min_new_tokens-th.
    """

    def __init__(self, tokenizer: Any, first: ReqOutput) -> None:
        self.decoder = IncrementalDetokenizer(tokenizer, None, first.skip_special_tokens,
                                              first.spaces_between_special_tokens)
        self.stops = [s for s in first.stop_strings if s]
        self.regexes = list(first.stop_regexes)
        self.max_stop_len = max(map(len, self.stops), default=0)
        self.floor_tokens = max(first.min_new_tokens - 1, 0)
        self.stream = first.stream
        self.no_stop_trim = first.no_stop_trim
        self.tokens = 0  # output tokens decoded
        self.stop_floor = 0  # characters no stop may end in
        self.emitted = 0  # characters sent
        self.hit: StopHit | None = None
        self.error: str | None = None  # a stop_regex that searched too long

    @property
    def has_stops(self) -> bool:
        return bool(self.stops or self.regexes)

    def add(self, ids: list[int]) -> int:
        """Decode ids; returns how many of them belong to the text: all, or up to the stop's token."""
        if not self.has_stops:
            self.decoder.add(ids)
            self.tokens += len(ids)
            return len(ids)
        for k, token in enumerate(ids):
            searched = len(self.decoder.text)  # text (all of it final) searched at earlier tokens
            self.decoder.add([token])
            self.tokens += 1
            if self.tokens <= self.floor_tokens:
                self.stop_floor = len(self.decoder.text)
                continue
            try:
                self.hit = self._search(searched)
            except StopRegexTimeout as e:  # the client's pattern: its error, and no further searches
                self.error = str(e)
                return k + 1
            if self.hit is not None:
                return k + 1
        return len(ids)

    def _search(self, searched: int) -> StopHit | None:
        # the held-back tail of an incomplete character is searched too, as decode(ids) gives it:
        # a token may complete a stop and begin the next character
        text = self.decoder.peek()
        found = None
        if self.stops:
            found = find_stop(text, self.stops, max(0, searched - self.max_stop_len + 1), self.stop_floor)
        if self.regexes:
            by_regex = find_stop_regex(text, self.regexes, end_after=self.stop_floor)
            if by_regex is not None and (found is None or by_regex[0] < found[0]):
                found = by_regex
        return None if found is None else StopHit(self.tokens, found[1], found[0])

    def take(self, final: bool) -> str:
        """The text not sent yet that may be sent now; final: the request has ended (its whole text,
        a trailing incomplete character as U+FFFD, as tokenizer.decode gives it)."""
        if final or self.hit is not None:
            self.decoder.flush()
        text = self.decoder.text
        end = len(text)
        if self.hit is not None and not self.no_stop_trim:
            end = self.hit.start
        elif not final and self.hit is None:
            if self.stops:  # hold back what could be the start of a stop (none can end before the floor)
                end = max(end - (self.max_stop_len - 1), min(end, self.stop_floor))
            if self.regexes:
                # a regex has no prefix test: a non-streaming request's text waits for its end (it is
                # sent only then anyway); a stream holds back its last REGEX_HOLDBACK characters
                end = min(end, end - REGEX_HOLDBACK if self.stream else self.emitted)
        start, self.emitted = self.emitted, max(end, self.emitted)
        return text[start:self.emitted]
