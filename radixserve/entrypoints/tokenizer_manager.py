"""TokenizerManager: lives in the API process. Validates and tokenizes requests, sends them to the
scheduler and turns the detokenizer's increments back into per-request results."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from radixserve.ipc import PortArgs
from radixserve.messages import (
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GetStateReq,
    ReqOutput,
    SchedulerState,
    TokenizedGenerateReq,
)
from radixserve.sampling_params import SamplingParams, SamplingParamsError
from radixserve.utils.text import lone_surrogate_at

logger = logging.getLogger("radixserve.tokenizer_manager")


class RequestError(ValueError):
    """The request is invalid (HTTP 400). The message names the field; `param` is its name when
    the error is about one field (the native name: the OpenAI handlers rename it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_text(text: str, field: str) -> None:
    """A lone UTF-16 surrogate (JSON "\\ud800") is not text the tokenizer can encode: refuse it as
    the client's error. The HTTP schemas refuse it first; this guards every other way in (Engine)."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise RequestError(
            f"{field} has a lone UTF-16 surrogate ({text[at]!r}) at position {at}, which is not "
            "valid Unicode text", field,
        )


class ServerDeadError(RuntimeError):
    """A server process died; no request can be served."""


@dataclass
class SingleRequest:
    """One prompt with one set of sampling params (n > 1 is already expanded)."""

    rid: str
    text: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False


@dataclass
class ReqState:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Clock:
    start: float
    first: float | None = None
    last: float = 0.0


class TokenizerManager:
    def __init__(self, ports: PortArgs, tokenizer, info: dict[str, Any], liveness: Callable[[], str | None]) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.context_len: int = info["context_length"]
        self.vocab_size: int = info["vocab_size"]
        self.ports = ports
        self.liveness = liveness  # returns a message when a child process has died
        self.states: dict[str, ReqState] = {}
        self.control_waiters: dict[type, list[asyncio.Future]] = {}
        self.dead: str | None = None
        self._started = False
        self.metrics = None  # a Metrics object when serving HTTP

    # ---- loop plumbing ------------------------------------------------------
    def start(self) -> None:
        """Open the sockets and start the receive and watchdog tasks on the running loop."""
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        ctx = zmq.asyncio.Context.instance()
        self.send_sock = ctx.socket(zmq.PUSH)
        self.send_sock.setsockopt(zmq.LINGER, 0)
        self.send_sock.connect(self.ports.scheduler_input)
        self.recv_sock = ctx.socket(zmq.PULL)
        self.recv_sock.setsockopt(zmq.LINGER, 0)
        self.recv_sock.bind(self.ports.tokenizer_input)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._recv_loop()), loop.create_task(self._watch_loop())]

    async def close(self, reason: str = "the engine is shut down") -> None:
        """Fail whatever is still waiting and stop the background tasks."""
        self.dead = self.dead or reason
        for state in self.states.values():
            state.queue.put_nowait(ServerDeadError(self.dead))
        if not self._started:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.send_sock.close()
        self.recv_sock.close()

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            if isinstance(msg, BatchOut):
                for out in msg.outputs:
                    self._on_output(out)
            else:
                waiters = self.control_waiters.get(type(msg), [])
                if waiters:
                    waiters.pop(0).set_result(msg)

    async def _watch_loop(self) -> None:
        while self.dead is None:
            await asyncio.sleep(0.5)
            message = self.liveness()
            if message:
                self.dead = message
                logger.error("%s", message)
                for state in self.states.values():
                    state.queue.put_nowait(ServerDeadError(message))
                for waiters in self.control_waiters.values():
                    for w in waiters:
                        if not w.done():
                            w.set_exception(ServerDeadError(message))

    def _on_output(self, out: ReqOutput) -> None:
        state = self.states.get(out.rid)
        if state is not None:
            state.queue.put_nowait(out)

    async def _control(self, request: object, reply_type: type) -> Any:
        self._ensure_started()
        if self.dead:
            raise ServerDeadError(self.dead)
        fut = asyncio.get_running_loop().create_future()
        self.control_waiters.setdefault(reply_type, []).append(fut)
        await self.send_sock.send_pyobj(request)
        return await fut

    async def flush_cache(self) -> FlushCacheReply:
        return await self._control(FlushCacheReq(), FlushCacheReply)

    async def get_state(self) -> SchedulerState:
        return await self._control(GetStateReq(), SchedulerState)

    async def abort(self, rid: str) -> None:
        self._ensure_started()
        await self.send_sock.send_pyobj(AbortReq(rid))

    # ---- validation -----------------------------------------------------------
    def tokenize(self, req: SingleRequest) -> list[int]:
        if req.input_ids is not None:
            ids = req.input_ids
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise RequestError("input_ids must be a list of integers", "input_ids")
            return list(ids)
        if not isinstance(req.text, str):
            raise RequestError("text must be a string", "text")
        return self.encode(req.text, "text")

    def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of client text; field names the text in the error when it cannot be encoded."""
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send input_ids instead of text", field)
        check_text(text, field)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def validate(self, req: SingleRequest, ids: list[int]) -> SamplingParams:
        try:
            params = SamplingParams.from_dict(req.sampling_params)
        except SamplingParamsError as e:
            raise RequestError(str(e), e.param) from None
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"input_ids must be token ids in [0, {self.vocab_size})", "input_ids")
        if len(ids) >= self.context_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the context length is {self.context_len}", "prompt"
            )
        if params.max_new_tokens is not None and len(ids) + params.max_new_tokens > self.context_len:
            raise RequestError(
                f"max_new_tokens ({params.max_new_tokens}) + prompt tokens ({len(ids)}) exceeds the "
                f"context length ({self.context_len})", "max_new_tokens"
            )
        if req.top_logprobs_num < 0:
            raise RequestError("top_logprobs_num must be >= 0", "top_logprobs_num")
        for t in params.stop_token_ids or []:
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"stop_token_ids must be token ids in [0, {self.vocab_size})", "stop_token_ids")
        for t in params.logit_bias or {}:
            if t >= self.vocab_size:
                raise RequestError(f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias")
        return params

    # ---- generation -----------------------------------------------------------
    async def generate(self, req: SingleRequest) -> AsyncIterator[dict[str, Any]]:
        """Yields the cumulative result after each increment (streaming) or once at the end."""
        self._ensure_started()
        if self.dead:
            raise ServerDeadError(self.dead)
        ids = self.tokenize(req)
        params = self.validate(req, ids)
        if req.rid in self.states:
            raise RequestError(f"rid {req.rid!r} is already in flight")
        state = ReqState(input_ids=ids)
        self.states[req.rid] = state
        msg = TokenizedGenerateReq(
            rid=req.rid, input_ids=ids, sampling_params=dataclasses.asdict(params),
            return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num,
            logprob_start_len=req.logprob_start_len if req.return_logprob else -1, stream=req.stream,
        )
        finished = False
        clock = _Clock(time.perf_counter())
        try:
            await self.send_sock.send_pyobj(msg)
            while True:
                out = await state.queue.get()
                if isinstance(out, Exception):
                    raise out
                self._merge(state, out, req)
                self._observe(clock, out)
                if out.finish_reason is not None:
                    finished = True
                    reason = out.finish_reason
                    if reason.get("type") == "abort" and reason.get("status_code") == 400:
                        raise RequestError(reason.get("message", "invalid request"))
                    yield self._result(state)
                    return
                if req.stream:
                    yield self._result(state)
        finally:
            self.states.pop(req.rid, None)
            if not finished and self.metrics is not None:
                self.metrics.observe_finish(len(ids), len(state.output_ids), 0, time.perf_counter() - clock.start,
                                            aborted=True)
            if not finished and self.dead is None:
                # the caller went away (or failed) before the end: free the request's KV now
                await self.send_sock.send_pyobj(AbortReq(req.rid))

    def _observe(self, clock: _Clock, out: ReqOutput) -> None:
        if self.metrics is None:
            return
        now, new = time.perf_counter(), len(out.new_token_ids)
        if new and clock.first is None:
            clock.first = now
            self.metrics.observe_first_token(now - clock.start)
            self.metrics.observe_tokens(0.0, new - 1)
        elif new:
            self.metrics.observe_tokens(now - clock.last, new)
        if new:
            clock.last = now
        if out.finish_reason is not None:
            aborted = out.finish_reason.get("type") == "abort"
            self.metrics.observe_finish(out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                                        now - clock.start, aborted)

    def _merge(self, state: ReqState, out: ReqOutput, req: SingleRequest) -> None:
        state.text += out.text
        state.output_ids.extend(out.new_token_ids)
        meta = state.meta
        meta.update(
            id=req.rid, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens,
        )
        if req.return_logprob:
            meta.setdefault("output_token_logprobs", [])
            meta.setdefault("output_top_logprobs", [])
            meta.setdefault("input_token_logprobs", [])
            meta.setdefault("input_top_logprobs", [])
            start = len(meta["output_token_logprobs"])
            ids = state.output_ids[start : start + len(out.output_token_logprobs)]
            meta["output_token_logprobs"].extend((lp, t, None) for lp, t in zip(out.output_token_logprobs, ids))
            meta["output_top_logprobs"].extend(
                [(lp, t, None) for lp, t in top] for top in out.output_top_logprobs
            )
            if out.input_token_logprobs:
                self._merge_prompt_logprobs(meta, out, req, state.input_ids)

    @staticmethod
    def _merge_prompt_logprobs(meta: dict, out: ReqOutput, req: SingleRequest, ids: list[int]) -> None:
        start = max(req.logprob_start_len, 0) + len(meta["input_token_logprobs"])
        for k, lp in enumerate(out.input_token_logprobs):
            meta["input_token_logprobs"].append((lp, ids[start + k], None))
        for top in out.input_top_logprobs:
            meta["input_top_logprobs"].append(None if top is None else [(lp, t, None) for lp, t in top])

    @staticmethod
    def _result(state: ReqState) -> dict[str, Any]:
        return {"text": state.text, "output_ids": list(state.output_ids), "meta_info": dict(state.meta)}

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex


def validate_all(tm: TokenizerManager, reqs: list[SingleRequest]) -> None:
    """Check every request before any runs, so that one bad prompt fails the whole call cleanly."""
    for r in reqs:
        if r.input_ids is None:
            r.input_ids = tm.tokenize(r)  # tokenize once; generate() reuses the ids
            r.text = None
        tm.validate(r, r.input_ids)


async def collect(tm: TokenizerManager, reqs: list[SingleRequest]) -> list[dict[str, Any]]:
    """Run requests to completion, all validated before any starts."""
    validate_all(tm, reqs)

    async def one(r: SingleRequest) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for out in tm.generate(r):
            last = out
        return last

    tasks = [asyncio.ensure_future(one(r)) for r in reqs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
