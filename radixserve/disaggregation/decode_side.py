"""The decode server's side of a PD pair (--disaggregation-mode decode).

A request that names a bootstrap room takes KV slots for its prompt (PREALLOC, waiting while the
pool is short), sends them to its prefill server (found through the prefill server's bootstrap
endpoint) and waits for the prompt's KV (TRANSFER). When KVDone arrives it starts decoding from the
prefill server's first token, with no forward pass over its prompt. A request without a room runs as
on an ordinary server.

Slots handed to a prefill server are freed only on its KVDone (after its last write) or once it is
gone: an abort sends KVCancel and waits for the answer; a prefill server that misses
HEARTBEAT_MAX_FAILURE heartbeats in a row (its bootstrap /health, every HEARTBEAT_INTERVAL seconds)
fails the requests waiting on it."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import zmq

from radixserve import ipc_codec
from radixserve.disaggregation.bootstrap import check_health, fetch_info
from radixserve.disaggregation.kv_runs import BufferSpec, LayoutMismatch, check_layouts
from radixserve.disaggregation.peers import PeerSockets
from radixserve.disaggregation.settings import (
    heartbeat_interval,
    heartbeat_max_failure,
    reachable_host,
    waiting_timeout,
)
from radixserve.disaggregation.stats import TransferCounts
from radixserve.disaggregation.transfer import create_engine
from radixserve.messages import KVCancel, KVDestination, KVDone, PDStats
from radixserve.scheduler.kv import OutOfKVError, allocate, release_new_pages
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req
    from radixserve.server_args import ServerArgs

logger = logging.getLogger("radixserve.disaggregation")

LOOKUP_RETRY = 1.0  # seconds between lookups of a prefill server that did not answer


@dataclass
class Transfer:
    req: Req
    since: float
    prefill: tuple[str, int]  # the prefill server's bootstrap address
    handoff: str  # its handoff endpoint (for a KVCancel)
    slots: torch.Tensor  # where its prompt's KV goes (not committed: freed by hand if it fails)
    cancelled: bool = False


@dataclass
class Heartbeat:
    """The last check of a prefill server with KV on its way to us."""

    check: Future | None = None
    last: float = 0.0
    missed: int = 0


class DecodeReceiver:
    def __init__(self, args: ServerArgs, pools: MemoryPools, cache: PrefixCache) -> None:
        self.pools = pools
        self.cache = cache
        host = reachable_host(args.host)
        self.engine = create_engine(args.disaggregation_transfer_backend, host, args.disaggregation_ib_device)
        self.layout = [BufferSpec.of(b) for b in pools.kv.layout()]
        self.engine.register([(b.data_ptr, b.nbytes) for b in self.layout])
        ctx = zmq.Context.instance()
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.notify = f"tcp://{host}:{self.inbox.bind_to_random_port(f'tcp://{host}')}"
        # prefill servers' published info, looked up off the loop (a peer that does not answer must
        # not stall decoding): address -> the lookup, or its result
        self.prefill_info: dict[tuple[str, int], dict] = {}
        self.lookups: dict[tuple[str, int], tuple[Future, float]] = {}
        self.lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="pd-bootstrap")
        self.peers = PeerSockets()
        self.heartbeats: dict[tuple[str, int], Heartbeat] = {}
        self.heartbeat_interval = heartbeat_interval()
        self.heartbeat_max_failure = heartbeat_max_failure()
        self.counts = TransferCounts()
        self.prealloc: list[tuple[Req, float]] = []  # PREALLOC, in arrival order
        self.transfers: dict[int, Transfer] = {}  # TRANSFER: room -> request
        self.timeout = waiting_timeout()
        self.bootstrap_port = args.disaggregation_bootstrap_port

    def hold(self, req: Req) -> None:
        move(req, ReqState.BOOTSTRAP)
        self.prealloc.append((req, time.monotonic()))

    @property
    def num_prealloc(self) -> int:
        return len(self.prealloc)

    @property
    def num_transfer(self) -> int:
        return len(self.transfers)

    def stats(self) -> PDStats:
        c = self.counts
        return PDStats("decode", num_prealloc=len(self.prealloc), num_transfer=len(self.transfers),
                       transfers=c.transfers, failures=c.failures, latency_counts=list(c.latency_counts),
                       latency_sum=c.latency_sum)

    def step(self) -> tuple[list[Req], list[Req]]:
        """Claim KV for waiting requests, collect arrived prompts. Returns (requests ready to
        decode, with their first token; requests that failed, with their finish_reason)."""
        failed = self._claim()
        ready: list[Req] = []
        while self.inbox.poll(0):
            done = ipc_codec.recv(self.inbox)
            if not isinstance(done, KVDone):
                continue
            transfer = self.transfers.pop(done.room, None)
            if transfer is None:
                continue  # timed out or aborted already
            req = transfer.req
            if done.ok:
                self.counts.done(time.monotonic() - transfer.since)
            if req.to_abort or not done.ok:
                failed.append(self._fail(transfer, done.message))
            else:
                self._start(req, done)
                ready.append(req)
        now = time.monotonic()
        for room in [r for r, t in self.transfers.items() if now - t.since > self.timeout]:
            failed.append(self._drop(room, f"the prompt's KV did not arrive within {self.timeout:g} s (room {room})"))
        for prefill in self._gone_prefill_servers():
            for room in [r for r, t in self.transfers.items() if t.prefill == prefill]:
                failed.append(self._drop(room, f"prefill server {prefill[0]}:{prefill[1]} stopped answering "
                                               f"(room {room}); its KV will not arrive"))
            self.prefill_info.pop(prefill, None)  # look it up afresh next time
        return ready, failed

    def _drop(self, room: int, message: str) -> Req:
        return self._fail(self.transfers.pop(room), message)

    def _fail(self, transfer: Transfer, message: str) -> Req:
        """A transfer that will not be decoded: its slots go back (they hold no committed KV)."""
        req = transfer.req
        if req.to_abort:
            req.finish_reason = req.abort_reason or {"type": "abort", "message": "aborted"}
        else:
            self.counts.failed()
            req.finish_reason = {"type": "abort", "status_code": 503, "message": message}
        release_new_pages([req], [transfer.slots], self.pools)
        return req

    def _gone_prefill_servers(self) -> list[tuple[str, int]]:
        """Prefill servers we wait on that missed too many heartbeats. Checks run off the loop."""
        waited_on = {t.prefill for t in self.transfers.values()}
        for prefill in [p for p in self.heartbeats if p not in waited_on]:
            del self.heartbeats[prefill]
        now = time.monotonic()
        gone = []
        for prefill in waited_on:
            beat = self.heartbeats.setdefault(prefill, Heartbeat(last=now))
            if beat.check is not None and beat.check.done():
                beat.missed = 0 if beat.check.exception() is None else beat.missed + 1
                beat.check = None
                if beat.missed >= self.heartbeat_max_failure:
                    logger.error("prefill server %s:%d missed %d heartbeats", *prefill, beat.missed)
                    del self.heartbeats[prefill]
                    gone.append(prefill)
                    continue
            if beat.check is None and now - beat.last >= self.heartbeat_interval:
                beat.last = now
                beat.check = self.lookup_pool.submit(check_health, *prefill, timeout=self.heartbeat_interval)
        return gone

    def _claim(self) -> list[Req]:
        failed: list[Req] = []
        left: list[tuple[Req, float]] = []
        for i, (req, since) in enumerate(self.prealloc):
            msg = req.msg
            try:
                info = self._info(self._address(msg))
                if info is None:  # still looking it up
                    left.append((req, since))
                    continue
                check_layouts([BufferSpec(*b) for b in info["layout"]], self.layout)
            except (OSError, ValueError, KeyError) as e:
                if time.monotonic() - since > self.timeout or isinstance(e, LayoutMismatch):
                    req.finish_reason = {"type": "abort", "status_code": 503,
                                         "message": f"prefill server {msg.bootstrap_host} unusable: {e}"}
                    failed.append(req)
                else:
                    left.append((req, since))
                continue
            if req.state is ReqState.BOOTSTRAP:
                move(req, ReqState.PREALLOC)
            try:
                slots = allocate(req, len(req.origin_input_ids), self.pools, self.cache)
            except OutOfKVError:
                left.extend(self.prealloc[i:])  # first come, first served
                break
            move(req, ReqState.TRANSFER)
            self.transfers[msg.bootstrap_room] = Transfer(req, time.monotonic(), self._address(msg), info["handoff"],
                                                          slots)
            self.peers.send(info["handoff"], KVDestination(
                msg.bootstrap_room, self.engine.session_id, self.notify, slots.tolist(),
                [[b.data_ptr, b.bytes_per_slot, b.num_slots] for b in self.layout]))
        self.prealloc = left
        return failed

    def _start(self, req: Req, done: KVDone) -> None:
        """The prompt's KV is in our slots: decode from the prefill server's first token."""
        req.kv_committed_len = len(req.origin_input_ids)
        req.cached_tokens = done.cached_tokens
        req.output_ids.append(done.first_token)
        if req.return_logprob and done.first_logprob is not None:
            req.output_token_logprobs.append(done.first_logprob)
            if req.top_logprobs_num > 0:
                req.output_top_logprobs.append(done.first_top_logprobs[: req.top_logprobs_num])
        rows = torch.tensor([req.req_pool_idx], device=self.pools.device)
        self.pools.set_last_tokens(rows, torch.tensor([done.first_token], device=self.pools.device))
        move(req, ReqState.DECODING)
        req.check_finished()

    def take_aborted(self, hit) -> list[Req]:
        """Waiting requests an abort hits leave now; those whose KV is on its way are marked and
        leave when it lands (their slots must not be reused before)."""
        gone = [req for req, _ in self.prealloc if hit(req)]
        if gone:
            self.prealloc = [(r, s) for r, s in self.prealloc if not hit(r)]
        for room, transfer in self.transfers.items():
            if hit(transfer.req) and not transfer.cancelled:
                transfer.req.to_abort = True
                transfer.cancelled = True
                self.peers.send(transfer.handoff, KVCancel(room, self.notify))
        return gone

    def _address(self, msg) -> tuple[str, int]:
        return (msg.bootstrap_host or "127.0.0.1", msg.bootstrap_port or self.bootstrap_port)

    def _info(self, key: tuple[str, int]) -> dict | None:
        """The prefill server's info; None while it is being looked up; raises what the last lookup
        raised (a failed one is tried again after LOOKUP_RETRY seconds)."""
        info = self.prefill_info.get(key)
        if info is not None:
            return info
        lookup = self.lookups.get(key)
        if lookup is None:
            self.lookups[key] = (self.lookup_pool.submit(fetch_info, *key), time.monotonic())
            return None
        future, started = lookup
        if not future.done():
            return None
        error = future.exception()
        if error is None:
            del self.lookups[key]
            info = self.prefill_info[key] = future.result()
            return info
        if time.monotonic() - started > LOOKUP_RETRY:
            del self.lookups[key]
        raise error
