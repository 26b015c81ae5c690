"""A fast fake LLM server for router tests and benchmarks: radixserve's (and SGLang's) HTTP surface,
no model, no tokenizer, with fault knobs.

    python -m radixserve.bench.mock_worker --host 127.0.0.1 --port 31001 [--latency-ms 5] [--fail-first 3] ...

Generation: POST /generate (text or input_ids, lists = batch; sampling_params.max_new_tokens; stream),
POST /v1/completions, POST /v1/chat/completions (stream ends with `data: [DONE]`). Info and control:
/health /health_generate /liveness /readiness /get_server_info /server_info /get_model_info /model_info
/get_load /v1/models /flush_cache /abort_request /metrics. Every answer has an `x-mock-worker: <name>`
header (name: --name, default the port) and generation bodies carry it as meta_info.worker (native) or
worker (OpenAI). Test hooks: GET /mock/stats, GET|POST /mock/config (knobs, see mock_knobs), POST /mock/reset
(zeroes the counters).

A raw ASGI app on uvicorn with httptools + uvloop: about a third less CPU per request than aiohttp.web here,
which matters when client, router and workers share two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

from radixserve import __version__
from radixserve.bench import mock_shapes as shapes
from radixserve.bench.mock_knobs import MockKnobs, add_knob_flags, knobs_from_args
from radixserve.bench.mock_shapes import Prompt
from radixserve.entrypoints.errors import error_body

Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
CONTEXT_LENGTH = 32768
GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


@dataclass(eq=False)
class Inflight:
    """A generation request being answered (for /get_load and /abort_request)."""

    rid: str
    prompts: list[Prompt]
    aborted: bool = False


@dataclass
class Stats:
    requests: int = 0  # generation requests received (a batch is one)
    ok: int = 0
    errors: int = 0
    prompt_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    aborts: int = 0
    flushes: int = 0
    by_path: dict[str, int] = field(default_factory=dict)  # every request, by path


class MockWorker:
    """The ASGI app. One instance per process; all state lives here."""

    def __init__(self, knobs: MockKnobs, name: str, host: str, port: int) -> None:
        self.knobs = knobs
        self.name = name
        self.host, self.port = host, port
        self.stats = Stats()
        self.inflight: dict[str, Inflight] = {}
        self.inflight_reqs = 0
        self.inflight_tokens = 0
        self.started = time.time()
        self._name_header = (b"x-mock-worker", name.encode())
        self.routes: dict[tuple[str, str], Callable[[bytes, Send], Awaitable[None]]] = {
            ("POST", "/generate"): self.generate,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat,
            ("GET", "/health"): self.health,
            ("GET", "/health_generate"): self.health,
            ("GET", "/readiness"): self.health,
            ("GET", "/liveness"): self.liveness,
            ("GET", "/get_server_info"): self.server_info,
            ("GET", "/server_info"): self.server_info,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/model_info"): self.model_info,
            ("GET", "/get_load"): self.get_load,
            ("GET", "/v1/models"): self.models,
            ("GET", "/flush_cache"): self.flush_cache,
            ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/abort_request"): self.abort_request,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/mock/stats"): self.mock_stats,
            ("GET", "/mock/config"): self.mock_config,
            ("POST", "/mock/config"): self.mock_config,
            ("POST", "/mock/reset"): self.mock_reset,
        }
        self._paths = {p for _, p in self.routes}

    # ---- ASGI plumbing ------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        by_path = self.stats.by_path
        by_path[path] = by_path.get(path, 0) + 1
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        handler = self.routes.get((method, path))
        if handler is None:
            status = 405 if path in self._paths else 404
            why = "method not allowed" if status == 405 else "no such path"
            await self.error(send, status, f"{method} {path}: {why}")
            return
        await handler(body, send)

    async def respond(self, send: Send, status: int, body: bytes, ctype: bytes = JSON) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                                self._name_header]})
        await send({"type": "http.response.body", "body": body})

    async def json(self, send: Send, obj: Any, status: int = 200) -> None:
        await self.respond(send, status, orjson.dumps(obj))

    async def error(self, send: Send, status: int, message: str) -> None:
        await self.json(send, error_body(status, message), status)

    async def start_stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                self._name_header]})

    # ---- generation -------------------------------------------------------------------------
    async def _admit(self, body: bytes, parse: Callable[[dict[str, Any]], tuple[list[Prompt], bool]],
                     send: Send) -> tuple[Inflight, dict[str, Any], bool] | None:
        """Count the request, apply the fault knobs, parse and register it; None when answered already."""
        stats, knobs = self.stats, self.knobs
        stats.requests += 1
        n = stats.requests
        if knobs.crash_at and n >= knobs.crash_at:
            print(f"mock worker {self.name}: crashing on generation request {n}", file=sys.stderr, flush=True)
            os._exit(1)
        fail = 0
        if knobs.fail_remaining > 0:
            knobs.fail_remaining -= 1
            fail = 500
        elif knobs.status_code:
            fail = knobs.status_code
        try:
            req = orjson.loads(body)
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            prompts, single = parse(req)
        except (ValueError, TypeError, AttributeError) as e:
            stats.errors += 1
            await self.error(send, 400, str(e))
            return None
        rid = req.get("rid")
        entry = Inflight(rid if isinstance(rid, str) else f"{self.name}-{n}", prompts)
        self.inflight[entry.rid] = entry  # in flight (for /get_load, /abort_request) from arrival on
        self.inflight_reqs += len(prompts)
        self.inflight_tokens += sum(p.tokens + p.max_new_tokens for p in prompts)
        for p in prompts:
            stats.prompt_chars += p.chars
            stats.prompt_tokens += p.tokens
        if knobs.latency_ms:
            await asyncio.sleep(knobs.latency_ms / 1000)
        if fail:
            self._release(entry, 0, ok=False)
            await self.error(send, fail, f"mock worker {self.name}: injected failure (request {n})")
            return None
        return entry, req, single

    def _release(self, entry: Inflight, completion_tokens: int, ok: bool = True) -> None:
        if self.inflight.get(entry.rid) is entry:
            del self.inflight[entry.rid]
        self.inflight_reqs -= len(entry.prompts)
        self.inflight_tokens -= sum(p.tokens + p.max_new_tokens for p in entry.prompts)
        if ok:
            self.stats.ok += 1
        else:
            self.stats.errors += 1
        self.stats.completion_tokens += completion_tokens

    async def _token_wait(self, tokens: int) -> None:
        if self.knobs.token_latency_ms and tokens > 0:
            await asyncio.sleep(tokens * self.knobs.token_latency_ms / 1000)

    async def generate(self, body: bytes, send: Send) -> None:
        start = time.perf_counter()
        admitted = await self._admit(body, lambda r: shapes.parse_generate(r, self.knobs.output_tokens), send)
        if admitted is None:
            return
        entry, req, single = admitted
        prompts, name = entry.prompts, self.name
        rids = [entry.rid] if single else [f"{entry.rid}-{i}" for i in range(len(prompts))]
        steps = max(1, max(p.max_new_tokens for p in prompts))
        sent = 0
        try:
            if not req.get("stream"):
                await self._token_wait(steps - 1)
                results = []
                for rid, p in zip(rids, prompts):
                    done = 0 if entry.aborted else p.max_new_tokens
                    sent += done
                    results.append(shapes.generate_result(rid, p, done, True, start, name, entry.aborted))
                await self.json(send, results[0] if single else results)
                return
            await self.start_stream(send)
            done_by = [0] * len(prompts)
            finished = [False] * len(prompts)
            for step in range(1, steps + 1):
                if step > 1:
                    await self._token_wait(1)
                aborted = entry.aborted
                parts = []
                for i, p in enumerate(prompts):
                    if finished[i]:
                        continue
                    if not aborted:
                        done_by[i] = min(step, p.max_new_tokens)
                    finished[i] = aborted or done_by[i] == p.max_new_tokens
                    res = shapes.generate_result(rids[i], p, done_by[i], finished[i], start, name, aborted)
                    if not single:
                        res["index"] = i
                    parts.append(_sse(res))
                await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
                if aborted:
                    break
            sent = sum(done_by)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            self._release(entry, sent)

    async def _openai(self, body: bytes, send: Send, chat: bool) -> None:
        parse = shapes.parse_chat if chat else shapes.parse_completion
        admitted = await self._admit(body, lambda r: ([parse(r, self.knobs.output_tokens)], True), send)
        if admitted is None:
            return
        entry, req, _ = admitted
        p, name, rid = entry.prompts[0], self.name, entry.rid
        model = req.get("model") or self.knobs.model
        done = 0
        try:
            if not req.get("stream"):
                await self._token_wait(p.max_new_tokens - 1)
                done = 0 if entry.aborted else p.max_new_tokens
                make = shapes.chat if chat else shapes.completion
                await self.json(send, make(rid, model, p, name, entry.aborted, done))
                return
            await self.start_stream(send)
            if chat:
                first = shapes.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, name)
                await send({"type": "http.response.body", "body": _sse(first), "more_body": True})
            for step in range(1, p.max_new_tokens + 1):
                if step > 1:
                    await self._token_wait(1)
                if entry.aborted:
                    break
                done = step
                finish_now = "length" if step == p.max_new_tokens else None
                if chat:
                    chunk = shapes.chat_chunk(rid, model, {"content": shapes.TOKEN_TEXT}, None, name)
                else:
                    chunk = shapes.completion_chunk(rid, model, shapes.TOKEN_TEXT, finish_now, name)
                await send({"type": "http.response.body", "body": _sse(chunk), "more_body": True})
            finish = shapes.finish_reason(entry.aborted)
            tail = []
            if chat:
                tail.append(shapes.chat_chunk(rid, model, {}, finish, name))
            elif entry.aborted or p.max_new_tokens == 0:
                tail.append(shapes.completion_chunk(rid, model, "", finish, name))
            if (req.get("stream_options") or {}).get("include_usage"):
                obj = "chat.completion.chunk" if chat else "text_completion"
                tail.append(shapes.usage_chunk(rid, model, obj, p, done, name))
            body_out = b"".join(_sse(c) for c in tail) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": body_out})
        finally:
            self._release(entry, done)

    async def completions(self, body: bytes, send: Send) -> None:
        await self._openai(body, send, chat=False)

    async def chat(self, body: bytes, send: Send) -> None:
        await self._openai(body, send, chat=True)

    # ---- health and info --------------------------------------------------------------------
    async def health(self, body: bytes, send: Send) -> None:
        if self.knobs.health_ok():
            await self.respond(send, 200, b"", TEXT)
        else:
            await self.error(send, 503, f"mock worker {self.name}: unhealthy (fail_health_after)")

    async def liveness(self, body: bytes, send: Send) -> None:
        await self.respond(send, 200, b"", TEXT)

    def _model_info(self) -> dict[str, Any]:
        return {"model_path": self.knobs.model, "tokenizer_path": self.knobs.model, "is_generation": True,
                "served_model_name": self.knobs.model, "context_length": CONTEXT_LENGTH}

    async def model_info(self, body: bytes, send: Send) -> None:
        await self.json(send, self._model_info())

    async def server_info(self, body: bytes, send: Send) -> None:
        # the fields routers read from radixserve's /get_server_info (flags, model limits, internal_states)
        state = {"num_running_reqs": self.inflight_reqs, "num_waiting_reqs": 0,
                 "num_tokens": self.inflight_tokens, "last_gen_throughput": 0.0, "dp_rank": 0}
        await self.json(send, {
            **self._model_info(), "host": self.host, "port": self.port,
            "tp_size": 1, "dp_size": 1, "pp_size": 1,
            "nnodes": 1, "node_rank": 0, "page_size": 1, "dtype": "bfloat16", "device": "mock",
            "disaggregation_mode": "null", "disaggregation_bootstrap_port": 8998,
            "disaggregation_transfer_backend": "mooncake", "max_total_num_tokens": 1 << 20,
            "max_running_requests": 4096, "chunked_prefill_size": 8192, "vocab_size": 49152,
            "eos_token_ids": [2], "version": __version__, "internal_states": [state],
            "mock_worker": self.name,
        })

    async def get_load(self, body: bytes, send: Send) -> None:
        await self.json(send, [{"dp_rank": 0, "num_reqs": self.inflight_reqs, "num_waiting_reqs": 0,
                                "num_tokens": self.inflight_tokens}])

    async def models(self, body: bytes, send: Send) -> None:
        card = {"id": self.knobs.model, "object": "model", "created": 0, "owned_by": "radixserve",
                "root": self.knobs.model, "max_model_len": CONTEXT_LENGTH}
        await self.json(send, {"object": "list", "data": [card]})

    async def metrics(self, body: bytes, send: Send) -> None:
        s = self.stats
        text = (f"# TYPE mock_requests_total counter\nmock_requests_total {s.requests}\n"
                f"# TYPE mock_inflight_requests gauge\nmock_inflight_requests {self.inflight_reqs}\n"
                f'sglang:num_running_reqs{{model_name="{self.knobs.model}"}} {self.inflight_reqs}\n'
                f'sglang:num_queue_reqs{{model_name="{self.knobs.model}"}} 0\n')
        await self.respond(send, 200, text.encode(), b"text/plain; version=0.0.4")

    # ---- control ----------------------------------------------------------------------------
    async def flush_cache(self, body: bytes, send: Send) -> None:
        self.stats.flushes += 1
        await self.respond(send, 200, b"Cache flushed.\n", TEXT)

    async def abort_request(self, body: bytes, send: Send) -> None:
        try:
            req = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            await self.error(send, 400, "the body must be JSON")
            return
        if req.get("abort_all"):
            hits = list(self.inflight.values())
        else:
            hit = self.inflight.get(req.get("rid") or "")
            hits = [hit] if hit else []
        for e in hits:
            e.aborted = True
        self.stats.aborts += len(hits)
        await self.respond(send, 200, b"", TEXT)

    # ---- test hooks -------------------------------------------------------------------------
    async def mock_stats(self, body: bytes, send: Send) -> None:
        s = self.stats
        await self.json(send, {
            "worker": self.name, "requests": s.requests, "ok": s.ok, "errors": s.errors,
            "inflight": self.inflight_reqs, "inflight_tokens": self.inflight_tokens,
            "prompt_chars": s.prompt_chars, "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens, "aborts": s.aborts, "flushes": s.flushes,
            "by_path": s.by_path, "uptime_s": time.time() - self.started,
        })

    async def mock_config(self, body: bytes, send: Send) -> None:
        if body:
            try:
                update = orjson.loads(body)
                if not isinstance(update, dict):
                    raise ValueError("the body must be a JSON object of knobs")
                self.knobs.update(update, self.stats.requests)
            except (ValueError, TypeError) as e:
                await self.error(send, 400, str(e))
                return
        await self.json(send, self.knobs.view(self.stats.requests))

    async def mock_reset(self, body: bytes, send: Send) -> None:
        crash_left = self.knobs.crash_at - self.stats.requests if self.knobs.crash_at else 0
        self.stats = Stats()
        self.knobs.crash_at = crash_left  # keep "crash K requests from now" meaning across the reset
        await self.json(send, {"reset": True})


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m radixserve.bench.mock_worker",
                                description="A fast fake LLM server for router tests and benchmarks.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=31000)
    p.add_argument("--name", default=None,
                   help="worker name in x-mock-worker and meta_info.worker (default: the port)")
    add_knob_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    app = MockWorker(knobs_from_args(args), args.name or str(args.port), args.host, args.port)
    # long keep-alive: routers pool connections and reconnect churn would be measured as router cost
    config = uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                            lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=300,
                            backlog=4096)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
