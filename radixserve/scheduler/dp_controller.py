"""The data-parallel controller (--dp-size > 1): one process between the API and the DP groups.

It sends each new request to one group by --load-balance-method, sends aborts and control
requests to every group, and merges the groups' control replies into one. Load comes from the
groups themselves (LoadReport, sent whenever it changes), plus what was dispatched since."""

from __future__ import annotations

import itertools
import logging
import traceback
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq

from radixserve import ipc_codec
from radixserve.disaggregation.settings import FAKE_BOOTSTRAP_HOST
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.messages import (
    AbortReq,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GenerateReq,
    GetStateReq,
    LoadReport,
    ProfileReply,
    ProfileReq,
    SchedulerState,
)
from radixserve.server_args import ServerArgs
from radixserve.utils.logging import configure_logging
from radixserve.utils.process import die_with_parent, ignore_sigterm

logger = logging.getLogger("radixserve.dp_controller")

# control requests every group answers, and the reply type the controller merges for the API
CONTROL_REPLIES: dict[type, type] = {FlushCacheReq: FlushCacheReply, GetStateReq: SchedulerState,
                                     ProfileReq: ProfileReply}


@dataclass
class GroupLoad:
    reported_reqs: int = 0  # from the group's last LoadReport
    reported_tokens: int = 0
    in_transit: deque[int] = field(default_factory=deque)  # tokens of requests sent, not yet received

    @property
    def num_reqs(self) -> int:
        return self.reported_reqs + len(self.in_transit)

    @property
    def outstanding_tokens(self) -> int:
        return self.reported_tokens + sum(self.in_transit)


class LoadBalancer:
    """Picks a DP group for each request."""

    def __init__(self, method: str, dp_size: int) -> None:
        self.method = method
        self.loads = [GroupLoad() for _ in range(dp_size)]
        self.sent = [0] * dp_size
        self._cycle = itertools.cycle(range(dp_size))

    def pick(self, req: GenerateReq) -> int:
        if req.bootstrap_room is not None and req.bootstrap_host != FAKE_BOOTSTRAP_HOST:
            # PD: the group is the room's, on both servers of a pair (the decode side finds the
            # prefill side's group the same way), as in SGLang
            group = req.bootstrap_room % len(self.loads)
        elif self.method == "round_robin":
            group = next(self._cycle)
        elif self.method == "shortest_queue":
            group = min(range(len(self.loads)), key=lambda g: (self.loads[g].num_reqs, g))
        else:  # minimum_tokens
            group = min(range(len(self.loads)), key=lambda g: (self.loads[g].outstanding_tokens, g))
        # counted until the group reports having received it (a request may come and go between reports)
        tokens = len(req.input_ids) + int(req.sampling_params.max_new_tokens or 0)
        self.loads[group].in_transit.append(tokens)
        self.sent[group] += 1
        return group

    def update(self, report: LoadReport) -> None:
        load = self.loads[report.dp_rank]
        load.reported_reqs, load.reported_tokens = report.num_reqs, report.outstanding_tokens
        while len(load.in_transit) > self.sent[report.dp_rank] - report.received:
            load.in_transit.popleft()


def merge_states(states: list[SchedulerState]) -> SchedulerState:
    states = sorted(states, key=lambda s: s.dp_rank)
    total = msgspec.structs.replace(states[0])
    for name in SchedulerState.__struct_fields__:
        if name in ("kv_total", "kv_available", "kv_evictable", "kv_protected", "req_rows_total",
                      "req_rows_available", "num_running", "num_waiting", "num_retractions", "num_tokens",
                      "gen_throughput", "overlapped_launches"):
            setattr(total, name, sum(getattr(s, name) for s in states))
    pd = [s.pd for s in states if s.pd is not None]
    if pd:
        total.pd = msgspec.structs.replace(pd[0])
        for name in ("num_bootstrap", "num_inflight", "num_prealloc", "num_transfer", "transfers", "failures",
                     "bytes", "chunk_writes", "latency_sum"):
            setattr(total.pd, name, sum(getattr(p, name) for p in pd))
        total.pd.latency_counts = [sum(c) for c in zip(*(p.latency_counts for p in pd))]
    total.per_dp = states
    return total


class DPController:
    def __init__(self, args: ServerArgs, ports: PortArgs) -> None:
        ctx = zmq.Context.instance()
        self.dp_size = args.dp_size
        self.recv = pull_socket(ctx, ports.scheduler_input)
        group_ports = [ports.for_dp_group(g) for g in range(args.dp_size)]
        self.groups = [push_socket(ctx, p.scheduler_input) for p in group_ports]
        self.replies = pull_socket(ctx, group_ports[0].control_reply)
        self.loads_in = pull_socket(ctx, group_ports[0].load_report)
        self.to_api = push_socket(ctx, ports.tokenizer_input)
        self.balancer = LoadBalancer(args.load_balance_method, args.dp_size)
        self.pending: list[tuple[type, list]] = []  # control requests awaiting every group's reply

    def run(self) -> None:
        poller = zmq.Poller()
        for sock in (self.recv, self.replies, self.loads_in):
            poller.register(sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.loads_in in ready:
                while self.loads_in.poll(0):
                    report = ipc_codec.recv(self.loads_in)
                    if isinstance(report, LoadReport):
                        self.balancer.update(report)
            if self.recv in ready:
                while self.recv.poll(0):
                    msg = ipc_codec.recv(self.recv)
                    if msg is not None:
                        self.dispatch(msg)
            if self.replies in ready:
                while self.replies.poll(0):
                    reply = ipc_codec.recv(self.replies)
                    if reply is not None:
                        self.collect(reply)

    def dispatch(self, msg: object) -> None:
        if isinstance(msg, GenerateBatch):  # each request picked on its own; one message per group
            per_group: dict[int, list[GenerateReq]] = {}
            for req in msg.reqs:
                per_group.setdefault(self.balancer.pick(req), []).append(req)
            for group, reqs in per_group.items():
                ipc_codec.send(self.groups[group], GenerateBatch(reqs))
        elif isinstance(msg, GenerateReq):
            ipc_codec.send(self.groups[self.balancer.pick(msg)], msg)
        elif isinstance(msg, AbortReq):
            for sock in self.groups:
                ipc_codec.send(sock, msg)
        elif type(msg) in CONTROL_REPLIES:
            self.pending.append((CONTROL_REPLIES[type(msg)], []))
            for sock in self.groups:
                ipc_codec.send(sock, msg)
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def collect(self, reply: object) -> None:
        for reply_type, got in self.pending:
            if isinstance(reply, reply_type):
                got.append(reply)
                if len(got) == self.dp_size:
                    self.pending.remove((reply_type, got))
                    ipc_codec.send(self.to_api, self.merge(reply_type, got))
                return

    @staticmethod
    def merge(reply_type: type, replies: list) -> object:
        if reply_type in (FlushCacheReply, ProfileReply):
            failed = list(dict.fromkeys(r.message for r in replies if not r.success))  # each message once
            return reply_type(not failed, "; ".join(failed))
        return merge_states(replies)


def run_dp_controller_process(args: ServerArgs, ports: PortArgs) -> None:
    die_with_parent()
    ignore_sigterm()
    configure_logging(args.log_level, "dp controller")
    try:
        DPController(args, ports).run()
    except Exception:
        logger.error("DP controller crashed:\n%s", traceback.format_exc())
        raise SystemExit(1) from None
