"""The prefill server's side of a PD pair (--disaggregation-mode prefill).

A request that names a bootstrap room waits (BOOTSTRAP) until the decode server sends where its
prompt's KV goes (KVDestination, on the handoff socket); it is then prefilled as usual, with an
output budget of one token. When it finishes, its prompt's KV is written into the decode server's
pool on a transfer thread (PREFILL_INFLIGHT: one copy per run of consecutive slots per buffer) while
the scheduler goes on; once the write is done the decode server is told, with the first token
(KVDone), and the KV goes to the prefix cache. A request without a room runs as on an ordinary
server (warm-up, /health_generate).

Every destination gets exactly one KVDone, and only after the last byte that will ever be written
into its slots: the decode server frees those slots on it."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from radixserve import ipc_codec
from radixserve.disaggregation.bootstrap import BootstrapServer
from radixserve.disaggregation.kv_runs import BufferSpec, LayoutMismatch, transfer_copies
from radixserve.disaggregation.peers import PeerSockets
from radixserve.disaggregation.settings import bootstrap_timeout, reachable_host
from radixserve.disaggregation.stats import TransferCounts
from radixserve.disaggregation.transfer import create_engine
from radixserve.messages import KVCancel, KVDestination, KVDone, PDStats
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req
    from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve.disaggregation")


@dataclass
class Outgoing:
    """A request whose KV is being written (PREFILL_INFLIGHT)."""

    req: Req
    dest: KVDestination
    write: Future
    started: float
    nbytes: int


class PrefillHandoff:
    def __init__(self, args: ServerArgs, pools: MemoryPools) -> None:
        self.pools = pools
        host = reachable_host(args.host)
        self.engine = create_engine(args.disaggregation_transfer_backend, host, args.disaggregation_ib_device)
        self.layout = [BufferSpec.of(b) for b in pools.kv.layout()]
        self.engine.register([(b.data_ptr, b.nbytes) for b in self.layout])
        ctx = zmq.Context.instance()
        self.handoff = ctx.socket(zmq.PULL)
        self.handoff.setsockopt(zmq.LINGER, 0)
        port = self.handoff.bind_to_random_port(f"tcp://{host}")
        self.peers = PeerSockets()
        self.bootstrap = BootstrapServer(args.host or "0.0.0.0", args.disaggregation_bootstrap_port, {
            "session_id": self.engine.session_id, "handoff": f"tcp://{host}:{port}",
            "layout": [[b.data_ptr, b.bytes_per_slot, b.num_slots] for b in self.layout],
            "page_size": args.page_size,
        })
        self.waiting: dict[int, tuple[Req, float]] = {}  # BOOTSTRAP: room -> (request, since)
        self.destinations: dict[int, tuple[KVDestination, float]] = {}  # arrived before their request
        self.bound: dict[int, tuple[Req, KVDestination]] = {}  # room -> request being prefilled
        # rooms whose request ended before its destination came: room -> (why, since)
        self.abandoned: dict[int, tuple[str, float]] = {}
        self.inflight: list[Outgoing] = []
        # one writer thread: writes go out in the order requests finish
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="pd-transfer")
        self.counts = TransferCounts()
        self.timeout = bootstrap_timeout()

    def hold(self, req: Req) -> None:
        """A new request with a room: it waits for its destination (BOOTSTRAP)."""
        req.max_new_tokens = min(req.max_new_tokens, 1)  # the decode server generates the rest
        move(req, ReqState.BOOTSTRAP)
        self.waiting[req.msg.bootstrap_room] = (req, time.monotonic())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_held(self) -> int:
        """Requests held outside the scheduler's queues (BOOTSTRAP and PREFILL_INFLIGHT)."""
        return len(self.waiting) + len(self.inflight)

    def stats(self) -> PDStats:
        c = self.counts
        return PDStats("prefill", num_bootstrap=len(self.waiting), num_inflight=len(self.inflight),
                       transfers=c.transfers, failures=c.failures, bytes=c.bytes,
                       latency_counts=list(c.latency_counts), latency_sum=c.latency_sum)

    def poll(self) -> tuple[list[Req], list[Req], list[str]]:
        """(requests whose destination arrived: to prefill now; requests that waited too long;
        ids of requests the decode server cancelled while they are being prefilled)."""
        cancelled: list[str] = []
        while self.handoff.poll(0):
            msg = ipc_codec.recv(self.handoff)
            if isinstance(msg, KVDestination):
                if msg.room in self.abandoned:
                    self._refuse(msg.notify, msg.room, self.abandoned[msg.room][0])
                else:
                    self.destinations[msg.room] = (msg, time.monotonic())
            elif isinstance(msg, KVCancel):
                rid = self._cancel(msg)
                if rid is not None:
                    cancelled.append(rid)
        ready = []
        for room in [r for r in self.waiting if r in self.destinations]:
            req, _ = self.waiting.pop(room)
            self.bound[room] = (req, self.destinations.pop(room)[0])
            move(req, ReqState.WAITING)
            ready.append(req)
        now = time.monotonic()
        late = []
        for room in [room for room, (_, since) in self.waiting.items() if now - since > self.timeout]:
            req, _ = self.waiting.pop(room)
            message = f"the decode server did not claim bootstrap room {room} within {self.timeout:g} s"
            req.finish_reason = {"type": "abort", "status_code": 503, "message": message}
            self.abandoned[room] = (message, now)
            late.append(req)
        for room in [r for r, (_, since) in self.destinations.items() if now - since > self.timeout]:
            dest = self.destinations.pop(room)[0]  # its request never came (the router gave up on it)
            self._refuse(dest.notify, room, "the prefill server never received this request")
        for room in [r for r, (_, since) in self.abandoned.items() if now - since > self.timeout]:
            del self.abandoned[room]
        return ready, late, cancelled

    def _cancel(self, msg: KVCancel) -> str | None:
        """The decode server aborted `room`: a request being prefilled is aborted (its KVDone goes
        when it ends); a write in flight answers when it is done; anything else is answered now."""
        if msg.room in self.bound:
            return self.bound[msg.room][0].rid
        if any(out.dest.room == msg.room for out in self.inflight):
            return None
        self.destinations.pop(msg.room, None)
        if msg.room in self.waiting:  # not claimed any more: it ends with its bootstrap timeout
            self.abandoned[msg.room] = ("cancelled by the decode server", time.monotonic())
        self._refuse(msg.notify, msg.room, "cancelled by the decode server")
        return None

    def abandon(self, room: int, why: str) -> None:
        """The request of `room` ended here before it was prefilled: its destination is refused."""
        stored = self.destinations.pop(room, None)
        if stored is not None:
            self._refuse(stored[0].notify, room, why)
        else:
            self.abandoned[room] = (why, time.monotonic())

    def take_aborted(self, hit) -> list[Req]:
        gone = [req for req, _ in self.waiting.values() if hit(req)]
        for req in gone:
            room = req.msg.bootstrap_room
            del self.waiting[room]
            self.abandon(room, "aborted on the prefill server")
        return gone

    def start_send(self, req: Req) -> bool:
        """A request of ours is finishing: start writing its prompt's KV to the decode server.
        True when a write started (the request is PREFILL_INFLIGHT and keeps its KV until
        poll_sent returns it); False when there is nothing to write (the decode server is told)."""
        room = req.msg.bootstrap_room
        bound = self.bound.get(room) if room is not None else None
        if bound is None or bound[0] is not req:
            return False
        del self.bound[room]
        dest = bound[1]
        n = len(req.origin_input_ids)
        if req.finish_reason is not None and req.finish_reason.get("type") == "abort":
            self._refuse(dest.notify, room, req.finish_reason.get("message", "aborted on the prefill server"))
            return False
        if not req.output_ids or req.req_pool_idx is None or len(dest.slots) != n:
            self._refuse(dest.notify, room, "the prefill server has no KV for this request")
            return False
        src = self.pools.req_to_token.req_to_token[req.req_pool_idx, :n].tolist()
        try:
            copies = transfer_copies(self.layout, src, [BufferSpec(*spec) for spec in dest.layout], dest.slots)
        except (LayoutMismatch, ValueError) as e:
            self._fail(req, dest, f"KV transfer failed: {e}")
            return False
        write = self.writer.submit(self.engine.write, dest.session_id, copies)
        move(req, ReqState.PREFILL_INFLIGHT)
        self.inflight.append(Outgoing(req, dest, write, time.monotonic(), sum(c[2] for c in copies)))
        return True

    def poll_sent(self) -> list[Req]:
        """Requests whose write ended (the decode server is told how): their KV may be released."""
        if not self.inflight or not self.inflight[0].write.done():
            return []  # one writer: writes end in order
        done: list[Req] = []
        while self.inflight and self.inflight[0].write.done():
            out = self.inflight.pop(0)
            req, dest = out.req, out.dest
            error = out.write.exception()
            if error is not None:
                self._fail(req, dest, f"KV transfer failed: {error}")
            else:
                self.counts.done(time.monotonic() - out.started, out.nbytes)
                reply = KVDone(dest.room, ok=True, first_token=req.output_ids[0], cached_tokens=req.cached_tokens)
                if req.output_token_logprobs:
                    reply.first_logprob = req.output_token_logprobs[0]
                if req.output_top_logprobs:
                    reply.first_top_logprobs = list(req.output_top_logprobs[0])
                self.peers.send(dest.notify, reply)
            done.append(req)
        return done

    def _fail(self, req: Req, dest: KVDestination, message: str) -> None:
        logger.error("room %d: %s", dest.room, message)
        self.counts.failed()
        if not isinstance(req.finish_reason, dict) or req.finish_reason.get("type") != "abort":
            req.finish_reason = {"type": "abort", "status_code": 503, "message": message}
        self._refuse(dest.notify, dest.room, message)

    def _refuse(self, notify: str, room: int, message: str) -> None:
        self.peers.send(notify, KVDone(room, ok=False, message=message))
