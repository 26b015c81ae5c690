"""The nixl transfer backend (NIXL over UCX, CPU memory): a request's slots written between two
processes' pools as the Mooncake test does, the self-describing session id, and its errors."""

from __future__ import annotations

import pytest
import torch

from radixserve.disaggregation import transfer_nixl
from radixserve.disaggregation.kv_runs import BufferSpec, transfer_copies
from radixserve.disaggregation.transfer import TransferError, create_engine
from radixserve.disaggregation.transfer_nixl import NixlEngine, parse_session
from tests.unit.test_kv_transfer import _pool, write_between_processes


def test_nixl_writes_a_requests_slots_into_another_process_pool() -> None:
    write_between_processes("nixl")


def test_nixl_session_id_carries_the_agent_metadata_and_peers_load_once() -> None:
    src, dst = _pool(), _pool()
    for b in src.layout():
        b.tensor.copy_(torch.randn(b.tensor.shape, generator=torch.Generator().manual_seed(3)).half())
    sender, receiver = create_engine("nixl", "127.0.0.1"), create_engine("nixl", "127.0.0.1", device="cpu")
    assert isinstance(sender, NixlEngine) and sender.name != receiver.name
    try:
        for engine, pool in ((sender, src), (receiver, dst)):
            engine.register([(b.data_ptr, BufferSpec.of(b).nbytes) for b in pool.layout()])
        mem_type, devid, metadata = parse_session(receiver.session_id)
        assert (mem_type, devid) == ("DRAM", 0) and receiver.name.encode() in metadata
        assert len(receiver.session_id) < 2048  # the metadata of 2 * LAYERS regions, compressed
        src_specs = [BufferSpec.of(b) for b in src.layout()]
        dst_specs = [BufferSpec.of(b) for b in dst.layout()]
        for src_slots, dst_slots in (([1, 2], [20, 21]), ([7], [5])):  # the second reuses the loaded peer
            sender.write(receiver.session_id, transfer_copies(src_specs, src_slots, dst_specs, dst_slots))
            for s, d in zip(src.layout(), dst.layout()):
                assert torch.equal(s.tensor[src_slots], d.tensor[dst_slots])
        assert len(sender._peers) == 1
        written = torch.zeros(dst.layout()[0].tensor.shape[0], dtype=torch.bool)
        written[[20, 21, 5]] = True
        assert all(not b.tensor[~written].any() for b in dst.layout())
        with pytest.raises(TransferError, match="not a NIXL session id"):
            sender.write("127.0.0.1:12345", [(src_specs[0].data_ptr, dst_specs[0].data_ptr, 8)])
    finally:
        sender.close()
        receiver.close()


def test_missing_nixl_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer_nixl, "MODULES", ("radixserve_no_nixl._api",))
    with pytest.raises(TransferError, match="pip install nixl-cu13"):
        create_engine("nixl", "127.0.0.1")
