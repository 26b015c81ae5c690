"""The prefill server's side of a PD pair (--disaggregation-mode prefill).

A request that names a bootstrap room waits (BOOTSTRAP) until the decode server sends where its
prompt's KV goes (KVDestination, on rank 0's handoff socket); it is then prefilled as usual, with an
output budget of one token. Every TP rank writes its KV heads of the prompt into the decode server's
ranks that hold them, on a transfer thread, while the scheduler goes on: each chunk of a chunked
prefill as soon as it is computed, the rest when the prompt's prefill finishes (PREFILL_INFLIGHT).
Once every rank's writes are done the decode server is told, with the first token (KVDone), and the
KV goes to the prefix cache. A request without a room runs as on an ordinary
server (warm-up, /health_generate).

Every rank holds the same requests in the same states: peer messages reach all ranks through the
scheduler's broadcast, and what depends on a clock (timeouts) is decided by rank 0 and broadcast
too (PDDecision). Only rank 0 talks to peers. Every destination gets exactly one KVDone, and only
after the last byte that will ever be written into its slots: the decode server frees them on it."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from radixserve.disaggregation.bootstrap import BootstrapServer, register_group
from radixserve.disaggregation.kv_runs import LayoutMismatch, transfer_copies
from radixserve.disaggregation.peers import PeerSockets
from radixserve.disaggregation.ranks import local_host, register_ranks, specs
from radixserve.disaggregation.settings import bootstrap_timeout, reachable_host
from radixserve.disaggregation.stats import TransferCounts
from radixserve.disaggregation.transfer import TransferEngine, create_engine
from radixserve.distributed.parallel_state import tp_min_ints
from radixserve.messages import KVCancel, KVDestination, KVDone, PDDecision, PDStats
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req
    from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve.disaggregation")


@dataclass
class Bound:
    """A request with its destination, being prefilled; `sent` tokens of its prompt are written or
    being written (the chunks computed so far), by `writes`."""

    req: Req
    dest: KVDestination
    sent: int = 0
    writes: list[Future] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class Outgoing:
    """A request whose prefill ended and whose KV writes are not all done (PREFILL_INFLIGHT). With
    `refusal`, the request ended without its KV (aborted): the decode server is refused once the
    writes already started are done, since it frees the destination on the answer."""

    req: Req
    dest: KVDestination
    writes: list[Future]
    started: float
    nbytes: int
    refusal: str | None = None

    def done(self) -> bool:
        return all(w.done() for w in self.writes)

    def error(self) -> BaseException | None:
        """The first failed write's error (of those done)."""
        return next((w.exception() for w in self.writes if w.done() and w.exception() is not None), None)


def write_all(engine: TransferEngine, writes: list[tuple[str, list[tuple[int, int, int]]]]) -> None:
    for session, copies in writes:
        if copies:
            engine.write(session, copies)


