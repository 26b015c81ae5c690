"""The decode server's side of a PD pair (--disaggregation-mode decode).

A request that names a bootstrap room takes KV slots for its prompt (PREALLOC, waiting while the
pool is short), sends them to its prefill server (found through the prefill server's bootstrap
endpoint) and waits for the prompt's KV (TRANSFER). When KVDone arrives it starts decoding from the
prefill server's first token, with no forward pass over its prompt. A request without a room runs as
on an ordinary server.

Every TP rank holds the same requests and slots: rank 0 looks prefill servers up, watches clocks and
heartbeats, and broadcasts what it decided (PDDecision: claim these rooms' slots now, fail those);
KVDone reaches every rank through the same broadcast. Only rank 0 talks to peers.

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

from radixserve.disaggregation.bootstrap import check_health, fetch_info
from radixserve.disaggregation.kv_runs import BufferSpec, LayoutMismatch, check_layouts
from radixserve.disaggregation.peers import PeerSockets
from radixserve.disaggregation.ranks import local_host, register_ranks
from radixserve.disaggregation.settings import heartbeat_interval, heartbeat_max_failure, waiting_timeout
from radixserve.disaggregation.stats import TransferCounts
from radixserve.disaggregation.transfer import create_engine
from radixserve.messages import KVCancel, KVDestination, KVDone, PDDecision, PDStats
from radixserve.scheduler.kv import OutOfKVError, allocate, release_new_pages
from radixserve.scheduler.state import ReqState, move

if TYPE_CHECKING:
    from radixserve.cache.base import PrefixCache
    from radixserve.cache.memory import MemoryPools
    from radixserve.scheduler.req import Req
    from radixserve.server_args import ServerArgs

HEARTBEAT_TIMEOUT_MIN = 2.0  # seconds a heartbeat waits for its answer at least

logger = logging.getLogger("radixserve.disaggregation")

LOOKUP_RETRY = 1.0  # seconds between lookups of a prefill server that did not answer


def prefill_group(info: dict, room: int) -> dict:
    """The prefill server's DP group that serves `room` (its DP controller sends a request with a
    room to group room % dp_size, as SGLang's does)."""
    return info["groups"][room % len(info["groups"])]


@dataclass
class Transfer:
    req: Req
    since: float
    prefill: tuple[str, int]  # the prefill server's bootstrap address
    slots: torch.Tensor  # where its prompt's KV goes (not committed: freed by hand if it fails)
    handoff: str = ""  # (rank 0) the prefill server's handoff endpoint, for a KVCancel
    cancelled: bool = False


@dataclass
class Heartbeat:
    """The last check of a prefill server with KV on its way to us."""

    check: Future | None = None
    last: float = 0.0
    missed: int = 0


