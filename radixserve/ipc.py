"""ZMQ endpoints between the API process, the scheduler and the detokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import zmq


@dataclass
class PortArgs:
    scheduler_input: str  # API -> scheduler: requests, aborts, control
    detokenizer_input: str  # scheduler -> detokenizer: token ids
    tokenizer_input: str  # detokenizer and scheduler -> API: text and control replies
    # With --dp-size > 1 the DP controller sits between the API and the schedulers: it binds
    # scheduler_input, and collects the schedulers' control replies and load reports.
    control_reply: str = ""  # "" -> replies go straight to tokenizer_input
    load_report: str = ""  # "" -> no controller to report load to
    socket_dir: str = ""  # the private folder holding the ipc sockets; remove() deletes it

    @staticmethod
    def new() -> PortArgs:
        base = tempfile.mkdtemp(prefix="radixserve-")
        sched, detok, tok = (f"ipc://{os.path.join(base, name)}" for name in ("sched", "detok", "tok"))
        return PortArgs(sched, detok, tok, socket_dir=base)

    def remove(self) -> None:
        """Delete the socket folder once every process using it is gone (each launch makes one)."""
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def for_dp_group(self, dp_rank: int) -> PortArgs:
        """The endpoints of DP group dp_rank: its own input, shared detokenizer and API, and the
        controller's reply and load sockets."""
        base = self.scheduler_input[len("ipc://"):]
        return PortArgs(f"ipc://{base}-dp{dp_rank}", self.detokenizer_input, self.tokenizer_input,
                        control_reply=f"ipc://{base}-replies", load_report=f"ipc://{base}-load",
                        socket_dir=self.socket_dir)


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
