"""SGLang's native endpoints: health, server and model info, cache, abort and profiler control,
metrics, tokenize / detokenize, and /generate.
Handlers carry no return annotation where FastAPI would take it for a response model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from radixserve import __version__
from radixserve.entrypoints import openapi_docs as docs
from radixserve.entrypoints.errors import APIError, error_body, error_response
from radixserve.entrypoints.http_state import ServerState, server_state
from radixserve.entrypoints.openai_common import as_api_error, collect, merged_streams, sse, until_disconnect
from radixserve.entrypoints.openai_protocol import (
    AbortRequest,
    ChatCompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    ProfileRequest,
    TokenizeRequest,
)
from radixserve.entrypoints.request_errors import RequestAborted, RequestError, ServerDeadError
from radixserve.entrypoints.requests import expand_requests, new_rid
from radixserve.entrypoints.tokenizer_manager import TokenizerManager, validate_all
from radixserve.messages import GenerateReq, ProfileReq, to_dict
from radixserve.sampling_params import SamplingParams

router = APIRouter()
PLAIN = {"response_class": PlainTextResponse}


# ---- health and info ------------------------------------------------------------------------
@router.get("/health", responses=docs.text_body("Ready (empty body)"), **PLAIN)
async def health(request: Request) -> Response:
    state = server_state(request)
    if not state.ready or state.draining or state.tm.dead:
        status = "starting" if not state.ready else "draining" if state.draining else "dead"
        # polled while the model loads: an expected answer, not worth a log line each time
        return error_response(503, f"the server is {status}", quiet=status == "starting")
    return PlainTextResponse("")


@router.get("/health_generate", responses=docs.text_body("A one-token generation went through (empty body)"),
            **PLAIN)
async def health_generate(request: Request) -> Response:
    state = server_state(request)
    req = GenerateReq(new_rid(), [state.info["eos_token_ids"][0]], SamplingParams(max_new_tokens=1, temperature=0))
    await collect(state.tm, [req])
    return PlainTextResponse("")


WEIGHT_VERSION = "default"  # SGLang's name for weights never updated in place (radixserve has no update)


@router.get("/model_info", responses=docs.json_body(docs.ModelInfo))
@router.get("/get_model_info", responses=docs.json_body(docs.ModelInfo))
async def model_info(request: Request):
    state = server_state(request)
    return {"model_path": state.args.model_path or state.served_model_name,
            "tokenizer_path": state.args.tokenizer_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": WEIGHT_VERSION,
            "has_image_understanding": False, "has_audio_understanding": False,
            "served_model_name": state.served_model_name, "context_length": state.tm.context_len}


@router.get("/get_weight_version", responses=docs.json_body(dict[str, str]))
async def weight_version():
    return {"weight_version": WEIGHT_VERSION}


@router.get("/server_info", responses=docs.json_body(dict[str, Any], "As /get_server_info"))
@router.get("/get_server_info", responses=docs.json_body(dict[str, Any], "Every flag, the model's limits and "
                                                         "internal_states (pools and queues)"))
async def server_info(request: Request):
    state = server_state(request)
    sched = await state.tm.get_state()
    return {**dataclasses.asdict(state.args), **state.info, "version": __version__,
            "served_model_name": state.served_model_name, "internal_states": [to_dict(sched)]}


@router.get("/get_load", responses=docs.json_body(list[docs.DPLoad]))
async def get_load(request: Request):
    s = await server_state(request).tm.get_state()
    return [{"dp_rank": g.dp_rank, "num_reqs": g.num_running + g.num_waiting, "num_waiting_reqs": g.num_waiting,
             "num_tokens": g.num_tokens} for g in (s.per_dp or [s])]


# ---- control --------------------------------------------------------------------------------
@router.api_route("/flush_cache", methods=["GET", "POST"], responses=docs.text_body("Cache flushed."), **PLAIN)
async def flush_cache(request: Request) -> Response:
    reply = await server_state(request).tm.flush_cache()
    if not reply.success:
        return error_response(400, f"cache not flushed: {reply.message}")
    return PlainTextResponse("Cache flushed.\n")


@router.post("/abort_request", responses=docs.text_body("Aborted (empty body)"), **PLAIN)
async def abort_request(req: AbortRequest, request: Request) -> Response:
    await server_state(request).tm.abort("" if req.abort_all else req.rid)
    return PlainTextResponse("")


@router.api_route("/start_profile", methods=["GET", "POST"], responses=docs.text_body("Start profiling."), **PLAIN)
async def start_profile(request: Request, req: ProfileRequest | None = None) -> Response:
    """SGLang's: the torch profiler in every scheduler process, until /stop_profile or num_steps steps
    that ran a batch; then each rank writes its Chrome trace into output_dir."""
    req = req or ProfileRequest()
    unbuilt = ("start_step", "profile_by_stage", "merge_profiles")
    for name in unbuilt:
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by radixserve", name)
    reply = await server_state(request).tm.profile(ProfileReq(True, **req.model_dump(exclude=set(unbuilt))))
    if not reply.success:
        return error_response(400, f"profile not started: {reply.message}")
    return PlainTextResponse("Start profiling.\n")


@router.api_route("/stop_profile", methods=["GET", "POST"],
                  responses=docs.text_body("Stop profiling. This will take some time."), **PLAIN)
async def stop_profile(request: Request) -> Response:
    """Stop the profile; answers once every rank's trace is written."""
    reply = await server_state(request).tm.profile(ProfileReq(False))
    if not reply.success:
        return error_response(400, f"profile not stopped: {reply.message}")
    return PlainTextResponse("Stop profiling. This will take some time.\n")  # SGLang's words


