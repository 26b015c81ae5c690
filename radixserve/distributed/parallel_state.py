"""Tensor-parallel group state: which rank this process is, and the collectives layers use.

Each scheduler process is one TP rank. `init_tensor_parallel` joins torch.distributed (NCCL on
GPUs, gloo on CPUs) and keeps a gloo group beside it for broadcasting Python objects (new
requests) from rank 0, so that every rank takes the same scheduling decisions.

With --enable-dp-attention (`init_dp_attention`) the --tp-size processes form one world that the
MoE layers span (`get_world`, `moe_all_reduce`), and the "TP group" of everything else (attention,
embedding, dense MLPs, sampling, request broadcasts: `get_tp_rank`, `tp_*`) is the process's
attention group of tp_size / dp_size ranks. Without it the world is the TP group."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None  # device collectives (all-reduce, all-gather)
    cpu_group: object | None = None  # object broadcasts (gloo)


_STATE = ParallelState()
# the ranks the MoE layers span, when larger than the TP group (--enable-dp-attention)
_WORLD: ParallelState | None = None


def get_world() -> ParallelState:
    """The MoE layers' group: the whole world under DP attention, else the TP group itself."""
    return _WORLD or _STATE


@dataclass(frozen=True)
class MoEParallel:
    """How a MoE model's layers split over the TP group. Experts: over `ep_size` ranks (whole experts
    each), and each expert's intermediate dim over the tp_size / ep_size ranks sharing them. Dense MLP
    layers: split like the rest (dense_tp_size = tp_size) or replicated on every rank (1)."""

    ep_size: int = 1
    dense_tp_size: int | None = None


_MOE = MoEParallel()


def set_moe_parallel(ep_size: int, dense_tp_size: int | None) -> None:
    global _MOE
    if get_world().tp_size % ep_size:
        raise ValueError(f"--ep-size ({ep_size}) must divide --tp-size ({get_world().tp_size})")
    _MOE = MoEParallel(ep_size, dense_tp_size)


def get_moe_parallel() -> MoEParallel:
    return _MOE


def set_parallel_state(tp_rank: int, tp_size: int, group: object | None = None,
                       cpu_group: object | None = None) -> None:
    global _STATE
    _STATE = ParallelState(tp_rank, tp_size, group, cpu_group)