class DecodeReceiver:
    def __init__(self, args: ServerArgs, pools: MemoryPools, cache: PrefixCache, kv_heads: tuple[int, int, int],
                 tp_rank: int) -> None:
        self.pools = pools
        self.cache = cache
        self.rank0 = tp_rank == 0
        first, count, self.num_kv_heads = kv_heads
        host = local_host(args)
        self.engine = create_engine(args.disaggregation_transfer_backend, host, args.disaggregation_ib_device,
                                    pools.kv.device)
        self.layout, self.ranks = register_ranks(self.engine, pools, first, count)
        self.inbox: zmq.Socket | None = None
        self.notify = ""
        if self.rank0:
            self.inbox = zmq.Context.instance().socket(zmq.PULL)
            self.inbox.setsockopt(zmq.LINGER, 0)
            self.notify = f"tcp://{host}:{self.inbox.bind_to_random_port(f'tcp://{host}')}"
        # (rank 0) prefill servers' published info, looked up off the loop (a peer that does not
        # answer must not stall decoding): address -> the lookup, or its result
        self.prefill_info: dict[tuple[str, int], dict] = {}
        self.lookups: dict[tuple[str, int], tuple[Future, float]] = {}
        self.lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="pd-bootstrap")
        self.peers = PeerSockets(enabled=self.rank0)
        self.heartbeats: dict[tuple[str, int], Heartbeat] = {}
        self.heartbeat_interval = heartbeat_interval()
        self.heartbeat_max_failure = heartbeat_max_failure()
        self.counts = TransferCounts()
        self.prealloc: list[tuple[Req, float]] = []  # BOOTSTRAP/PREALLOC, in arrival order
        self.transfers: dict[int, Transfer] = {}  # TRANSFER: room -> request
        self.timeout = waiting_timeout()
        self.bootstrap_port = args.disaggregation_bootstrap_port

    # ---- requests and messages (every rank, in the broadcast's order) ---------------------------
    def hold(self, req: Req) -> None:
        move(req, ReqState.BOOTSTRAP)
        self.prealloc.append((req, time.monotonic()))

    def apply(self, decision: PDDecision) -> list[Req]:
        """Carry out rank 0's decision; returns the requests that ended."""
        if decision.kind == "claim":
            self._claim(decision.rooms)
            return []
        if decision.kind != "fail":
            logger.error("unknown PD decision %r", decision.kind)
            return []
        rooms = set(decision.rooms)
        failed = [req for req, _ in self.prealloc if req.msg.bootstrap_room in rooms]
        self.prealloc = [(r, s) for r, s in self.prealloc if r.msg.bootstrap_room not in rooms]
        for req in failed:
            self.counts.failed()
            req.finish_reason = {"type": "abort", "status_code": 503, "message": decision.message}
        failed += [self._fail(self.transfers.pop(room), decision.message) for room in decision.rooms
                   if room in self.transfers]
        return failed

    def _claim(self, rooms: list[int]) -> None:
        """Reserve KV for these rooms' prompts, in order, while the pool lasts; send (rank 0) each
        its destination."""
        waiting = {req.msg.bootstrap_room: req for req, _ in self.prealloc}
        claimed = set()
        for room in rooms:
            req = waiting.get(room)
            if req is None:
                continue
            if req.state is ReqState.BOOTSTRAP:
                move(req, ReqState.PREALLOC)
            try:
                slots = allocate(req, len(req.origin_input_ids), self.pools, self.cache)
            except OutOfKVError:
                break  # first come, first served: the rest wait for room
            move(req, ReqState.TRANSFER)
            claimed.add(room)
            address = self._address(req.msg)
            transfer = self.transfers[room] = Transfer(req, time.monotonic(), address, slots)
            if self.rank0 and address in self.prefill_info:
                transfer.handoff = prefill_group(self.prefill_info[address], room)["handoff"]
                self.peers.send(transfer.handoff, KVDestination(room, self.notify, slots.tolist(), self.ranks))
        self.prealloc = [(r, s) for r, s in self.prealloc if r.msg.bootstrap_room not in claimed]

    def on_done(self, done: KVDone) -> tuple[list[Req], list[Req]]:
        """A prefill server's KVDone: (the request, ready to decode; or the request, failed)."""
        transfer = self.transfers.pop(done.room, None)
        if transfer is None:
            return [], []  # failed or timed out already
        req = transfer.req
        if done.ok:
            self.counts.done(time.monotonic() - transfer.since)
        if req.to_abort or not done.ok:
            return [], [self._fail(transfer, done.message)]
        self._start(req, done)
        return [req], []

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
        leave when their prefill server answers the KVCancel (their slots must not be reused
        before its last write)."""
        gone = [req for req, _ in self.prealloc if hit(req)]
        if gone:
            self.prealloc = [(r, s) for r, s in self.prealloc if not hit(r)]
        for room, transfer in self.transfers.items():
            if hit(transfer.req) and not transfer.cancelled:
                transfer.req.to_abort = True
                transfer.cancelled = True
                self.peers.send(transfer.handoff, KVCancel(room, self.notify))
        return gone

    # ---- rank 0's decisions ---------------------------------------------------------------------
    def decide(self) -> list[PDDecision]:
        """Which waiting rooms to claim KV for now (their prefill server is known), and which
        requests to fail (timeouts, unusable or silent prefill servers)."""
        decisions: list[PDDecision] = []
        now = time.monotonic()
        late = [room for room, t in self.transfers.items() if now - t.since > self.timeout]
        if late:
            decisions.append(PDDecision("fail", late, f"the prompt's KV did not arrive within {self.timeout:g} s"))
        for prefill in self._gone_prefill_servers():
            rooms = [r for r, t in self.transfers.items() if t.prefill == prefill and r not in late]
            decisions.append(PDDecision("fail", rooms, f"prefill server {prefill[0]}:{prefill[1]} stopped "
                                                       f"answering; the prompt's KV will not arrive"))
            self.prefill_info.pop(prefill, None)  # look it up afresh next time
        claim: list[int] = []
        for req, since in self.prealloc:
            room = req.msg.bootstrap_room
            address = self._address(req.msg)
            try:
                info = self._info(address)
                if info is None:  # still looking it up
                    continue
                self._check_peer(info)
                claim.append(room)
            except (OSError, ValueError, KeyError, TypeError) as e:
                if now - since > self.timeout or isinstance(e, LayoutMismatch):
                    decisions.append(PDDecision("fail", [room], f"prefill server {address[0]}:{address[1]} "
                                                                f"unusable: {e}"))
        if claim:
            decisions.append(PDDecision("claim", claim))
        return decisions

    def _check_peer(self, info: dict) -> None:
        """Raises LayoutMismatch when the prefill server's KV cannot go into ours."""
        for group in info["groups"]:
            if group.get("num_kv_heads") != self.num_kv_heads:
                raise LayoutMismatch(f"the prefill server's model has {group.get('num_kv_heads')} KV heads, "
                                     f"ours {self.num_kv_heads}")
            for _, layout in group["ranks"]:
                check_layouts([BufferSpec(*row) for row in layout], self.layout)

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
                # a busy server may answer slowly; a dead one refuses at once: the wait has a floor
                beat.check = self.lookup_pool.submit(check_health, *prefill,
                                                     timeout=max(self.heartbeat_interval, HEARTBEAT_TIMEOUT_MIN))
        return gone

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

    def _address(self, msg) -> tuple[str, int]:
        return (msg.bootstrap_host or "127.0.0.1", msg.bootstrap_port or self.bootstrap_port)

    # ---- counts ---------------------------------------------------------------------------------
    @property
    def num_held(self) -> int:
        return len(self.prealloc) + len(self.transfers)

    def stats(self) -> PDStats:
        c = self.counts
        return PDStats("decode", num_prealloc=len(self.prealloc), num_transfer=len(self.transfers),
                       transfers=c.transfers, failures=c.failures, latency_counts=list(c.latency_counts),
                       latency_sum=c.latency_sum)
