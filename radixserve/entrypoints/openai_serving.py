"""/v1/completions and /v1/chat/completions on top of the TokenizerManager."""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import accumulate
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from radixserve.entrypoints.errors import APIError, JSONBytes, error_body
from radixserve.entrypoints.openai_common import (
    as_api_error,
    collect,
    finish_reason_of,
    in_client_terms,
    matched_stop_of,
    merged_streams,
    new_id,
    now,
    openai_names,
    sampling_params_of,
    sse,
    token_text,
    until_disconnect,
    usage_of,
    usage_options,
    usage_so_far,
    validate_all,
)
from radixserve.entrypoints.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from radixserve.entrypoints.requests import expand_requests
from radixserve.entrypoints.tokenizer_manager import TokenizerManager


class OpenAIServing:
    def __init__(self, tm: TokenizerManager, served_model_name: str, chat_template: str | None) -> None:
        self.tm = tm
        self.model_name = served_model_name
        if chat_template is not None:
            tm.tokenizer.chat_template = chat_template

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    # ---- completions --------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        if req.logprobs is not None:
            self.check_logprobs_count(req.logprobs, "logprobs")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:  # best_of == n is every sample: plain n
            raise APIError(400, f"best_of other than n is not supported (best_of {req.best_of}, n {req.n})",
                           "best_of")
        prompt = req.prompt
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        as_ids = isinstance(prompt, list) and not isinstance(prompt[0], str)
        want_logprobs = req.logprobs is not None
        with in_client_terms(openai_names(req, "max_tokens", "prompt")):
            reqs, _ = expand_requests(
                None if as_ids else prompt, prompt if as_ids else None, sampling_params_of(req, req.max_tokens),
                return_logprob=want_logprobs, top_logprobs_num=req.logprobs or 0,
                logprob_start_len=0 if (want_logprobs and req.echo) else None, stream=req.stream,
                bootstrap=req.bootstrap(),
            )
            texts = [r.text for r in reqs]  # validation tokenizes them, and clears r.text
            # before decoding: an id out of the vocabulary is the client's error
            await validate_all(self.tm, reqs)
        rid, created = new_id("cmpl"), now()
        prompts = [""] * len(reqs)  # the echoed prompt text: only echo needs it, so only echo decodes ids
        if req.echo:
            tokenizer = self.tm.tokenizer
            prompts = [t if t is not None else tokenizer.decode(r.input_ids) if tokenizer else ""
                       for t, r in zip(texts, reqs)]
        if req.stream:
            return self._stream(self._completion_chunks(req, reqs, prompts, rid, created))
        results = await until_disconnect(raw, collect(self.tm, reqs, validated=True))
        choices = []
        for i, res in enumerate(results):
            text = prompts[i] + res["text"]
            choices.append({
                "index": i, "text": text,
                "logprobs": self._completion_logprobs(res, req.echo) if want_logprobs else None,
                "finish_reason": finish_reason_of(res["meta_info"]),
                "matched_stop": matched_stop_of(res["meta_info"]),
            })
        return JSONBytes({
            "id": rid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": usage_of(results, req.n),
        })

    def _completion_logprobs(self, res: dict[str, Any], echo: bool, start: int = 0, offset: int = 0,
                             prompt_only: bool = False) -> dict[str, Any]:
        """Logprobs of the prompt (echo) and of the output tokens from the start-th on; offset is
        the text_offset of the first token (the characters of the tokens before it)."""
        meta = res["meta_info"]
        entries = list(meta.get("input_token_logprobs") or []) if echo else []
        tops = list(meta.get("input_top_logprobs") or []) if echo else []
        if not prompt_only:
            entries += meta.get("output_token_logprobs", [])[start:]
            tops += meta.get("output_top_logprobs", [])[start:]
        tokens = [token_text(self.tm, t) for _, t, _ in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [
                None if top is None else {token_text(self.tm, t): lp for lp, t, _ in top} for top in tops
            ],
            "text_offset": list(accumulate((len(x) for x in tokens), initial=offset))[:-1],
        }

    async def _completion_chunks(self, req, reqs, prompts, rid, created) -> AsyncIterator[bytes]:
        sent_lp = [0] * len(reqs)
        finals: dict[int, dict[str, Any]] = {}
        include_usage, continuous = usage_options(req)

        def chunk(i: int, text: str, logprobs: Any, finish: str | None, matched: Any = None,
                  res: dict[str, Any] | None = None) -> bytes:
            body = {
                "id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish,
                             "matched_stop": matched}],
            }
            if continuous:
                body["usage"] = usage_so_far(reqs[i], res)
            return sse(body)

        want_logprobs = req.logprobs is not None
        offsets = [0] * len(reqs)  # text_offset of each choice's next token
        # The prompt's logprobs come with a request's first result: with logprobs, the echoed prompt
        # waits for them, so that the stream carries what the non-streaming answer does.
        echo_pending = set(range(len(reqs))) if req.echo and want_logprobs else set()
        if req.echo and not want_logprobs:
            for i, p in enumerate(prompts):
                yield chunk(i, p, None, None)
        async for i, p in merged_streams(self.tm, reqs):
            res = p.view()  # no copies: each increment costs its own size
            if i in echo_pending:
                echo_pending.discard(i)
                prompt_lp = self._completion_logprobs(res, True, prompt_only=True)
                offsets[i] = sum(len(t) for t in prompt_lp["tokens"])
                yield chunk(i, prompts[i], prompt_lp, None, res=res)
            delta = p.new_text
            logprobs = None
            if want_logprobs:
                logprobs = self._completion_logprobs(res, False, sent_lp[i], offsets[i])
                sent_lp[i] = len(res["meta_info"].get("output_token_logprobs", []))
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            finish = finish_reason_of(res["meta_info"])
            if finish is not None:  # the last chunk carries the end, as OpenAI's completion streams do
                finals[i] = res
                yield chunk(i, delta, logprobs, finish, matched_stop_of(res["meta_info"]), res)
            elif delta or logprobs and logprobs["tokens"]:
                yield chunk(i, delta, logprobs, None, res=res)
        if include_usage:
            results = [finals[i] for i in range(len(reqs))]
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [], "usage": usage_of(results, req.n)})

    # ---- chat ---------------------------------------------------------------------
    def apply_template(self, req: ChatCompletionRequest) -> str:
        if not req.messages:
            raise APIError(400, "messages must not be empty", "messages")
        tok = self.tm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; start the server with --chat-template")
        kwargs = req.chat_template_kwargs or {}
        if "chat_template" in kwargs:
            # a template is a program the server runs: one from a request can loop for minutes in
            # the event loop (every request stalls) or fill the memory. vLLM refuses it too.
            raise APIError(400, "chat_template_kwargs.chat_template is not accepted: a request cannot bring its "
                           "own chat template (the server's is set by --chat-template)",
                           "chat_template_kwargs.chat_template")
        messages = [{"role": m.role, "content": self._content_text(m, i)} for i, m in enumerate(req.messages)]
        try:
            return tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt
                and not req.continue_final_message, continue_final_message=req.continue_final_message,
                **kwargs,
            )
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"chat template failed: {e}", "messages") from None

    @staticmethod
    def _content_text(m: ChatMessage, index: int) -> str:
        if m.content is None:
            return ""
        if isinstance(m.content, str):
            return m.content
        parts = []
        for k, part in enumerate(m.content):
            where = f"messages.{index}.content.{k}"
            if part.type != "text":
                raise APIError(400, f"{where}: content part type {part.type!r} is not supported", where + ".type")
            if part.text is None:
                raise APIError(400, f"{where}.text is required for a text part", where + ".text")
            parts.append(part.text)
        return "".join(parts)

    def check_logprobs_count(self, value: int, name: str) -> None:
        cap = self.tm.validator.max_logprobs
        if value < 0 or 0 <= cap < value:
            allowed = f"[0, {cap}] (--max-logprobs)" if cap >= 0 else ">= 0"
            raise APIError(400, f"{name} must be in {allowed}, got {value}", name)

    def check_chat_fields(self, req: ChatCompletionRequest) -> None:
        if req.top_logprobs is not None:
            self.check_logprobs_count(req.top_logprobs, "top_logprobs")
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        if req.tools and req.tool_choice != "none":
            # vLLM without a tool-call parser refuses too; tool_choice "none" sends no tools at all
            raise APIError(400, "tool calling is not supported by this server; send tool_choice \"none\" "
                           "or no tools", "tools")
        for i, m in enumerate(req.messages):
            if m.content is None and m.role != "assistant":
                raise APIError(400, f"messages.{i}.content is required for role {m.role!r}", f"messages.{i}.content")

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        self.check_chat_fields(req)
        prompt = self.apply_template(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params_of(req, max_tokens)
        ids = self.tm.validator.encode(prompt, "messages", add_special_tokens=False)
        top = req.top_logprobs or 0 if req.logprobs else 0
        max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        with in_client_terms(openai_names(req, max_name, "messages"), "max_completion_tokens"):
            reqs, _ = expand_requests(None, ids, params, return_logprob=req.logprobs, top_logprobs_num=top,
                                      stream=req.stream, bootstrap=req.bootstrap())
            await validate_all(self.tm, reqs)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            return self._stream(self._chat_chunks(req, reqs, rid, created))
        results = await until_disconnect(raw, collect(self.tm, reqs, validated=True))
        choices = [{
            "index": i,
            # reasoning_content: always there (null without a reasoning parser), as SGLang sends it, so
            # clients that read it find the key
            "message": {"role": "assistant", "content": res["text"], "reasoning_content": None},
            "logprobs": {"content": self._chat_logprobs(res)} if req.logprobs else None,
            "finish_reason": finish_reason_of(res["meta_info"]),
            "matched_stop": matched_stop_of(res["meta_info"]),
        } for i, res in enumerate(results)]
        return JSONBytes({
            "id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": choices, "usage": usage_of(results, req.n),
        })

    def _chat_logprobs(self, res: dict[str, Any], start: int = 0) -> list[dict[str, Any]]:
        meta = res["meta_info"]
        entries = meta.get("output_token_logprobs", [])[start:]
        tops = meta.get("output_top_logprobs", [])[start:]
        out = []
        for k, (lp, t, _) in enumerate(entries):
            text = token_text(self.tm, t)
            alts = tops[k] if k < len(tops) else []
            out.append({
                "token": text, "logprob": lp, "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": token_text(self.tm, a), "logprob": alp, "bytes": list(token_text(self.tm, a).encode())}
                    for alp, a, _ in alts
                ],
            })
        return out

    async def _chat_chunks(self, req, reqs, rid, created) -> AsyncIterator[bytes]:
        sent_lp = [0] * len(reqs)
        finals: dict[int, dict[str, Any]] = {}
        include_usage, continuous = usage_options(req)

        def chunk(i: int, delta: dict, logprobs: Any = None, finish: str | None = None, matched=None,
                  res: dict[str, Any] | None = None) -> bytes:
            body = {
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "choices": [{"index": i, "delta": {**delta, "reasoning_content": None}, "logprobs": logprobs,
                             "finish_reason": finish, "matched_stop": matched}],
            }
            if continuous:
                body["usage"] = usage_so_far(reqs[i], res)
            return sse(body)

        for i in range(len(reqs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, p in merged_streams(self.tm, reqs):
            res = p.view()  # no copies: each increment costs its own size
            delta = p.new_text
            logprobs = None
            if req.logprobs:
                logprobs = {"content": self._chat_logprobs(res, sent_lp[i])}
                sent_lp[i] = len(res["meta_info"].get("output_token_logprobs", []))
            if delta or (logprobs and logprobs["content"]):
                yield chunk(i, {"content": delta}, logprobs, res=res)
            finish = finish_reason_of(res["meta_info"])
            if finish is not None:
                finals[i] = res
                yield chunk(i, {}, None, finish, matched_stop_of(res["meta_info"]), res)
        if include_usage:
            results = [finals[i] for i in range(len(reqs))]
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": self.model_name, "choices": [], "usage": usage_of(results, req.n)})

    # ---- streaming ------------------------------------------------------------------
    @staticmethod
    def _stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for c in chunks:
                    yield c
            except Exception as e:  # the status line is gone already: report in-band, then end
                err = as_api_error(e)
                yield sse(error_body(err.status, err.message, err.param))
            yield sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream")
