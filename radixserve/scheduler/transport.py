"""The scheduler's links to the other processes: requests in over ZMQ (rank 0 receives them, every
tensor-parallel rank gets the same messages in the same order), token ids out to the detokenizer,
replies to control messages, and load reports to the DP controller."""

from __future__ import annotations

import zmq

from radixserve.distributed.parallel_state import tp_broadcast_objects
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.messages import BatchOut, LoadReport


class SchedulerTransport:
    def __init__(self, ports: PortArgs, tp_rank: int) -> None:
        # only rank 0 talks to the other processes; the other ranks follow its broadcasts
        self.recv_sock = self.detok_sock = self.reply_sock = self.load_sock = None
        self.last_load: LoadReport | None = None
        if tp_rank == 0:
            ctx = zmq.Context.instance()
            self.recv_sock = pull_socket(ctx, ports.scheduler_input)
            self.detok_sock = push_socket(ctx, ports.detokenizer_input)
            self.reply_sock = push_socket(ctx, ports.control_reply or ports.tokenizer_input)
            if ports.load_report:
                self.load_sock = push_socket(ctx, ports.load_report)

    def recv(self, block: bool) -> list[object]:
        """Every message waiting (block: wait up to a second for the first), on every rank."""
        msgs: list[object] = []
        if self.recv_sock is not None:
            timeout = 1000 if block else 0
            while self.recv_sock.poll(timeout):
                msgs.append(self.recv_sock.recv_pyobj())
                timeout = 0
        return tp_broadcast_objects(msgs)

    def send_outputs(self, batch: BatchOut) -> None:
        if self.detok_sock is not None:
            self.detok_sock.send_pyobj(batch)

    def reply(self, msg: object) -> None:
        if self.reply_sock is not None:
            self.reply_sock.send_pyobj(msg)

    @property
    def wants_load(self) -> bool:
        return self.load_sock is not None

    def report_load(self, report: LoadReport) -> None:
        """Tell the DP controller our load when it changed."""
        if self.load_sock is not None and report != self.last_load:
            self.last_load = report
            self.load_sock.send_pyobj(report)
