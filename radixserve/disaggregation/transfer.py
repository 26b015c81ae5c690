"""KV transfer engines behind one interface (--disaggregation-transfer-backend): each registers
memory once and writes (source address, peer address, bytes) copies into a peer's registered
memory, named by the peer's session id.

- mooncake: Mooncake's TransferEngine (package `mooncake-transfer-engine`, `-non-cuda` on CPU
  machines); RDMA over the devices of --disaggregation-ib-device, TCP without them. With
  Mooncake's own MC_INTRANODE_NVLINK set (and MC_FORCE_TCP not), it is started on its rdma
  protocol with no devices, which moves GPU memory between processes of one node by CUDA IPC.
- nixl: NVIDIA's NIXL (package `nixl-cu13`, or `nixl`) over its UCX backend, on CPU or CUDA memory
  (transfer_nixl.py).
- fake: moves nothing (warm-up and /health_generate on PD servers, as SGLang does).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("radixserve.disaggregation")

# copies per batch call: Mooncake's TCP transport refuses batches past its per-peer queue (4,096 by
# default), and a refused batch may still land parts of itself later
MAX_COPIES_PER_BATCH = 1024


class TransferError(RuntimeError):
    pass


class TransferEngine(Protocol):
    session_id: str  # what a peer names this engine by

    def register(self, regions: list[tuple[int, int]]) -> None:
        """Make (address, bytes) regions writable by peers and readable for our writes."""

    def write(self, peer: str, copies: list[tuple[int, int, int]]) -> None:
        """Copy (our address, peer address, bytes) into the peer's registered memory; raises
        TransferError when any copy fails (the destination is then in an unknown state)."""

    def close(self) -> None: ...


class MooncakeEngine:
    def __init__(self, hostname: str, ib_devices: str | None = None) -> None:
        try:
            from mooncake.engine import TransferEngine as Engine
        except ImportError as e:
            raise TransferError(
                "--disaggregation-transfer-backend mooncake needs Mooncake: pip install "
                "mooncake-transfer-engine (mooncake-transfer-engine-non-cuda without CUDA), and the "
                f"system libraries libibverbs1 and ibverbs-providers ({e})") from None
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # Mooncake logs each connection at INFO
        self._engine = Engine()
        intra_node = bool(os.environ.get("MC_INTRANODE_NVLINK")) and "MC_FORCE_TCP" not in os.environ
        protocol = "rdma" if ib_devices or intra_node else "tcp"
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, ib_devices or "")
        if rc != 0:
            raise TransferError(f"Mooncake failed to start ({protocol} on {hostname}, rc {rc})")
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []

    def register(self, regions: list[tuple[int, int]]) -> None:
        for addr, nbytes in regions:
            rc = self._engine.register_memory(addr, nbytes)
            if rc != 0:
                raise TransferError(f"Mooncake could not register {nbytes} bytes at {addr:#x} (rc {rc})")
            self._registered.append(addr)

    def write(self, peer: str, copies: list[tuple[int, int, int]]) -> None:
        for start in range(0, len(copies), MAX_COPIES_PER_BATCH):
            part = copies[start : start + MAX_COPIES_PER_BATCH]
            rc = self._engine.batch_transfer_sync_write(
                peer, [c[0] for c in part], [c[1] for c in part], [c[2] for c in part])
            if rc != 0:
                raise TransferError(f"KV write to {peer} failed (Mooncake rc {rc})")

    def close(self) -> None:
        for addr in self._registered:
            self._engine.unregister_memory(addr)
        self._registered.clear()


class FakeEngine:
    """Moves nothing: the peer's memory is left as it is."""

    session_id = "fake"

    def register(self, regions: list[tuple[int, int]]) -> None:
        pass

    def write(self, peer: str, copies: list[tuple[int, int, int]]) -> None:
        pass

    def close(self) -> None:
        pass


def create_engine(backend: str, hostname: str, ib_devices: str | None = None,
                  device: torch.device | str | None = None) -> TransferEngine:
    """The engine of `backend`; `device` is where the KV pool it registers lives (CPU when None)."""
    if backend == "mooncake":
        return MooncakeEngine(hostname, ib_devices)
    if backend == "fake":
        return FakeEngine()
    if backend == "nixl":
        from radixserve.disaggregation.transfer_nixl import NixlEngine  # imports NIXL only when chosen

        return NixlEngine(hostname, device)
    raise TransferError(f"unknown transfer backend {backend!r} (mooncake, nixl or fake)")
