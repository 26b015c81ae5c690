"""The FastAPI app: native endpoints (SGLang's) and the OpenAI-compatible ones."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve import __version__
from radixserve.entrypoints import openapi_docs as docs
from radixserve.entrypoints.errors import APIError, JSONBytes, error_body, error_response
from radixserve.entrypoints.http_middleware import GateMiddleware
from radixserve.entrypoints.metrics import Metrics
from radixserve.entrypoints.openai_common import (
    ClientDisconnected,
    as_api_error,
    collect,
    merged_streams,
    sse,
    until_disconnect,
    validate_all,
)
from radixserve.entrypoints.openai_protocol import (
    MODEL_NAMES,
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    InvalidText,
    TokenizeRequest,
)
from radixserve.entrypoints.openai_serving import OpenAIServing
from radixserve.entrypoints.requests import expand_requests
from radixserve.entrypoints.tokenizer_manager import (
    RequestAborted,
    RequestError,
    ServerDeadError,
    SingleRequest,
    TokenizerManager,
)
from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve.http")


@dataclass
class ServerState:
    args: ServerArgs
    tm: TokenizerManager
    info: dict[str, Any]
    served_model_name: str
    metrics: Metrics
    api_key: str | None = None
    max_body_size: int = 32 << 20
    ready: bool = False
    draining: bool = False
    inflight: int = 0


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidText):
            return str(cause), cause.param
    # A union field fails once per member, each located through the member's name
    # (content.list[ContentPart].0.text): of the first field's errors, report the one that got
    # deepest into the value, without the member names.
    field = _field_path(first)[:1]
    same_field = [e for e in errors if _field_path(e)[:1] == field]
    best = max(same_field, key=lambda e: len(_field_path(e)))
    param = ".".join(_field_path(best)) or None
    return f"{param or 'body'}: {best.get('msg', 'invalid value')}", param


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _field_path(err: dict[str, Any]) -> list[str]:
    """An error's location in the body, without pydantic's union-member names."""
    return [str(x) for x in err.get("loc", ()) if x != "body" and not (
        isinstance(x, str) and (x in _TYPE_NAMES or x in MODEL_NAMES or "[" in x))]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="radixserve", version=__version__, default_response_class=JSONBytes)
    app.add_middleware(GateMiddleware, state=state)
    docs.install(app)
    serving = OpenAIServing(state.tm, state.served_model_name, state.args.chat_template)
    tm = state.tm

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(404, "not found: no such route")
        response = error_response(e.status_code, str(e.detail))
        response.headers.update(e.headers or {})  # 405's Allow
        return response

    @app.exception_handler(ValueError)
    async def _value(_: Request, e: ValueError):
        err = as_api_error(e)
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, _: ClientDisconnected):
        # nobody reads this answer; the requests are aborted already (until_disconnect)
        logger.info("client disconnected from %s before the answer; its requests were aborted",
                    request.url.path)
        return Response(status_code=499)

    @app.exception_handler(ServerDeadError)
    async def _dead(_: Request, e: ServerDeadError):
        return error_response(503, str(e))

    @app.exception_handler(RequestAborted)
    async def _aborted(_: Request, e: RequestAborted):
        return error_response(e.status, e.message)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    # ---- health and info ------------------------------------------------------------
    plain = {"response_class": PlainTextResponse}

    @app.get("/health", responses=docs.text_body("Ready (empty body)"), **plain)
    async def health():
        if not state.ready or state.draining or tm.dead:
            status = "starting" if not state.ready else "draining" if state.draining else "dead"
            # polled while the model loads: an expected answer, not worth a log line each time
            return error_response(503, f"the server is {status}", quiet=status == "starting")
        return PlainTextResponse("")

    @app.get("/health_generate", responses=docs.text_body("A one-token generation went through (empty body)"),
             **plain)
    async def health_generate():
        req = SingleRequest(rid=tm.new_rid(), text=None, input_ids=[state.info["eos_token_ids"][0]],
                            sampling_params={"max_new_tokens": 1, "temperature": 0})
        await collect(tm, [req])
        return PlainTextResponse("")

    @app.get("/get_model_info", responses=docs.json_body(docs.ModelInfo))
    async def model_info():
        return {"model_path": state.args.model_path or state.served_model_name,
                "tokenizer_path": state.args.tokenizer_path, "is_generation": True,
                "served_model_name": state.served_model_name, "context_length": tm.context_len}

    @app.get("/get_server_info", responses=docs.json_body(dict[str, Any], "Every flag, the model's limits and "
                                                          "internal_states (pools and queues)"))
    async def server_info():
        sched = await tm.get_state()
        return {**dataclasses.asdict(state.args), **state.info, "version": __version__,
                "served_model_name": state.served_model_name, "internal_states": [dataclasses.asdict(sched)]}

    @app.get("/get_load", responses=docs.json_body(list[docs.DPLoad]))
    async def get_load():
        s = await tm.get_state()
        return [{"dp_rank": g.dp_rank, "num_reqs": g.num_running + g.num_waiting, "num_waiting_reqs": g.num_waiting,
                 "num_tokens": g.num_tokens} for g in (s.per_dp or [s])]

    @app.api_route("/flush_cache", methods=["GET", "POST"], responses=docs.text_body("Cache flushed."), **plain)
    async def flush_cache():
        reply = await tm.flush_cache()
        if not reply.success:
            return error_response(400, f"cache not flushed: {reply.message}")
        return PlainTextResponse("Cache flushed.\n")

    @app.post("/abort_request", responses=docs.text_body("Aborted (empty body)"), **plain)
    async def abort_request(req: AbortRequest):
        await tm.abort(req.rid)
        return PlainTextResponse("")

    @app.get("/metrics", responses=docs.text_body("Prometheus text format"), **plain)
    async def metrics():
        sched = None if tm.dead else await tm.get_state()
        return Response(state.metrics.render(sched), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", responses=docs.json_body(docs.TokenizeResponse))
    async def tokenize(req: TokenizeRequest):
        if req.messages is not None:
            text = serving.apply_template(ChatCompletionRequest(messages=req.messages))
            ids = tm.encode(text, "messages", add_special_tokens=False)
        else:
            field = "text" if req.text is not None else "prompt"
            text = req.text if req.text is not None else req.prompt
            if text is None:
                raise APIError(400, "give text, prompt or messages", "text")
            ids = tm.encode(text, field, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": tm.context_len}

    @app.post("/detokenize", responses=docs.json_body(docs.DetokenizeResponse))
    async def detokenize(req: DetokenizeRequest):
        if any(not 0 <= t < tm.vocab_size for t in req.tokens):
            raise APIError(400, f"tokens must be in [0, {tm.vocab_size})", "tokens")
        return {"text": tm.tokenizer.decode(req.tokens)}

    # ---- generation -----------------------------------------------------------------
    @app.post("/generate", responses=docs.streamable(
        docs.GenerateResponse | list[docs.GenerateResponse], "One result, or a list for a batch or n > 1"))
    async def generate(req: GenerateRequest, raw: Request):
        reqs, single = expand_requests(
            req.text, req.input_ids, req.sampling_params, req.return_logprob, req.top_logprobs_num,
            req.logprob_start_len, req.stream, req.rid,
        )
        await validate_all(tm, reqs)
        if req.stream:
            return StreamingResponse(_native_stream(tm, reqs, single), media_type="text/event-stream")
        results = await until_disconnect(raw, collect(tm, reqs))
        return results[0] if single else results

    def model_card() -> dict[str, Any]:
        return {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "radixserve",
                "root": state.args.model_path or state.served_model_name, "max_model_len": tm.context_len}

    @app.get("/v1/models", responses=docs.json_body(docs.ModelList))
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=docs.json_body(docs.ModelCard))
    async def retrieve_model(model_id: str):  # the OpenAI client's models.retrieve
        serving.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", responses=docs.streamable(docs.CompletionResponse, "A completion"))
    async def completions(req: CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions", responses=docs.streamable(docs.ChatCompletionResponse, "A chat completion"))
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await serving.chat(req, raw)

    return app


async def _native_stream(tm: TokenizerManager, reqs: list[SingleRequest], single: bool) -> AsyncIterator[bytes]:
    try:
        async for i, out in merged_streams(tm, reqs):
            yield sse(out if single else {**out, "index": i})
    except (RequestError, ValueError, ServerDeadError, RequestAborted) as e:
        err = as_api_error(e)
        yield sse(error_body(err.status, err.message, err.param))
    yield sse("[DONE]")
