"""TokenizerManager: lives in the API process. Validates and tokenizes requests, sends them to the
scheduler and turns the detokenizer's increments back into per-request results."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from radixserve import ipc_codec
from radixserve.entrypoints.request_errors import RequestAborted, RequestError, ServerDeadError, check_text
from radixserve.ipc import PortArgs
from radixserve.messages import (
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GetStateReq,
    ReqOutput,
    SchedulerState,
    TokenizedGenerateReq,
)
from radixserve.request_limits import RequestLimits
from radixserve.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger("radixserve.tokenizer_manager")


MAX_N = 128  # samples per prompt: OpenAI's limit
VALIDATE_BATCH = 256  # requests validated between yields to the event loop (/health stays live)
SEND_BATCH = 4096  # requests per message to the scheduler: a call of up to this many is one message


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
    params: SamplingParams | None = None  # set by validation (which also tokenizes the text)


@dataclass
class _Clock:
    start: float
    first: float | None = None
    last: float = 0.0


@dataclass
class Progress:
    """What has arrived for one request of a call, kept up to date as increments arrive: each costs
    O(its own size). `new_text` is the latest increment's text; readers that send deltas (OpenAI
    streams) read it and the lists of `meta` from where they stopped; `result()` is a snapshot."""

    req: SingleRequest
    clock: _Clock
    parts: list[str] = field(default_factory=list)  # text increments, joined on demand
    new_text: str = ""
    output_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    @property
    def finished(self) -> bool:
        return self.meta.get("finish_reason") is not None

    def result(self) -> dict[str, Any]:
        """The result so far as a new dict: later increments do not change it."""
        meta = {k: list(v) if isinstance(v, list) else v for k, v in self.meta.items()}
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def view(self) -> dict[str, Any]:
        """The live state in the result's shape, without copies (text: this increment's only)."""
        return {"text": self.new_text, "output_ids": self.output_ids, "meta_info": self.meta}


class TokenizerManager:
    def __init__(self, ports: PortArgs, tokenizer, info: dict[str, Any], liveness: Callable[[], str | None],
                 max_logprobs: int = 20) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.context_len: int = info["context_length"]
        self.vocab_size: int = info["vocab_size"]
        self.limits = RequestLimits(self.context_len, info.get("max_total_num_tokens", self.context_len))
        self.max_logprobs = max_logprobs  # top logprobs per token; -1: no cap
        self.ports = ports
        self.liveness = liveness  # returns a message when a child process has died
        # rid -> (the queue of the call it belongs to, its index in that call)
        self.routes: dict[str, tuple[asyncio.Queue, int]] = {}
        # requests ended by a stop in their text that the scheduler has not let go of yet: a rid is
        # reused, and the scheduler's state read, only once it has (see ReqOutput.scheduler_holds)
        self.draining: dict[str, asyncio.Event] = {}
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

    def _fail_all(self, error: Exception) -> None:
        for queue in {id(q): q for q, _ in self.routes.values()}.values():
            queue.put_nowait((-1, error))
        for event in self.draining.values():  # nothing will let them go now
            event.set()
        self.draining.clear()

    async def _drained(self, rids: list[str] | None = None) -> None:
        """Wait until the scheduler has let go of these requests (None: of all) ended by a stop."""
        events = list(self.draining.values()) if rids is None else [
            self.draining[rid] for rid in rids if rid in self.draining]
        for event in events:
            await event.wait()

    async def close(self, reason: str = "the engine is shut down") -> None:
        """Fail whatever is still waiting and stop the background tasks."""
        self.dead = self.dead or reason
        self._fail_all(ServerDeadError(self.dead))
        if not self._started:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.send_sock.close()
        self.recv_sock.close()

    async def _recv_loop(self) -> None:
        while True:
            msg = await ipc_codec.recv_async(self.recv_sock)
            if isinstance(msg, BatchOut):
                for out in msg.outputs:
                    route = self.routes.get(out.rid)
                    if route is not None:
                        route[0].put_nowait((route[1], out))
                    if out.scheduler_holds:
                        self.draining[out.rid] = asyncio.Event()
                for rid in msg.released:
                    event = self.draining.pop(rid, None)
                    if event is not None:
                        event.set()
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
                self._fail_all(ServerDeadError(message))
                for waiters in self.control_waiters.values():
                    for w in waiters:
                        if not w.done():
                            w.set_exception(ServerDeadError(message))

    async def _control(self, request: object, reply_type: type) -> Any:
        self._ensure_started()
        if self.dead:
            raise ServerDeadError(self.dead)
        await self._drained()  # what the scheduler reports includes every request already answered
        fut = asyncio.get_running_loop().create_future()
        self.control_waiters.setdefault(reply_type, []).append(fut)
        await ipc_codec.send_async(self.send_sock, request)
        return await fut

    async def flush_cache(self) -> FlushCacheReply:
        return await self._control(FlushCacheReq(), FlushCacheReply)

    async def get_state(self) -> SchedulerState:
        return await self._control(GetStateReq(), SchedulerState)

    async def abort(self, rid: str) -> None:
        """An operator's abort (/abort_request, Engine.abort_request): "" aborts every request. The
        requests end with finish_reason abort."""
        self._ensure_started()
        await ipc_codec.send_async(self.send_sock, AbortReq([rid], abort_all=rid == ""))

    async def abort_all(self, status: int, message: str) -> None:
        """End every request with an error of this status (the shutdown timeout)."""
        self._ensure_started()
        await ipc_codec.send_async(self.send_sock, AbortReq(abort_all=True, message=message, status_code=status))

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
        problem = self.limits.check(len(ids), params.max_new_tokens)
        if problem is not None:
            raise RequestError(*problem)
        if req.top_logprobs_num < 0:
            raise RequestError("top_logprobs_num must be >= 0", "top_logprobs_num")
        if 0 <= self.max_logprobs < req.top_logprobs_num:
            raise RequestError(f"top_logprobs_num must be at most {self.max_logprobs} (--max-logprobs), "
                               f"got {req.top_logprobs_num}", "top_logprobs_num")
        # stop_token_ids past the vocabulary are kept, as vLLM and SGLang keep them: they can
        # never be sampled, so they never stop anything (clients share one list across models).
        for t in params.logit_bias or {}:
            if t >= self.vocab_size:
                raise RequestError(f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias")
        return params

    # ---- generation -----------------------------------------------------------
    async def run(self, reqs: list[SingleRequest]) -> AsyncIterator[tuple[int, Progress]]:
        """Send a call's requests to the scheduler as one message and yield (index, progress): at
        every increment of a streaming request, at the end of the others. The progress is live (read
        it before the next one; `result()` for a copy). Requests still unfinished when the caller
        stops (or fails) are aborted, in one message."""
        self._ensure_started()
        if self.dead:
            raise ServerDeadError(self.dead)
        await validate_all(self, reqs)
        rids = [r.rid for r in reqs]
        if self.draining:
            await self._drained(rids)
        if len(set(rids)) != len(rids) or any(rid in self.routes for rid in rids):
            taken = next(rid for k, rid in enumerate(rids) if rid in self.routes or rid in rids[:k])
            raise RequestError(f"rid {taken!r} is already in flight", "rid")
        queue: asyncio.Queue = asyncio.Queue()
        start = time.perf_counter()
        progress: dict[int, Progress] = {}  # made on a request's first output: a call may be huge
        finished = bytearray(len(reqs))
        for i, rid in enumerate(rids):
            self.routes[rid] = (queue, i)
        unfinished = len(reqs)
        try:
            for part in range(0, len(reqs), SEND_BATCH):  # a huge call: the loop breathes between parts
                if part:
                    await asyncio.sleep(0)
                batch = GenerateBatch([self._message(r) for r in reqs[part:part + SEND_BATCH]])
                await ipc_codec.send_async(self.send_sock, batch)
            while unfinished:
                i, out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                p = progress.get(i) or progress.setdefault(i, Progress(reqs[i], _Clock(start)))
                self._merge(p, out)
                self._observe(p.clock, out)
                if out.finish_reason is None:
                    if p.req.stream:
                        yield i, p
                    continue
                finished[i] = 1
                unfinished -= 1
                self.routes.pop(p.req.rid, None)
                del progress[i]
                reason = out.finish_reason
                if reason.get("type") == "abort" and reason.get("status_code") is not None:
                    if reason["status_code"] == 400:
                        raise RequestError(reason.get("message", "invalid request"))
                    raise RequestAborted(reason["status_code"], reason.get("message", "aborted"))
                yield i, p
        finally:
            left = [r for i, r in enumerate(reqs) if not finished[i]]
            for r in left:
                self.routes.pop(r.rid, None)
            if self.metrics is not None:
                self.metrics.observe_abandoned(len(left), sum(len(r.input_ids or ()) for r in left),
                                               sum(len(p.output_ids) for p in progress.values()))
            if left and self.dead is None:
                # the caller went away (or failed) before the end: free their KV now
                await ipc_codec.send_async(self.send_sock, AbortReq([r.rid for r in left]))

    async def generate(self, req: SingleRequest) -> AsyncIterator[dict[str, Any]]:
        """One request: its cumulative result at each increment (streaming), or its final result."""
        async with aclosing(self.run([req])) as results:
            async for _, p in results:
                yield p.result()

    @staticmethod
    def _message(req: SingleRequest) -> TokenizedGenerateReq:
        assert req.params is not None and req.input_ids is not None, "validate first"
        return TokenizedGenerateReq(
            rid=req.rid, input_ids=req.input_ids, sampling_params=req.params,
            return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num,
            logprob_start_len=req.logprob_start_len if req.return_logprob else -1, stream=req.stream,
        )

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

    def _merge(self, p: Progress, out: ReqOutput) -> None:
        req = p.req
        p.parts.append(out.text)
        p.new_text = out.text
        p.output_ids.extend(out.new_token_ids)
        meta = p.meta
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
            ids = p.output_ids[start : start + len(out.output_token_logprobs)]
            meta["output_token_logprobs"].extend((lp, t, None) for lp, t in zip(out.output_token_logprobs, ids))
            meta["output_top_logprobs"].extend(
                [(lp, t, None) for lp, t in top] for top in out.output_top_logprobs
            )
            if out.input_token_logprobs:
                self._merge_prompt_logprobs(meta, out, req, req.input_ids or [])

    @staticmethod
    def _merge_prompt_logprobs(meta: dict, out: ReqOutput, req: SingleRequest, ids: list[int]) -> None:
        start = max(req.logprob_start_len, 0) + len(meta["input_token_logprobs"])
        for k, lp in enumerate(out.input_token_logprobs):
            meta["input_token_logprobs"].append((lp, ids[start + k], None))
        for top in out.input_top_logprobs:
            meta["input_top_logprobs"].append(None if top is None else [(lp, t, None) for lp, t in top])

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex


async def validate_all(tm: TokenizerManager, reqs: list[SingleRequest]) -> None:
    """Tokenize and check every request before any runs, so that one bad prompt fails the whole call
    cleanly. A call's n samples share their prompt and parameters, so each distinct prompt is
    tokenized and each distinct (prompt, parameters) pair checked once; a large call yields to the
    event loop as it goes. Requests validated before are skipped."""
    ids_of_text: dict[str, list[int]] = {}
    ids_of_list: dict[int, tuple[list[int], list[int]]] = {}  # id -> (the given list, kept alive; checked)
    params_of: dict[tuple[int, int, int], SamplingParams] = {}
    for k, r in enumerate(reqs):
        if r.params is not None:
            continue
        if r.input_ids is None:
            ids = ids_of_text.get(r.text) if isinstance(r.text, str) else None
            if ids is None:
                ids = tm.tokenize(r)
                if isinstance(r.text, str):
                    ids_of_text[r.text] = ids
            r.text = None
        else:
            known = ids_of_list.get(id(r.input_ids))
            ids = known[1] if known is not None else tm.tokenize(r)
            ids_of_list.setdefault(id(r.input_ids), (r.input_ids, ids))
        r.input_ids = ids
        key = (id(r.sampling_params), id(ids), r.top_logprobs_num)
        params = params_of.get(key)
        if params is None:  # r.sampling_params and ids stay alive (held above), so ids are not reused
            params = params_of[key] = tm.validate(r, ids)
        r.params = params
        if k % VALIDATE_BATCH == VALIDATE_BATCH - 1:
            await asyncio.sleep(0)


async def collect(tm: TokenizerManager, reqs: list[SingleRequest]) -> list[dict[str, Any]]:
    """Run requests to completion (all validated before any starts); their final results in order."""
    results: list[dict[str, Any]] = [{} for _ in reqs]
    async with aclosing(tm.run(reqs)) as outs:
        async for i, p in outs:
            if p.finished:
                results[i] = p.result()
    return results
