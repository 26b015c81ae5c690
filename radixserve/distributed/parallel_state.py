"""Tensor-parallel group state. Single-rank for now; layers already ask it for rank and size."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None


_STATE = ParallelState()


def set_parallel_state(tp_rank: int, tp_size: int, group: object | None = None) -> None:
    global _STATE
    _STATE = ParallelState(tp_rank, tp_size, group)


def get_tp_rank() -> int:
    return _STATE.tp_rank


def get_tp_size() -> int:
    return _STATE.tp_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp_size == 1:
        return x
    torch.distributed.all_reduce(x, group=_STATE.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.tp_size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)