class PrefillHandoff:
    def __init__(self, args: ServerArgs, pools: MemoryPools, kv_heads: tuple[int, int, int], tp_rank: int,
                 dp_rank: int = 0) -> None:
        self.pools = pools
        self.rank0 = tp_rank == 0
        first, count, total = kv_heads
        self.engine = create_engine(args.disaggregation_transfer_backend, local_host(args),
                                    args.disaggregation_ib_device, pools.kv.device)
        self.layout, ranks = register_ranks(self.engine, pools, first, count)
        # a KV head held by several ranks (replicated) is written by the first of them only
        done_by_lower = max([specs(r)[0].head_end for r in ranks[:tp_rank] if r.layout] or [first])
        self.heads = (max(first, done_by_lower), first + count)
        self.peers = PeerSockets(enabled=self.rank0)
        self.handoff: zmq.Socket | None = None
        self.bootstrap: BootstrapServer | None = None
        if self.rank0:
            host = local_host(args)
            self.handoff = zmq.Context.instance().socket(zmq.PULL)
            self.handoff.setsockopt(zmq.LINGER, 0)
            port = self.handoff.bind_to_random_port(f"tcp://{host}")
            info = {"handoff": f"tcp://{host}:{port}", "ranks": [[r.session_id, r.layout] for r in ranks],
                    "num_kv_heads": total, "page_size": args.page_size, "tp_size": len(ranks)}
            if dp_rank == 0:  # the server's one bootstrap endpoint; the other DP groups register there
                self.bootstrap = BootstrapServer(args.host or "0.0.0.0", args.disaggregation_bootstrap_port,
                                                 args.dp_size)
                self.bootstrap.register(0, info)
            else:
                register_group(reachable_host(args.host), args.disaggregation_bootstrap_port, dp_rank, info)
        self.waiting: dict[int, tuple[Req, float]] = {}  # BOOTSTRAP: room -> (request, since)
        self.destinations: dict[int, tuple[KVDestination, float]] = {}  # arrived before their request
        self.bound: dict[int, Bound] = {}  # room -> request being prefilled
        # rooms whose request ended before its destination came: room -> (why, since)
        self.abandoned: dict[int, tuple[str, float]] = {}
        self.inflight: list[Outgoing] = []
        # one writer thread: writes go out in the order requests finish
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="pd-transfer")
        self.counts = TransferCounts()
        self.timeout = bootstrap_timeout()

    # ---- requests and peer messages (every rank, in the broadcast's order) ---------------------
    def hold(self, req: Req) -> list[Req]:
        """A new request with a room: it waits for its destination (BOOTSTRAP). Returns it when the
        destination is already here (to prefill now)."""
        req.max_new_tokens = min(req.max_new_tokens, 1)  # the decode server generates the rest
        move(req, ReqState.BOOTSTRAP)
        room = req.msg.bootstrap_room
        if room in self.abandoned:  # a second request for a room that ended: it waits and times out
            self.abandoned.pop(room)
        self.waiting[room] = (req, time.monotonic())
        return self._bind(room)

    def on_destination(self, msg: KVDestination) -> list[Req]:
        """The decode server's destination for a room: the request to prefill now, if it is here."""
        if msg.room in self.abandoned:
            self._refuse(msg.notify, msg.room, self.abandoned[msg.room][0])
            return []
        self.destinations[msg.room] = (msg, time.monotonic())
        return self._bind(msg.room)

    def _bind(self, room: int) -> list[Req]:
        if room not in self.waiting or room not in self.destinations:
            return []
        req, _ = self.waiting.pop(room)
        self.bound[room] = Bound(req, self.destinations.pop(room)[0])
        move(req, ReqState.WAITING)
        return [req]

    def on_cancel(self, msg: KVCancel) -> str | None:
        """The decode server aborted `room`: a request being prefilled is to be aborted (returns its
        id; its KVDone goes when it ends); a write in flight answers when it is done; anything else
        is answered now."""
        if msg.room in self.bound:
            return self.bound[msg.room].req.rid
        if any(out.dest.room == msg.room for out in self.inflight):
            return None
        self.destinations.pop(msg.room, None)
        if msg.room in self.waiting:  # not claimed any more: it ends with its bootstrap timeout
            self.abandoned[msg.room] = ("cancelled by the decode server", time.monotonic())
        self._refuse(msg.notify, msg.room, "cancelled by the decode server")
        return None

    def expire(self, rooms: list[int]) -> list[Req]:
        """Rank 0 found these rooms past the bootstrap timeout: requests that waited end (returned),
        destinations whose request never came are refused, abandoned rooms are forgotten."""
        late = []
        now = time.monotonic()
        for room in rooms:
            if room in self.waiting:
                req, _ = self.waiting.pop(room)
                message = f"the decode server did not claim bootstrap room {room} within {self.timeout:g} s"
                req.finish_reason = {"type": "abort", "status_code": 503, "message": message}
                self.abandoned[room] = (message, now)
                late.append(req)
            elif room in self.destinations:  # its request never came (the router gave up on it)
                dest = self.destinations.pop(room)[0]
                self._refuse(dest.notify, room, "the prefill server never received this request")
            else:
                self.abandoned.pop(room, None)
        return late

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

    # ---- rank 0's decisions ---------------------------------------------------------------------
    def decide(self) -> list[PDDecision]:
        """Rooms past the bootstrap timeout, for every rank to expire at the same step."""
        now = time.monotonic()
        rooms = [room for table in (self.waiting, self.destinations, self.abandoned)
                 for room, (_, since) in table.items() if now - since > self.timeout]
        return [PDDecision("expire", rooms)] if rooms else []

    # ---- the KV writes --------------------------------------------------------------------------
    def send_chunk(self, req: Req, computed: int) -> None:
        """A chunk of `req`'s prompt is computed: its first `computed` tokens have their KV. Start
        writing what of it is not written yet, so the transfer overlaps the rest of the prefill.
        Every rank calls it at the same step."""
        bound = self._bound_of(req)
        if bound is not None and len(bound.dest.slots) == len(req.origin_input_ids):
            self._write(bound, min(computed, len(req.origin_input_ids)))

    def start_send(self, req: Req) -> bool:
        """A request of ours is finishing: write what of its prompt's KV is not written yet. True
        when writes are in flight (the request is PREFILL_INFLIGHT and keeps its KV until poll_sent
        returns it); False when the decode server was answered now. Every rank decides the same."""
        bound = self._bound_of(req)
        if bound is None:
            return False
        room, dest = req.msg.bootstrap_room, bound.dest
        del self.bound[room]
        n = len(req.origin_input_ids)
        refusal = None
        if req.finish_reason is not None and req.finish_reason.get("type") == "abort":
            refusal = req.finish_reason.get("message", "aborted on the prefill server")
        elif not req.output_ids or req.req_pool_idx is None or len(dest.slots) != n:
            refusal = "the prefill server has no KV for this request"
        else:
            self._write(bound, n)
        if refusal is not None and all(w.done() for w in bound.writes):
            self._refuse(dest.notify, room, refusal)
            return False
        move(req, ReqState.PREFILL_INFLIGHT)
        self.inflight.append(Outgoing(req, dest, bound.writes, time.monotonic(), bound.nbytes, refusal))
        return True

    def _bound_of(self, req: Req) -> Bound | None:
        room = req.msg.bootstrap_room
        bound = self.bound.get(room) if room is not None else None
        return bound if bound is not None and bound.req is req else None

    def _write(self, bound: Bound, end: int) -> None:
        """Start writing tokens [bound.sent, end) of the prompt: our KV heads of them, into each of
        the decode server's ranks that holds them."""
        if end <= bound.sent:
            return
        req, dest = bound.req, bound.dest
        src = self.pools.req_to_token.req_to_token[req.req_pool_idx, bound.sent:end].tolist()
        dst = dest.slots[bound.sent:end]
        try:
            writes = [(rank.session_id, transfer_copies(self.layout, src, specs(rank), dst, self.heads))
                      for rank in dest.ranks]
            write = self.writer.submit(write_all, self.engine, writes)
            bound.nbytes += sum(c[2] for _, copies in writes for c in copies)
        except (LayoutMismatch, ValueError, TypeError) as e:  # a failed write, as every rank sees one
            write = Future()
            write.set_exception(e)
        if end < len(req.origin_input_ids):
            self.counts.chunk_writes += 1
        bound.writes.append(write)
        bound.sent = end

    def poll_sent(self) -> list[Req]:
        """Requests whose writes ended on every rank (the decode server is told how): their KV may
        be released. With TP the ranks agree through one all-reduce."""
        if not self.inflight:
            return []
        done = [int(out.done()) for out in self.inflight]
        failed = [-int(out.done() and out.error() is not None) for out in self.inflight]
        agreed = tp_min_ints(done + failed)  # done on every rank; failed on any
        finished: list[Req] = []
        for i, out in enumerate(list(self.inflight)):
            if not agreed[i]:
                break  # one writer per rank: writes end in order
            self.inflight.pop(0)
            req, dest = out.req, out.dest
            if out.refusal is not None:
                self._refuse(dest.notify, dest.room, out.refusal)
            elif agreed[len(done) + i]:
                self._fail(req, dest, f"KV transfer failed: {out.error() or 'on another TP rank'}")
            else:
                self.counts.done(time.monotonic() - out.started, out.nbytes)
                reply = KVDone(dest.room, ok=True, first_token=req.output_ids[0], cached_tokens=req.cached_tokens)
                if req.output_token_logprobs:
                    reply.first_logprob = req.output_token_logprobs[0]
                if req.output_top_logprobs:
                    reply.first_top_logprobs = list(req.output_top_logprobs[0])
                self.peers.send(dest.notify, reply)
            finished.append(req)
        return finished

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_held(self) -> int:
        """Requests held outside the scheduler's queues (BOOTSTRAP and PREFILL_INFLIGHT)."""
        return len(self.waiting) + len(self.inflight)

    def stats(self) -> PDStats:
        c = self.counts
        return PDStats("prefill", num_bootstrap=len(self.waiting), num_inflight=len(self.inflight),
                       transfers=c.transfers, failures=c.failures, bytes=c.bytes, chunk_writes=c.chunk_writes,
                       latency_counts=list(c.latency_counts), latency_sum=c.latency_sum)

    def _fail(self, req: Req, dest: KVDestination, message: str) -> None:
        if self.rank0:
            logger.error("room %d: %s", dest.room, message)
        self.counts.failed()
        if not isinstance(req.finish_reason, dict) or req.finish_reason.get("type") != "abort":
            req.finish_reason = {"type": "abort", "status_code": 503, "message": message}
        self._refuse(dest.notify, dest.room, message)

    def _refuse(self, notify: str, room: int, message: str) -> None:
        self.peers.send(notify, KVDone(room, ok=False, message=message))
