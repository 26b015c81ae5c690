"""What the HTTP layer shares between requests: the server's state, reached from any handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from radixserve.entrypoints.metrics import Metrics
    from radixserve.entrypoints.openai_serving import OpenAIServing
    from radixserve.entrypoints.tokenizer_manager import TokenizerManager
    from radixserve.server_args import ServerArgs


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
    serving: OpenAIServing = field(init=False)  # the OpenAI handlers, made by create_app


def server_state(request: Request) -> ServerState:
    return request.app.state.server
