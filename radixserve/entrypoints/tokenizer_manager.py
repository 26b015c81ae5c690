"""TokenizerManager: lives in the API process. Validates and tokenizes requests, sends them to the
scheduler and turns the detokenizer's increments back into per-request results."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from radixserve import ipc_codec
from radixserve.entrypoints.request_errors import RequestAborted, RequestError, ServerDeadError
from radixserve.entrypoints.validation import RequestValidator
from radixserve.ipc import PortArgs
from radixserve.messages import (
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GenerateReq,
    GetStateReq,
    ProfileReply,
    ProfileReq,
    ReqOutput,
    SchedulerState,
)
from radixserve.request_limits import RequestLimits

logger = logging.getLogger("radixserve.tokenizer_manager")


SEND_BATCH = 4096  # requests per message to the scheduler: a call of up to this many is one message


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

    req: GenerateReq
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
        limits = RequestLimits(self.context_len, info.get("max_total_num_tokens", self.context_len))
        self.validator = RequestValidator(tokenizer, self.vocab_size, limits, max_logprobs)
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
                    # a caller cancelled after sending keeps its place in line, so this reply is its
                    # own and is dropped here, not handed to the next caller (nor set on a done future,
                    # which would raise and end this loop)
                    waiter = waiters.pop(0)
                    if not waiter.done():
                        waiter.set_result(msg)

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
        waiters = self.control_waiters.setdefault(reply_type, [])
        waiters.append(fut)
        try:
            await ipc_codec.send_async(self.send_sock, request)
        except Exception:
            # not sent, so no reply will come for it: left in line, it would take the next caller's
            # reply, and that caller would wait forever
            waiters.remove(fut)
            raise
        return await fut

    async def flush_cache(self) -> FlushCacheReply:
        return await self._control(FlushCacheReq(), FlushCacheReply)

    async def get_state(self) -> SchedulerState:
        return await self._control(GetStateReq(), SchedulerState)

    async def profile(self, req: ProfileReq) -> ProfileReply:
        """Start or stop the torch profiler in every scheduler process (scheduler/profiler.py)."""
        if req.start and not req.profile_id:  # one id for every rank and group: it names their traces
            req.profile_id = str(time.time())
        return await self._control(req, ProfileReply)

    async def abort(self, rid: str) -> None:
        """An operator's abort (/abort_request, Engine.abort_request): "" aborts every request. The
        requests end with finish_reason abort."""
        self._ensure_started()
        await ipc_codec.send_async(self.send_sock, AbortReq([rid], abort_all=rid == ""))

    async def abort_all(self, status: int, message: str) -> None:
        """End every request with an error of this status (the shutdown timeout)."""
        self._ensure_started()
        await ipc_codec.send_async(self.send_sock, AbortReq(abort_all=True, message=message, status_code=status))

    # ---- generation -----------------------------------------------------------
    async def run(self, reqs: list[GenerateReq], validated: bool = False) -> AsyncIterator[tuple[int, Progress]]:
        """Send a call's requests to the scheduler as one message and yield (index, progress): at
        every increment of a streaming request, at the end of the others. The progress is live (read
        it before the next one; `result()` for a copy). Requests still unfinished when the caller
        stops (or fails) are aborted, in one message. validated: the caller has run validate_all."""
        self._ensure_started()
        if self.dead:
            raise ServerDeadError(self.dead)
        if not validated:
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
                batch = GenerateBatch(reqs[part:part + SEND_BATCH])
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
                self.metrics.observe_abandoned(len(left), sum(len(r.input_ids) for r in left),
                                               sum(len(p.output_ids) for p in progress.values()))
            if left and self.dead is None:
                # the caller went away (or failed) before the end: free their KV now
                await ipc_codec.send_async(self.send_sock, AbortReq([r.rid for r in left]))

    async def generate(self, req: GenerateReq) -> AsyncIterator[dict[str, Any]]:
        """One request: its cumulative result at each increment (streaming), or its final result."""
        async with aclosing(self.run([req])) as results:
            async for _, p in results:
                yield p.result()

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
        if out.finish_reason is not None:  # seconds from the call's start to this request's end (SGLang's)
            meta["e2e_latency"] = time.perf_counter() - p.clock.start
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
                self._merge_prompt_logprobs(meta, out, req, req.input_ids)

    @staticmethod
    def _merge_prompt_logprobs(meta: dict, out: ReqOutput, req: GenerateReq, ids: list[int]) -> None:
        start = max(req.logprob_start_len, 0) + len(meta["input_token_logprobs"])
        for k, lp in enumerate(out.input_token_logprobs):
            meta["input_token_logprobs"].append((lp, ids[start + k], None))
        for top in out.input_top_logprobs:
            meta["input_top_logprobs"].append(None if top is None else [(lp, t, None) for lp, t in top])


async def validate_all(tm: TokenizerManager, reqs: list[GenerateReq]) -> None:
    """Tokenize and check a call's requests (validation.py) before any of them runs."""
    await tm.validator.prepare(reqs)


async def collect(tm: TokenizerManager, reqs: list[GenerateReq], validated: bool = False) -> list[dict[str, Any]]:
    """Run requests to completion (all validated before any starts); their final results in order."""
    results: list[dict[str, Any]] = [{} for _ in reqs]
    async with aclosing(tm.run(reqs, validated)) as outs:
        async for i, p in outs:
            if p.finished:
                results[i] = p.result()
    return results
