"""Reading a streamed reply: server-sent events split into payloads, and each backend's payload turned
into the text, token count and end of one increment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NATIVE = ("radixserve", "sglang")  # backends that speak the native /generate


class SSEParser:
    """Incremental text/event-stream parser: feed raw bytes, get the `data` of each complete event.

    Network reads split lines anywhere, so a partial line waits in the buffer for the rest.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        events: list[str] = []
        for line in lines:
            self._line(line.rstrip(b"\r").decode("utf-8"), events)
        return events

    def close(self) -> list[str]:
        """Events left when the stream ends without a final blank line."""
        events: list[str] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r").decode("utf-8"), events)
            self._buf = b""
        self._line("", events)
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        name, _, value = line.partition(":")
        if name == "data":  # comments (":...") and other fields (event, id, retry) carry no payload
            self._data.append(value[1:] if value.startswith(" ") else value)


@dataclass
class Delta:
    """What one streamed JSON chunk adds."""

    text: str = ""
    has_content: bool = False  # new text, or (native) new tokens whose text is not complete yet
    num_tokens: int | None = None  # new tokens, where the format tells (else one per content chunk)
    error: str | None = None


def _error_text(obj: dict[str, Any]) -> str | None:
    err = obj.get("error")
    if err is None and obj.get("object") == "error":
        err = obj
    if err is None:
        return None
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


class StreamDecoder:
    """Turns one request's stream of JSON chunks into deltas and remembers the server's token count.

    OpenAI chunks carry new text (`choices[0].text` or `choices[0].delta.content`) and, with
    `stream_options.include_usage`, a final chunk with `usage` and no choices; a server that reports usage
    on every chunk (vLLM's continuous_usage_stats) also gives exact tokens per chunk. Native /generate
    chunks are cumulative: the whole text so far and `meta_info.completion_tokens` (or `output_ids`).
    Either may carry the server's prompt count and prefix-cache hits: `meta_info.prompt_tokens` and
    `cached_tokens`, or `usage.prompt_tokens` and `usage.prompt_tokens_details.cached_tokens`.
    """

    def __init__(self, backend: str) -> None:
        self.native = backend in NATIVE
        self.chat = backend == "openai-chat"
        self.completion_tokens: int | None = None  # the server's latest count
        # the prompt as the server counted it and how much of it came from its prefix cache, where it says
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self._text_len = 0

    def feed(self, obj: dict[str, Any]) -> Delta:
        error = _error_text(obj)
        if error is not None:
            return Delta(error=error)
        if self.native:
            full = str(obj.get("text") or "")
            text, self._text_len = full[self._text_len:], max(self._text_len, len(full))
            meta = obj.get("meta_info") or {}
            self._prompt_counts(meta.get("prompt_tokens"), meta.get("cached_tokens"))
            count = meta.get("completion_tokens")
            if count is None and obj.get("output_ids") is not None:
                count = len(obj["output_ids"])
            # native counts are cumulative from the first chunk on
            new = None if count is None else int(count) - (self.completion_tokens or 0)
        else:
            choices = obj.get("choices") or []
            text = ""
            if choices and self.chat:
                delta = choices[0].get("delta") or {}
                text = delta.get("content") or delta.get("reasoning_content") or ""
            elif choices:
                text = choices[0].get("text") or ""
            usage = obj.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}  # vLLM may send null here
            self._prompt_counts(usage.get("prompt_tokens"), details.get("cached_tokens"))
            count = usage.get("completion_tokens")
            # a lone final usage says nothing about one chunk; per-chunk usage does
            prev = self.completion_tokens
            new = None if count is None or prev is None else int(count) - prev
        if count is not None:
            self.completion_tokens = int(count)
        content = bool(text) or (self.native and (new or 0) > 0)
        return Delta(text=text, has_content=content, num_tokens=new)

    def _prompt_counts(self, prompt: Any, cached: Any) -> None:
        if prompt is not None:
            self.prompt_tokens = int(prompt)
        if cached is not None:
            self.cached_tokens = int(cached)


# ---- one request ---------------------------------------------------------------------------------
