"""The scheduler's links to the other processes: requests in over ZMQ (rank 0 receives them, every
tensor-parallel rank gets the same messages in the same order), token ids out to the detokenizer,
replies to control messages, and load reports to the DP controller."""

from __future__ import annotations

import zmq

from radixserve import ipc_codec
from radixserve.distributed.parallel_state import tp_broadcast_bytes
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.messages import BatchOut, LoadReport, Message


class SchedulerTransport:
    def __init__(self, ports: PortArgs, tp_rank: int, tp_size: int = 1) -> None:
        self.tp_followers = tp_size > 1
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

    def recv(self, block: bool) -> list[Message]:
        """Every message waiting (block: wait up to a second for the first), on every rank."""
        msgs: list[Message] = []
        payloads: list[memoryview] = []  # as received: what the other TP ranks are sent
        if self.recv_sock is not None:
            timeout = 1000 if block else 0
            while self.recv_sock.poll(timeout):
                msg, payload = ipc_codec.recv_raw(self.recv_sock)
                if msg is not None:
                    msgs.append(msg)
                    payloads.append(payload)
                timeout = 0
        if not self.tp_followers:
            return msgs
        # the other ranks get rank 0's payloads as bytes (no pickle across hosts either)
        data = tp_broadcast_bytes(ipc_codec.encode_list(payloads) if self.recv_sock is not None else None)
        return msgs if self.recv_sock is not None else ipc_codec.decode_list(data)

    def send_outputs(self, batch: BatchOut) -> None:
        if self.detok_sock is not None:
            ipc_codec.send(self.detok_sock, batch)

    def reply(self, msg: Message) -> None:
        if self.reply_sock is not None:
            ipc_codec.send(self.reply_sock, msg)

    @property
    def wants_load(self) -> bool:
        return self.load_sock is not None

    def report_load(self, report: LoadReport) -> None:
        """Tell the DP controller our load when it changed."""
        if self.load_sock is not None and report != self.last_load:
            self.last_load = report
            ipc_codec.send(self.load_sock, report)
