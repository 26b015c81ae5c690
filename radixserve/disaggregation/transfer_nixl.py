"""The nixl transfer backend: NVIDIA's NIXL over its UCX backend.

NIXL writes into a peer's memory only once it has loaded the peer agent's metadata (its UCX address
and the keys of its registered memory). Peers here name each other by session id alone, so the
session id carries that metadata: "nixl:<memory type>:<device>:<base64 of the zlib'd metadata>",
made after the KV pool is registered. A writer loads each distinct peer's metadata once.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import os
import threading
import time
import uuid
import zlib
from types import ModuleType
from typing import Any

import numpy as np
import torch

from radixserve.disaggregation.transfer import TransferError

PREFIX = "nixl:"
# NIXL's UCX progress thread sleeps in poll() on its workers' events with this timeout; nixl_agent
# passes 0, which spins a core per agent (70% of one here while idle, starving a CPU server)
PROGRESS_POLL_US = 10_000
_SWAP_LOCK = threading.Lock()
# the meta package `nixl` (which picks its CUDA's wheel), else a wheel installed alone
MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")
WRITE_TIMEOUT_S = 60.0


def import_nixl() -> ModuleType:
    """NIXL's Python API."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs each agent and backend at INFO, to stdout
    # UCX's EFA module links the system's libefa, whose libibverbs loads the system's libnl next to the
    # wheel's own copy: the two crash the process at exit (SIGSEGV in rtnl_tc_unregister) wherever
    # ibverbs-providers is installed. Read by UCX when NIXL loads it; set UCX_MODULES to override.
    os.environ.setdefault("UCX_MODULES", "^efa")
    errors = []
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:  # the meta package also raises this when its CUDA's wheel is missing
            errors.append(f"{name}: {e}")
    raise TransferError("--disaggregation-transfer-backend nixl needs NIXL: pip install nixl-cu13 "
                        f"(or nixl) ({'; '.join(errors)})")


def make_agent(api: ModuleType, name: str) -> Any:
    """A nixl_agent with the UCX backend whose progress thread waits for events instead of spinning.
    nixl_agent_config has no setting for it, so the binding's config class is swapped for one that
    raises the timeout while the agent is made (under a lock: the swap is visible process-wide)."""
    config = api.nixl_agent_config(backends=["UCX"])
    bindings = getattr(api, "nixlBind", None)
    if bindings is None or not hasattr(bindings, "nixlAgentConfig"):
        return api.nixl_agent(name, config)  # another NIXL layout: its default thread

    class PatientConfig(bindings.nixlAgentConfig):
        def __setattr__(self, key: str, value: Any) -> None:
            super().__setattr__(key, max(value, PROGRESS_POLL_US) if key == "pthrDelay" else value)

    with _SWAP_LOCK:
        original, bindings.nixlAgentConfig = bindings.nixlAgentConfig, PatientConfig
        try:
            return api.nixl_agent(name, config)
        finally:
            bindings.nixlAgentConfig = original


def memory_of(device: torch.device | str | None) -> tuple[str, int]:
    """NIXL's (memory type, device id) for memory on `device`."""
    device = torch.device(device or "cpu")
    if device.type == "cpu":
        return "DRAM", 0
    if device.type == "cuda":
        return "VRAM", device.index if device.index is not None else torch.cuda.current_device()
    raise TransferError(f"--disaggregation-transfer-backend nixl cannot move memory on {device}")


def parse_session(session: str) -> tuple[str, int, bytes]:
    """(memory type, device id, agent metadata) of a NixlEngine's session id."""
    try:
        prefix, mem_type, devid, blob = session.split(":", 3)
        if prefix + ":" != PREFIX or mem_type not in ("DRAM", "VRAM"):
            raise ValueError
        return mem_type, int(devid), zlib.decompress(base64.b64decode(blob, validate=True))
    except (ValueError, binascii.Error, zlib.error):
        raise TransferError(f"not a NIXL session id: {session[:40]!r}") from None


