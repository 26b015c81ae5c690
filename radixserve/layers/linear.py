"""Linear layers split for tensor parallelism: column-parallel (output split) and row-parallel (input split).

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies this rank's slice of a
checkpoint tensor into place, so models load the same Hugging Face names at any TP size.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.parallel_state import get_tp_rank, get_tp_size, get_world, tp_all_reduce
from radixserve.layers.gemv import linear
from radixserve.layers.quantization.fp8_linear import (
    fp8_linear,
    fp8_weight_params,
    get_fp8_config,
    to_scale_units,
)


def _make_weight(layer: nn.Module, out_features: int, in_features: int) -> None:
    """The layer's weight: FP8 with block scales when the checkpoint is FP8; else in the model dtype,
    marked for quantization after loading under --quantization fp8 (fp8_pending)."""
    config = get_fp8_config()
    layer.fp8_block = None
    layer.fp8_pending = None
    if config is not None and config.from_checkpoint:
        fp8_weight_params(layer, out_features, in_features, config)
        layer.weight_scale_inv.weight_loader = layer.weight_loader
    else:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        layer.fp8_pending = config
    layer.weight.weight_loader = layer.weight_loader


def copy_slice(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, dim: int, dst: int, src: int,
               size: int) -> None:
    """param[dst : dst + size] = loaded[src : src + size] along dim, in weight rows (or columns); for
    the FP8 block scales the same slice in block units."""
    if param is getattr(layer, "weight_scale_inv", None):
        block = layer.fp8_block[dim]
        what = type(layer).__name__
        src, n = to_scale_units(src, size, loaded.shape[dim], block, what)
        dst, _ = to_scale_units(dst, size, param.shape[dim], block, what)
        size = n
    param.data.narrow(dim, dst, size).copy_(loaded.narrow(dim, src, size))


def shard_of(replicated: bool, over_world: bool = False) -> tuple[int, int]:
    """(rank, ranks) a layer splits over: none (replicated), the MoE world (a MoE layer's shared
    expert: the world under DP attention, else the TP group), or the TP group."""
    if replicated:
        return 0, 1
    if over_world:
        world = get_world()
        return world.tp_rank, world.tp_size
    return get_tp_rank(), get_tp_size()


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor parallel size ({d})")
    return n // d


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's rows (outputs) split across ranks; output stays split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 out_per_rank: int | None = None, replicated: bool = False, over_world: bool = False) -> None:
        super().__init__()
        # replicated: every rank holds the whole layer (e.g. --moe-dense-tp-size 1)
        self.tp_rank, self.tp_size = shard_of(replicated, over_world)
        self.out_per_rank = out_per_rank or _divide(out_features, self.tp_size, "output size")
        _make_weight(self, self.out_per_rank, in_features)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param is self.bias:
            n = param.shape[0]
            param.data.copy_(loaded.narrow(0, self.tp_rank * n, n))
            return
        n = self.out_per_rank
        copy_slice(self, param, loaded, 0, 0, self.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_block is not None:
            return fp8_linear(x, self, self.bias)
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (e.g. gate_proj + up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 replicated: bool = False, over_world: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias, replicated=replicated, over_world=over_world)
        self.part_sizes = [_divide(s, self.tp_size, "output size") for s in out_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        size = self.part_sizes[shard_id]
        offset = sum(self.part_sizes[:shard_id])
        copy_slice(self, param, loaded, 0, offset, self.tp_rank * size, size)


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first, count) of the KV heads a rank holds when there are at least as many heads as ranks:
    as even as possible, so e.g. 3 KV heads over 2 ranks give 2 + 1."""
    base, extra = divmod(num_kv_heads, tp_size)
    return tp_rank * base + min(tp_rank, extra), base + (1 if tp_rank < extra else 0)


def kv_heads_of_rank(num_kv_heads: int, num_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first, count) of the KV heads a rank holds (and writes into its KV pool): a share of them,
    or, with fewer KV heads than ranks, one head replicated on tp_size / num_kv_heads ranks."""
    if num_kv_heads >= tp_size:
        return kv_head_range(num_kv_heads, tp_size, tp_rank)
    if tp_size % num_kv_heads or num_heads % tp_size:  # each KV head replicated on whole ranks
        raise ValueError(
            f"--tp-size {tp_size} is larger than the model's {num_kv_heads} KV heads, so it must be a "
            f"multiple of them and divide its {num_heads} attention heads"
        )
    return tp_rank // (tp_size // num_kv_heads), 1


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one matmul. Each rank holds whole GQA groups (a KV head with its q
    heads), split as evenly as possible, so head counts need not divide by the TP size. With fewer
    KV heads than ranks, KV heads are replicated and the q heads split evenly."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        if num_heads % num_kv_heads:
            raise ValueError(f"attention heads ({num_heads}) are not a multiple of KV heads ({num_kv_heads})")
        group = num_heads // num_kv_heads
        kv_start, kv_count = kv_heads_of_rank(num_kv_heads, num_heads, tp, rank)
        if num_kv_heads >= tp:
            self.q_head_start, self.num_heads = kv_start * group, kv_count * group
        else:
            self.num_heads = num_heads // tp
            self.q_head_start = rank * self.num_heads
        self.kv_head_start, self.num_kv_heads = kv_start, kv_count
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden, 0, bias, out_per_rank=self.q_size + 2 * self.kv_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        d = self.head_dim
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.q_head_start * d
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, self.kv_head_start * d
        copy_slice(self, param, loaded, 0, offset, start, size)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (inputs) split; partial sums are all-reduced across ranks, unless
    reduce_results is False (the caller adds more partial sums first and reduces once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 in_range: tuple[int, int] | None = None, replicated: bool = False,
                 reduce_results: bool = True, over_world: bool = False) -> None:
        super().__init__()
        if over_world and reduce_results:
            raise ValueError("a layer split over the MoE world leaves its reduction to the MoE layer")
        self.tp_rank, self.tp_size = shard_of(replicated, over_world)
        self.reduce_results = reduce_results and self.tp_size > 1
        if in_range is None:  # an even split
            per_rank = _divide(in_features, self.tp_size, "input size")
            in_range = (self.tp_rank * per_rank, per_rank)
        self.in_start, self.in_per_rank = in_range
        _make_weight(self, out_features, self.in_per_rank)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self._bias_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        copy_slice(self, param, loaded, 1, 0, self.in_start, self.in_per_rank)

    @staticmethod
    def _bias_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self) if self.fp8_block is not None else linear(x, self.weight)
        if self.reduce_results:
            y = tp_all_reduce(y)
        elif self.tp_rank != 0:  # the caller's later sum over ranks must count the bias once
            return y
        return y if self.bias is None else y + self.bias
