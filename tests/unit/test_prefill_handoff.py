"""The prefill side's KV writes, on one rank with a recording transfer engine: a chunked prompt's KV
goes out chunk by chunk as each is computed, and the decode server hears exactly once, only after
the last write into its slots has ended (also when the request is aborted between chunks)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from radixserve.cache.pools import KVPool, ReqToTokenPool
from radixserve.disaggregation.prefill_side import PrefillHandoff
from radixserve.messages import GenerateReq, KVDestination, KVDone, PeerRank
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.req import Req
from radixserve.scheduler.state import ReqState, move

LAYERS, HEADS, HEAD_DIM, SLOTS = 2, 2, 4, 64


class GatedEngine:
    """Records each write; a write waits until the gate opens."""

    session_id = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.writes: list[tuple[str, list[tuple[int, int, int]]]] = []

    def write(self, peer: str, copies: list[tuple[int, int, int]]) -> None:
        self.gate.wait(30)
        self.writes.append((peer, copies))


class Peers:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, endpoint: str, msg: object) -> bool:
        self.sent.append((endpoint, msg))
        return True


def handoff_with(pool: KVPool, rows: ReqToTokenPool) -> tuple[PrefillHandoff, GatedEngine, Peers]:
    args = SimpleNamespace(disaggregation_transfer_backend="fake", host="127.0.0.1", nnodes=1, dist_init_addr=None,
                           disaggregation_ib_device=None, page_size=1, tp_size=1, dp_size=1,
                           disaggregation_bootstrap_port=0)
    pools = SimpleNamespace(kv=pool, req_to_token=rows)
    # rank 1 of a server: no sockets or bootstrap server (rank 0's); it writes every head here
    handoff = PrefillHandoff(args, pools, (0, HEADS, HEADS), tp_rank=1)
    handoff.heads = (0, HEADS)
    engine, peers = GatedEngine(), Peers()
    handoff.engine, handoff.peers = engine, peers
    return handoff, engine, peers


def bound_request(handoff: PrefillHandoff, rows: ReqToTokenPool, prompt_len: int, room: int = 7) -> Req:
    req = Req(GenerateReq("r", list(range(1, prompt_len + 1)), SamplingParams(), bootstrap_room=room), eos_ids={0},
              max_new_tokens=4)
    req.req_pool_idx = 1
    rows.req_to_token[1, :prompt_len] = torch.arange(10, 10 + prompt_len)  # our slots 10, 11, ...
    assert handoff.hold(req) == []
    layout = [[b.data_ptr, b.bytes_per_slot, b.num_slots, b.head_start, b.num_heads] for b in handoff.layout]
    dest = KVDestination(room, "tcp://decode:1", slots=list(range(30, 30 + prompt_len)),
                         ranks=[PeerRank("decode-rank", layout)])
    assert handoff.on_destination(dest) == [req]
    move(req, ReqState.PREFILLING)  # admitted, as the scheduler does
    return req


def written_slots(engine: GatedEngine, pool: KVPool) -> list[int]:
    """Source slots written, per the first buffer's copies (layer 0's K)."""
    buf = pool.layout()[0]
    out = []
    for _, copies in engine.writes:
        for src, _, nbytes in copies:
            if buf.data_ptr <= src < buf.data_ptr + buf.tensor.numel() * buf.tensor.element_size():
                first = (src - buf.data_ptr) // buf.bytes_per_slot
                out += range(first, first + nbytes // buf.bytes_per_slot)
    return out


def wait_sent(handoff: PrefillHandoff) -> list[Req]:
    for _ in range(300):
        done = handoff.poll_sent()
        if done:
            return done
        threading.Event().wait(0.01)
    raise AssertionError("the writes never ended")


def pools() -> tuple[KVPool, ReqToTokenPool]:
    return KVPool(SLOTS, 1, LAYERS, HEADS, HEAD_DIM, torch.float32, "cpu"), ReqToTokenPool(4, 32, "cpu")


def test_a_chunked_prompt_is_written_chunk_by_chunk_then_answered_once() -> None:
    pool, rows = pools()
    handoff, engine, peers = handoff_with(pool, rows)
    req = bound_request(handoff, rows, prompt_len=20)
    handoff.send_chunk(req, 8)
    handoff.send_chunk(req, 16)
    handoff.writer.submit(lambda: None).result()  # the writer has run what was queued
    assert written_slots(engine, pool) == list(range(10, 26))
    assert peers.sent == []  # nothing said before the prompt is done
    req.output_ids = [42]
    assert handoff.start_send(req)
    assert req.state is ReqState.PREFILL_INFLIGHT
    assert wait_sent(handoff) == [req]
    assert written_slots(engine, pool) == list(range(10, 30))  # each token once
    [(endpoint, reply)] = peers.sent
    assert endpoint == "tcp://decode:1" and isinstance(reply, KVDone) and reply.ok and reply.first_token == 42
    stats = handoff.stats()
    assert stats.chunk_writes == 2 and stats.transfers == 1
    assert stats.bytes == 20 * len(pool.layout()) * pool.layout()[0].bytes_per_slot


def test_an_abort_between_chunks_is_answered_after_the_chunks_written() -> None:
    pool, rows = pools()
    handoff, engine, peers = handoff_with(pool, rows)
    req = bound_request(handoff, rows, prompt_len=20)
    engine.gate.clear()
    handoff.send_chunk(req, 8)  # its write waits at the gate
    req.finish_reason = {"type": "abort", "message": "cancelled"}
    assert handoff.start_send(req)  # kept (with its KV) until the write already started ends
    assert handoff.poll_sent() == [] and peers.sent == []
    engine.gate.set()
    assert wait_sent(handoff) == [req]
    [(_, reply)] = peers.sent
    assert isinstance(reply, KVDone) and not reply.ok and reply.message == "cancelled"
    assert written_slots(engine, pool) == list(range(10, 18))  # nothing after the abort


def test_an_abort_before_any_write_is_answered_now() -> None:
    pool, rows = pools()
    handoff, _, peers = handoff_with(pool, rows)
    req = bound_request(handoff, rows, prompt_len=6)
    req.finish_reason = {"type": "abort", "message": "gone"}
    assert not handoff.start_send(req)
    [(_, reply)] = peers.sent
    assert not reply.ok and reply.message == "gone"
