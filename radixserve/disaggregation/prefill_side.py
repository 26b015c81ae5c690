"""The prefill server's side of a PD pair (--disaggregation-mode prefill).

A request that names a bootstrap room waits (BOOTSTRAP) until the decode server sends where its
prompt's KV goes (KVDestination, on the handoff socket); it is then prefilled as usual, with an
output budget of one token. When it finishes, before its KV goes to the prefix cache, the prompt's
KV is written into the decode server's pool (one copy per run of consecutive slots per buffer) and
the decode server is told, with the first token (KVDone). A request without a room runs as on an
ordinary server (warm-up, /health_generate)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zmq

from radixserve import ipc_codec
from radixserve.disaggregation.bootstrap import BootstrapServer
from radixserve.disaggregation.kv_runs import BufferSpec, LayoutMismatch, transfer_copies
from radixserve.disaggregation.settings import bootstrap_timeout, reachable_host
from radixserve.disaggregation.transfer import TransferError, create_engine
from radixserve.messages import KVDestination, KVDone
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req
    from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve.disaggregation")


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
        self.peers: dict[str, zmq.Socket] = {}
        self.bootstrap = BootstrapServer(args.host or "0.0.0.0", args.disaggregation_bootstrap_port, {
            "session_id": self.engine.session_id, "handoff": f"tcp://{host}:{port}",
            "layout": [[b.data_ptr, b.bytes_per_slot, b.num_slots] for b in self.layout],
            "page_size": args.page_size,
        })
        self.waiting: dict[int, tuple[Req, float]] = {}  # BOOTSTRAP: room -> (request, since)
        self.destinations: dict[int, tuple[KVDestination, float]] = {}  # arrived before their request
        self.bound: dict[int, KVDestination] = {}  # id(req) -> its destination, until it finishes
        self.timeout = bootstrap_timeout()

    def hold(self, req: Req) -> None:
        """A new request with a room: it waits for its destination (BOOTSTRAP)."""
        req.max_new_tokens = min(req.max_new_tokens, 1)  # the decode server generates the rest
        move(req, ReqState.BOOTSTRAP)
        self.waiting[req.msg.bootstrap_room] = (req, time.monotonic())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def poll(self) -> tuple[list[Req], list[Req]]:
        """(requests whose destination arrived: to prefill now, requests that waited too long)."""
        while self.handoff.poll(0):
            msg = ipc_codec.recv(self.handoff)
            if isinstance(msg, KVDestination):
                self.destinations[msg.room] = (msg, time.monotonic())
        ready = []
        for room in [r for r in self.waiting if r in self.destinations]:
            req, _ = self.waiting.pop(room)
            self.bound[id(req)] = self.destinations.pop(room)[0]
            move(req, ReqState.WAITING)
            ready.append(req)
        now = time.monotonic()
        expired = [room for room, (_, since) in self.waiting.items() if now - since > self.timeout]
        late = []
        for room in expired:
            req, _ = self.waiting.pop(room)
            req.finish_reason = {"type": "abort", "status_code": 503, "message":
                                 f"the decode server did not claim bootstrap room {room} within {self.timeout:g} s"}
            late.append(req)
        for room in [r for r, (_, since) in self.destinations.items() if now - since > self.timeout]:
            del self.destinations[room]  # its request never came (the router gave up on it)
        return ready, late

    def take_aborted(self, hit) -> list[Req]:
        gone = [req for req, _ in self.waiting.values() if hit(req)]
        for req in gone:
            del self.waiting[req.msg.bootstrap_room]
        return gone

    def send_kv(self, req: Req) -> None:
        """Before a request's KV is released: write its prompt's KV to the decode server and tell it
        (or tell it why not)."""
        dest = self.bound.pop(id(req), None)
        if dest is None:
            return
        done = KVDone(dest.room, ok=False)
        n = len(req.origin_input_ids)
        if req.finish_reason is not None and req.finish_reason.get("type") == "abort":
            done.message = req.finish_reason.get("message", "aborted on the prefill server")
        elif not req.output_ids or req.req_pool_idx is None or len(dest.slots) != n:
            done.message = "the prefill server has no KV for this request"
        else:
            src = self.pools.req_to_token.req_to_token[req.req_pool_idx, :n].tolist()
            peer = [BufferSpec(*spec) for spec in dest.layout]
            try:
                self.engine.write(dest.session_id, transfer_copies(self.layout, src, peer, dest.slots))
                done = KVDone(dest.room, ok=True, first_token=req.output_ids[0], cached_tokens=req.cached_tokens)
                if req.output_token_logprobs:
                    done.first_logprob = req.output_token_logprobs[0]
                if req.output_top_logprobs:
                    done.first_top_logprobs = list(req.output_top_logprobs[0])
            except (TransferError, LayoutMismatch, ValueError) as e:
                logger.error("KV transfer of room %d failed: %s", dest.room, e)
                done.message = f"KV transfer failed: {e}"
                req.finish_reason = {"type": "abort", "status_code": 503, "message": done.message}
        ipc_codec.send(self._peer(dest.notify), done)

    def _peer(self, endpoint: str) -> zmq.Socket:
        sock = self.peers.get(endpoint)
        if sock is None:
            sock = self.peers[endpoint] = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
        return sock
