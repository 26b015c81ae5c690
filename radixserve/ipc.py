"""ZMQ endpoints between the API process, the scheduler and the detokenizer."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import zmq


@dataclass
class PortArgs:
    scheduler_input: str  # API -> scheduler: requests, aborts, control
    detokenizer_input: str  # scheduler -> detokenizer: token ids
    tokenizer_input: str  # detokenizer and scheduler -> API: text and control replies

    @staticmethod
    def new() -> PortArgs:
        base = tempfile.mkdtemp(prefix="radixserve-")
        return PortArgs(*(f"ipc://{os.path.join(base, name)}" for name in ("sched", "detok", "tok")))


def push_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def pull_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    return sock
