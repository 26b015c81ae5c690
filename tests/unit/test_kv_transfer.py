"""Moving a request's KV between two pools: the copies that do it (slots consecutive on both sides
go as one), and a real write between two processes through Mooncake's TCP transport over loopback
(test_kv_transfer_nixl.py runs the same write through NIXL)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from radixserve.cache.pools import KVPool
from radixserve.disaggregation.kv_runs import BufferSpec, LayoutMismatch, slot_runs, transfer_copies
from radixserve.disaggregation.transfer import FakeEngine, TransferError, create_engine

LAYERS, HEADS, DIM = 3, 2, 8


def test_slot_runs_merge_what_is_consecutive_on_both_sides() -> None:
    assert slot_runs([3, 4, 5, 9], [10, 11, 12, 2]) == [(3, 10, 3), (9, 2, 1)]
    assert slot_runs([1, 2, 3], [5, 7, 8]) == [(1, 5, 1), (2, 7, 2)]
    assert slot_runs([], []) == []
    with pytest.raises(ValueError):
        slot_runs([1, 2], [1])


def test_copies_address_every_buffer_by_bytes() -> None:
    src = [BufferSpec(1000, 16, 10), BufferSpec(5000, 16, 10)]
    dst = [BufferSpec(90000, 16, 20), BufferSpec(70000, 16, 20)]
    assert transfer_copies(src, [2, 3], dst, [7, 8]) == [(1032, 90112, 32), (5032, 70112, 32)]
    with pytest.raises(LayoutMismatch):
        transfer_copies(src, [2], [BufferSpec(0, 8, 10)] * 2, [2])
    with pytest.raises(LayoutMismatch):
        transfer_copies(src, [2], dst[:1], [2])
    with pytest.raises(ValueError, match="outside"):
        transfer_copies(src, [9, 10], dst, [1, 2])


def test_copies_between_tp_sizes_move_the_heads_both_sides_hold() -> None:
    """3 KV heads of 4 bytes: a TP-2 rank holding heads 2..3 writes into a TP-1 peer holding all
    three (a part of each slot, one slot at a time); a rank with nothing in common writes nothing;
    a replicated head is written only by the rank told to (heads=)."""
    rank1 = [BufferSpec(1000, 4, 10, head_start=2, num_heads=1)]
    whole = [BufferSpec(9000, 12, 10, head_start=0, num_heads=3)]
    assert transfer_copies(rank1, [1, 2], whole, [5, 6]) == [(1004, 9068, 4), (1008, 9080, 4)]
    assert transfer_copies(whole, [5, 6], rank1, [1, 2]) == [(9068, 1004, 4), (9080, 1008, 4)]
    rank0 = [BufferSpec(500, 8, 10, head_start=0, num_heads=2)]
    assert transfer_copies(rank1, [1], rank0, [1]) == []
    assert transfer_copies(whole, [5], rank0, [1], heads=(1, 3)) == [(9064, 512, 4)]
    with pytest.raises(LayoutMismatch, match="a KV head"):
        transfer_copies(rank1, [1], [BufferSpec(0, 12, 10, 0, 2)], [1])


def test_fake_engine_moves_nothing_and_unknown_backends_are_named() -> None:
    engine = create_engine("fake", "127.0.0.1")
    assert isinstance(engine, FakeEngine)
    engine.write("anyone:1", [(1, 2, 3)])  # nothing is touched
    with pytest.raises(TransferError, match="unknown transfer backend"):
        create_engine("carrier-pigeon", "127.0.0.1")


def _pool() -> KVPool:
    return KVPool(32, 1, LAYERS, HEADS, DIM, torch.float16, "cpu")


def _receiver(conn, backend: str) -> None:
    pool = _pool()
    engine = create_engine(backend, "127.0.0.1", device=pool.device)
    layout = pool.layout()
    engine.register([(b.data_ptr, BufferSpec.of(b).nbytes) for b in layout])
    conn.send((engine.session_id, [BufferSpec.of(b) for b in layout]))
    slots = conn.recv()  # the write is done: report what landed
    conn.send([b.tensor[slots].numpy() for b in layout] + [sum(float(b.tensor.float().abs().sum()) for b in layout)])
    conn.recv()
    engine.close()


def _sender(conn, backend: str, peer: str, specs: list[BufferSpec], src_slots: list[int], dst_slots: list[int]
            ) -> None:
    pool = _pool()
    gen = torch.Generator().manual_seed(7)
    for b in pool.layout():
        b.tensor.copy_(torch.randn(b.tensor.shape, generator=gen).to(b.tensor.dtype))
    engine = create_engine(backend, "127.0.0.1", device=pool.device)
    layout = pool.layout()
    engine.register([(b.data_ptr, BufferSpec.of(b).nbytes) for b in layout])
    copies = transfer_copies([BufferSpec.of(b) for b in layout], src_slots, specs, dst_slots)
    engine.write(peer, copies)
    try:  # a copy past the peer's registered memory fails loudly
        engine.write(peer, [(layout[0].data_ptr, specs[0].data_ptr + specs[0].nbytes * 1000, 64)])
        refused = False
    except TransferError:
        refused = True
    conn.send(([b.tensor[src_slots].numpy() for b in layout], len(copies), refused))
    engine.close()


def write_between_processes(backend: str) -> None:
    """A request's slots written from one process's pool into another's through `backend`: they land
    byte for byte, nothing else is written, and a copy outside the peer's memory is refused."""
    ctx = mp.get_context("spawn")
    recv_parent, recv_child = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(recv_child, backend), daemon=True)
    receiver.start()
    try:
        assert recv_parent.poll(120), "the receiving engine did not start"
        peer, specs = recv_parent.recv()
        src_slots, dst_slots = [3, 4, 5, 9, 17], [10, 11, 12, 2, 30]
        send_parent, send_child = ctx.Pipe()
        sender = ctx.Process(target=_sender, args=(send_child, backend, peer, specs, src_slots, dst_slots),
                             daemon=True)
        sender.start()
        assert send_parent.poll(120), "the sending engine did not finish"
        sent, num_copies, refused = send_parent.recv()
        sender.join(30)
        assert sender.exitcode == 0  # the engine's libraries unload cleanly too
        assert num_copies == 3 * 2 * LAYERS  # three runs, every K and V buffer
        assert refused
        recv_parent.send(dst_slots)
        *landed, total = recv_parent.recv()
        for got, want in zip(landed, sent):
            assert (got == want).all()
        # nothing but those slots was written
        assert total == pytest.approx(sum(float(abs(t.astype("float32")).sum()) for t in sent), rel=1e-3)
        recv_parent.send("stop")
        receiver.join(30)
        assert receiver.exitcode == 0
    finally:
        for p in mp.active_children():
            p.kill()


def test_mooncake_writes_a_requests_slots_into_another_process_pool() -> None:
    os.environ["MC_FORCE_TCP"] = "1"  # loopback TCP, inherited by the spawned processes
    write_between_processes("mooncake")
