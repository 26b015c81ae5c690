"""Host <-> device copies that never make the host wait for the device.

A plain `cpu_tensor.to("cuda")` from pageable memory blocks the host until the copy (and so every
kernel queued before it) has run. The scheduler builds batch N+1 while the GPU runs batch N, so its
copies go through pinned memory with non_blocking=True instead; the caching host allocator keeps a
pinned buffer alive until the copy that reads it has finished.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device`, asynchronously when that is a GPU."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload_int64(parts: list[list[int] | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several int64 vectors (lists or CPU tensors) in one host-to-device copy; a device view of each."""
    if device.type == "cuda" and all(isinstance(p, list) for p in parts):
        # straight into pinned memory: no concatenation, no second host copy
        flat = torch.tensor([x for p in parts for x in p], dtype=torch.int64, pin_memory=True)
        return list(flat.to(device, non_blocking=True).split([len(p) for p in parts]))
    host = [p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.int64) for p in parts]
    flat = torch.cat([h.reshape(-1).to(torch.int64) for h in host]) if host else torch.empty(0, dtype=torch.int64)
    return list(to_device(flat, device).split([h.numel() for h in host]))


def start_host_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Begin copying a device tensor to (pinned) host memory; read it only after the batch's event."""
    if tensor is None or tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
