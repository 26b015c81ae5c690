"""The scheduler's links to the other processes: requests in over ZMQ (rank 0 receives them, every
tensor-parallel rank gets the same messages in the same order), token ids out to the detokenizer,
replies to control messages, and load reports to the DP controller. A PD server's rank 0 also
receives its peer's messages here, and adds its own decisions (inject), so that every rank sees
them in one order with the requests."""

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
        self.peer_sock: zmq.Socket | None = None  # a PD server's socket for its peer's messages
        self.injected: list[Message] = []  # rank 0's own decisions, delivered with the next messages
        if tp_rank == 0:
            ctx = zmq.Context.instance()
            self.recv_sock = pull_socket(ctx, ports.scheduler_input)
            self.detok_sock = push_socket(ctx, ports.detokenizer_input)
            self.reply_sock = push_socket(ctx, ports.control_reply or ports.tokenizer_input)
            if ports.load_report:
                self.load_sock = push_socket(ctx, ports.load_report)

    def add_peer_socket(self, sock: zmq.Socket) -> None:
        """Receive the messages of this socket too (rank 0; a PD server's peer)."""
        self.peer_sock = sock

    def inject(self, msgs: list[Message]) -> None:
        """Rank 0: deliver these messages (to every rank) after the next ones received."""
        self.injected += msgs

    def recv(self, block: bool = False, timeout_ms: int | None = None) -> list[Message]:
        """Every message waiting, on every rank. Waits up to timeout_ms for the first one (block:
        up to a second)."""
        msgs: list[Message] = []
        payloads: list = []  # as received: what the other TP ranks are sent
        if self.recv_sock is not None:
            timeout = timeout_ms if timeout_ms is not None else 1000 if block else 0
            socks = [s for s in (self.recv_sock, self.peer_sock) if s is not None]
            if self.injected:
                timeout = 0
            while True:
                ready = self._ready(socks, timeout)
                if not ready:
                    break
                for sock in ready:
                    msg, payload = ipc_codec.recv_raw(sock)
                    if msg is not None:
                        msgs.append(msg)
                        payloads.append(payload)
                timeout = 0
            if self.injected:
                msgs += self.injected
                if self.tp_followers:
                    payloads += [ipc_codec.encode(m) for m in self.injected]
                self.injected = []
        if not self.tp_followers:
            return msgs
        # the other ranks get rank 0's payloads as bytes (no pickle across hosts either)
        data = tp_broadcast_bytes(ipc_codec.encode_list(payloads) if self.recv_sock is not None else None)
        return msgs if self.recv_sock is not None else ipc_codec.decode_list(data)

    @staticmethod
    def _ready(socks: list[zmq.Socket], timeout: int) -> list[zmq.Socket]:
        if len(socks) == 1:
            return socks if socks[0].poll(timeout) else []
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        return [sock for sock, _ in poller.poll(timeout)]

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