class NixlEngine:
    def __init__(self, hostname: str, device: torch.device | str | None = None,
                 timeout_s: float = WRITE_TIMEOUT_S) -> None:
        api = import_nixl()
        self._mem_type, self._devid = memory_of(device)
        # unique per process and rank: a peer caches agents by name
        self.name = f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        try:
            self._agent: Any = make_agent(api, self.name)
        except Exception as e:  # NIXL raises its own exception types (and RuntimeError)
            raise TransferError(f"NIXL failed to start agent {self.name}: {e}") from None
        if "UCX" not in self._agent.backends:
            raise TransferError("NIXL has no UCX backend plugin (its wheel ships one: reinstall nixl-cu13)")
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # the agent is made without NIXL's own thread sync
        self._registered: list[Any] = []
        self._peers: dict[str, str] = {}  # session id -> the remote agent's name, once loaded
        self.session_id = self._describe()

    def _describe(self) -> str:
        metadata = self._agent.get_agent_metadata()
        blob = base64.b64encode(zlib.compress(metadata, 9)).decode()
        return f"{PREFIX}{self._mem_type}:{self._devid}:{blob}"

    def register(self, regions: list[tuple[int, int]]) -> None:
        with self._lock:
            try:
                descs = self._agent.register_memory([(addr, nbytes, self._devid, "") for addr, nbytes in regions],
                                                    self._mem_type, backends=["UCX"])
            except Exception as e:
                raise TransferError(f"NIXL could not register {len(regions)} regions of {self._mem_type}: {e}"
                                    ) from None
            self._registered.append(descs)
            self.session_id = self._describe()  # peers need the new regions' keys

    def _peer(self, session: str) -> tuple[str, str, int]:
        """(remote agent name, its memory type, its device id), loading its metadata on first use."""
        mem_type, devid, metadata = parse_session(session)
        name = self._peers.get(session)
        if name is None:
            try:
                loaded = self._agent.add_remote_agent(metadata)
            except Exception as e:
                raise TransferError(f"NIXL could not load a peer's metadata: {e}") from None
            name = loaded.decode() if isinstance(loaded, bytes) else loaded
            self._peers[session] = name
        return name, mem_type, devid

    def _forget(self, session: str) -> None:
        """Drop a peer after a failed write: a later write reloads it (or fails again) afresh."""
        name = self._peers.pop(session, None)
        if name is not None:
            try:
                self._agent.remove_remote_agent(name)
            except Exception:
                pass  # already disconnected

    def write(self, peer: str, copies: list[tuple[int, int, int]]) -> None:
        if not copies:
            return
        with self._lock:
            name, peer_mem, peer_dev = self._peer(peer)
            rows = np.asarray(copies, dtype=np.uint64)
            local = np.stack([rows[:, 0], rows[:, 2], np.full(len(rows), self._devid, np.uint64)], axis=1)
            remote = np.stack([rows[:, 1], rows[:, 2], np.full(len(rows), peer_dev, np.uint64)], axis=1)
            try:
                self._transfer(name, self._agent.get_xfer_descs(local, self._mem_type),
                               self._agent.get_xfer_descs(remote, peer_mem), len(copies))
            except TransferError:
                self._forget(peer)
                raise

    def _transfer(self, name: str, local: Any, remote: Any, count: int) -> None:
        """One WRITE of every descriptor (NIXL takes 100,000 in one request), polled until it ends."""
        try:
            handle = self._agent.initialize_xfer("WRITE", local, remote, name)
        except Exception as e:  # a copy outside the peer's registered memory fails here
            raise TransferError(f"KV write to NIXL agent {name!r} refused: {e}") from None
        deadline = time.monotonic() + self._timeout_s
        try:
            state = self._agent.transfer(handle)
            pause = 0.0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"KV write of {count} copies to NIXL agent {name!r} "
                                        f"timed out after {self._timeout_s:.0f} s")
                time.sleep(pause)  # yield at first (small writes end in microseconds), then back off
                pause = min(pause * 2 or 1e-5, 1e-3)
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"KV write of {count} copies to NIXL agent {name!r} failed")
        except TransferError:
            raise
        except Exception as e:  # a peer that went away raises (NIXL_ERR_REMOTE_DISCONNECT)
            raise TransferError(f"KV write to NIXL agent {name!r} failed: {e}") from None
        finally:
            try:
                self._agent.release_xfer_handle(handle)  # cancels a write still in flight
            except Exception:
                pass  # NIXL keeps a handle it cannot cancel and releases it with the agent

    def close(self) -> None:
        with self._lock:
            for session in list(self._peers):
                self._forget(session)
            for descs in self._registered:
                try:
                    self._agent.deregister_memory(descs, backends=["UCX"])
                except Exception:
                    pass  # closing: nothing left to do about it
            self._registered.clear()
