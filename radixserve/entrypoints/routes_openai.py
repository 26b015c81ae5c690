"""The OpenAI-compatible endpoints: the model list, completions and chat completions.
Handlers carry no return annotation where FastAPI would take it for a response model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from radixserve.entrypoints import openapi_docs as docs
from radixserve.entrypoints.http_state import ServerState, server_state
from radixserve.entrypoints.openai_protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter()


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "radixserve",
            "root": state.args.model_path or state.served_model_name, "max_model_len": state.tm.context_len}


@router.get("/v1/models", responses=docs.json_body(docs.ModelList))
async def models(request: Request):
    return {"object": "list", "data": [model_card(server_state(request))]}


@router.get("/v1/models/{model_id:path}", responses=docs.json_body(docs.ModelCard))
async def retrieve_model(model_id: str, request: Request):  # the client's models.retrieve
    state = server_state(request)
    state.serving.check_model(model_id)
    return model_card(state)


@router.post("/v1/completions", responses=docs.streamable(docs.CompletionResponse, "A completion"))
async def completions(req: CompletionRequest, raw: Request):
    return await server_state(raw).serving.completions(req, raw)


@router.post("/v1/chat/completions", responses=docs.streamable(docs.ChatCompletionResponse, "A chat completion"))
async def chat(req: ChatCompletionRequest, raw: Request):
    return await server_state(raw).serving.chat(req, raw)