def _join_world(tp_rank: int, tp_size: int, init_method: str, device: torch.device,
                timeout_s: float) -> tuple[str, datetime.timedelta, object]:
    """Join torch.distributed; (backend, timeout, a gloo group over the whole world)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, init_method=init_method, world_size=tp_size, rank=tp_rank,
                                timeout=timeout, **({"device_id": device} if device.type == "cuda" else {}))
    except Exception as e:  # most often: node 0 unreachable, or a node missing, within --dist-timeout
        raise RuntimeError(
            f"rank {tp_rank} could not join the {tp_size} ranks at {init_method} within {timeout_s:.0f}s "
            f"(--dist-timeout): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return backend, timeout, cpu_group


def init_tensor_parallel(tp_rank: int, tp_size: int, init_method: str, device: torch.device,
                         timeout_s: float) -> None:
    _, _, cpu_group = _join_world(tp_rank, tp_size, init_method, device, timeout_s)
    set_parallel_state(tp_rank, tp_size, dist.group.WORLD, cpu_group)


def init_dp_attention(world_rank: int, world_size: int, dp_size: int, init_method: str, device: torch.device,
                      timeout_s: float) -> tuple[int, int]:
    """--enable-dp-attention: join the world of world_size ranks, and make this rank's attention group
    (world_size / dp_size consecutive ranks) the TP group. Returns (dp rank, rank in its group)."""
    global _WORLD
    backend, timeout, world_cpu = _join_world(world_rank, world_size, init_method, device, timeout_s)
    attn_size = world_size // dp_size
    dp_rank, attn_rank = divmod(world_rank, attn_size)
    group = cpu_group = None
    if attn_size > 1:  # every rank creates every group, in one order (new_group is collective)
        for d in range(dp_size):
            ranks = list(range(d * attn_size, (d + 1) * attn_size))
            dev_group = dist.new_group(ranks, timeout=timeout)
            gloo_group = dist.new_group(ranks, backend="gloo", timeout=timeout) if backend != "gloo" else dev_group
            if d == dp_rank:
                group, cpu_group = dev_group, gloo_group
    set_parallel_state(attn_rank, attn_size, group, cpu_group)
    _WORLD = ParallelState(world_rank, world_size, dist.group.WORLD, world_cpu)
    return dp_rank, attn_rank


def setup_fingerprint(args) -> dict:
    """What every node must agree on."""
    return {"model_path": args.model_path, "load_format": args.load_format, "dtype": args.dtype,
            "tp_size": args.tp_size, "ep_size": args.ep_size, "moe_dense_tp_size": args.moe_dense_tp_size,
            "dp_size": args.dp_size, "nnodes": args.nnodes, "enable_dp_attention": args.enable_dp_attention,
            "enable_dp_lm_head": args.enable_dp_lm_head,
            "page_size": args.page_size, "context_length": args.context_length}


def check_same_setup(tp_rank: int, fingerprint: dict) -> None:
    world = get_world()
    gathered: list = [None] * world.tp_size
    dist.all_gather_object(gathered, fingerprint, group=world.cpu_group)
    for rank, other in enumerate(gathered):
        if other != fingerprint:
            diff = {k: (fingerprint.get(k), other.get(k)) for k in fingerprint if fingerprint.get(k) != other.get(k)}
            raise RuntimeError(f"rank {tp_rank} and rank {rank} were started with different settings: {diff}")


def get_tp_rank() -> int:
    return _STATE.tp_rank


def get_tp_size() -> int:
    return _STATE.tp_size


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp_size == 1:
        return x
    dist.all_reduce(x, group=_STATE.group)
    return x


def moe_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks the MoE layers span (the TP group, or the world under DP attention)."""
    world = get_world()
    if world.tp_size > 1:
        dist.all_reduce(x, group=world.group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor, over_world: bool = False) -> torch.Tensor:
    state = get_world() if over_world else _STATE
    if state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.group)
    return torch.cat(parts, dim=-1)


def _first_rank_of(group: object | None) -> int:
    """The global rank of a group's rank 0 (broadcasts name their source globally): 0 for the world,
    another for a DP attention group."""
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def tp_broadcast_tensor(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's values everywhere (sampled tokens: all ranks must append the same ones)."""
    if _STATE.tp_size > 1:
        dist.broadcast(x, src=_first_rank_of(_STATE.group), group=_STATE.group)
    return x


def tp_broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's bytes, on every rank (the others pass None): a length, then the bytes, over gloo."""
    if _STATE.tp_size == 1:
        return data or b""
    src = _first_rank_of(_STATE.cpu_group)
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=src, group=_STATE.cpu_group)
    if _STATE.tp_rank == 0:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if size.item() else torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if buf.numel():
        dist.broadcast(buf, src=src, group=_STATE.cpu_group)
    return buf.numpy().tobytes()


def tp_min_int(value: int) -> int:
    """The smallest value over all ranks (KV capacity must agree)."""
    if _STATE.tp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return int(t.item())


def tp_all_gather_object(obj: object) -> list:
    """Every rank's obj, in rank order (picklable data; start-up only)."""
    if _STATE.tp_size == 1:
        return [obj]
    gathered: list = [None] * _STATE.tp_size
    dist.all_gather_object(gathered, obj, group=_STATE.cpu_group)
    return gathered


def tp_min_ints(values: list[int]) -> list[int]:
    """Each position's smallest value over all ranks (every rank passes as many)."""
    if _STATE.tp_size == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.cpu_group)
    return t.tolist()