@router.get("/metrics", responses=docs.text_body("Prometheus text format"), **PLAIN)
async def metrics(request: Request) -> Response:
    state = server_state(request)
    sched = None if state.tm.dead else await state.tm.get_state()
    return Response(state.metrics.render(sched), media_type="text/plain; version=0.0.4")


# ---- text -------------------------------------------------------------------------------------
@router.post("/v1/tokenize", responses=docs.json_body(docs.TokenizeResponse))
@router.post("/tokenize", responses=docs.json_body(docs.TokenizeResponse))
async def tokenize(req: TokenizeRequest, request: Request):
    """SGLang's: text (or prompt) as a string or a list of strings, or chat messages; a list gives
    lists of tokens and counts."""
    state: ServerState = server_state(request)
    tm = state.tm
    field = "text" if req.text is not None else "prompt"
    text = req.text if req.text is not None else req.prompt
    if req.messages is not None:
        ids = tm.validator.encode(state.serving.apply_template(ChatCompletionRequest(messages=req.messages)),
                                  "messages", add_special_tokens=False)
    elif text is None:
        raise APIError(400, "give text, prompt or messages", "text")
    elif isinstance(text, str):
        ids = tm.validator.encode(text, field, add_special_tokens=req.add_special_tokens)
    else:
        lists = [tm.validator.encode(t, f"{field}.{k}", add_special_tokens=req.add_special_tokens)
                 for k, t in enumerate(text)]
        return {"tokens": lists, "count": [len(ids) for ids in lists], "max_model_len": tm.context_len}
    return {"tokens": ids, "count": len(ids), "max_model_len": tm.context_len}


@router.post("/v1/detokenize", responses=docs.json_body(docs.DetokenizeResponse))
@router.post("/detokenize", responses=docs.json_body(docs.DetokenizeResponse))
async def detokenize(req: DetokenizeRequest, request: Request):
    """tokens: a list of ids (text back) or a list of such lists (a list of texts back)."""
    tm = server_state(request).tm
    if tm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", "tokens")
    batch = bool(req.tokens) and isinstance(req.tokens[0], list)
    lists: list[list[int]] = req.tokens if batch else [req.tokens]  # type: ignore[assignment]
    if any(not 0 <= t < tm.vocab_size for ids in lists for t in ids):
        raise APIError(400, f"tokens must be in [0, {tm.vocab_size})", "tokens")
    texts = [tm.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) for ids in lists]
    return {"text": texts if batch else texts[0]}


# ---- generation -------------------------------------------------------------------------------
@router.api_route("/generate", methods=["POST", "PUT"], responses=docs.streamable(
    docs.GenerateResponse | list[docs.GenerateResponse], "One result, or a list for a batch or n > 1"))
async def generate(req: GenerateRequest, raw: Request):
    tm = server_state(raw).tm
    if req.token_ids_logprob is not None:
        raise APIError(400, "token_ids_logprob is not supported by radixserve (use top_logprobs_num)",
                       "token_ids_logprob")
    text = None if req.input_ids is not None else req.text  # SGLang's: input_ids win over text
    reqs, single = expand_requests(
        text, req.input_ids, req.sampling_params, req.return_logprob, req.top_logprobs_num,
        req.logprob_start_len, req.stream, req.rid, req.bootstrap(),
    )
    await validate_all(tm, reqs)
    shape = _ResultShape(tm.tokenizer if req.return_text_in_logprobs else None)
    if req.stream:
        return StreamingResponse(_native_stream(tm, reqs, single, shape), media_type="text/event-stream")
    results = await until_disconnect(raw, collect(tm, reqs, validated=True))
    results = [shape(res, r) for res, r in zip(results, reqs)]
    return results[0] if single else results


@dataclasses.dataclass
class _ResultShape:
    """A result's meta_info as SGLang's /generate gives it: weight_version always, the top-logprob
    lists only when asked for, and (return_text_in_logprobs) each logprob's token as text."""

    tokenizer: Any  # None: logprob entries keep text null
    # token id -> its text: a stream reshapes the whole result at every increment
    texts: dict[int, str] = dataclasses.field(default_factory=dict)

    def __call__(self, result: dict[str, Any], req: GenerateReq) -> dict[str, Any]:
        meta = result["meta_info"]
        meta["weight_version"] = WEIGHT_VERSION
        if not req.return_logprob:
            return result
        if req.top_logprobs_num == 0:
            meta.pop("input_top_logprobs", None)
            meta.pop("output_top_logprobs", None)
        if self.tokenizer is not None:
            for key in ("input_token_logprobs", "output_token_logprobs"):
                if key in meta:
                    meta[key] = self._with_text(meta[key])
            for key in ("input_top_logprobs", "output_top_logprobs"):
                if key in meta:
                    meta[key] = [None if top is None else self._with_text(top) for top in meta[key]]
        return result

    def _with_text(self, entries: list) -> list:
        new = list({t for _, t, _ in entries if t not in self.texts})
        if new:
            self.texts.update(zip(new, self.tokenizer.batch_decode([[t] for t in new])))
        return [(lp, t, self.texts[t]) for lp, t, _ in entries]


async def _native_stream(tm: TokenizerManager, reqs: list[GenerateReq], single: bool,
                         shape: _ResultShape) -> AsyncIterator[bytes]:
    try:
        async for i, p in merged_streams(tm, reqs):
            out = shape(p.result(), reqs[i])  # SGLang's native stream sends the whole result so far each time
            yield sse(out if single else {**out, "index": i})
    except (RequestError, ValueError, ServerDeadError, RequestAborted) as e:
        err = as_api_error(e)
        yield sse(error_body(err.status, err.message, err.param))
    yield sse("[DONE]")
