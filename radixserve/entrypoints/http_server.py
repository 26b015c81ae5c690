"""The FastAPI app: SGLang's native endpoints and the OpenAI-compatible ones (routes_native.py,
routes_openai.py), behind the gate middleware, with every error as an OpenAI envelope (http_errors.py)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from radixserve import __version__
from radixserve.entrypoints import openapi_docs as docs
from radixserve.entrypoints import routes_native, routes_openai
from radixserve.entrypoints.errors import JSONBytes
from radixserve.entrypoints.http_errors import install_error_handlers
from radixserve.entrypoints.http_middleware import GateMiddleware
from radixserve.entrypoints.http_state import ServerState
from radixserve.entrypoints.openai_serving import OpenAIServing

__all__ = ["ServerState", "create_app"]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="radixserve", version=__version__, default_response_class=JSONBytes)
    state.serving = OpenAIServing(state.tm, state.served_model_name, state.args.chat_template)
    app.state.server = state
    app.add_middleware(GateMiddleware, state=state)
    # outermost: browser preflights are answered before the gate asks for the API key. Any origin, as
    # SGLang's and vLLM's servers allow by default
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    docs.install(app)
    install_error_handlers(app)
    app.include_router(routes_native.router)
    app.include_router(routes_openai.router)
    return app
