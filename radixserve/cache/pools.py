"""Memory pools: request rows -> KV slots, and the per-layer K/V buffers themselves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, per_tensor_quantize

try:  # the Triton store serves CUDA tensors; CPU keeps the indexed write
    from radixserve.layers import fused
except ImportError:  # triton missing
    fused = None


class ReqToTokenPool:
    """(request row, position) -> KV slot. Row 0 is a reserved dummy (padding); usable rows 1..size."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str):
        if size < 1 or max_context_len < 1:
            raise ValueError(
                f"ReqToTokenPool needs size >= 1 and max_context_len >= 1, got {size}, {max_context_len}"
            )
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int64, device=self.device)
        self.clear()

    def alloc(self) -> int | None:
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        if not 1 <= row <= self.size:
            raise ValueError(f"request row {row} is outside 1..{self.size}")
        if self._is_free[row]:
            raise ValueError(f"request row {row} freed twice")
        self._is_free[row] = True
        self._free_rows.append(row)

    def available_size(self) -> int:
        return len(self._free_rows)

    def clear(self) -> None:
        # Stack with row 1 on top so the first requests get the low rows.
        self._free_rows: list[int] = list(range(self.size, 0, -1))
        self._is_free: list[bool] = [False] + [True] * self.size


@dataclass(frozen=True)
class KVBuffer:
    """One buffer of one layer: slot s is row s of `tensor`, `bytes_per_slot` bytes from
    `data_ptr + s * bytes_per_slot`. (An MLA pool has one "latent" buffer per layer.)"""

    layer: int
    kind: str  # "k", "v", or "latent" (MLA)
    tensor: torch.Tensor

    @property
    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    @property
    def bytes_per_slot(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    def span(self, first_slot: int, num_slots: int) -> tuple[int, int]:
        """(byte offset, byte length) of consecutive slots, e.g. a page."""
        return first_slot * self.bytes_per_slot, num_slots * self.bytes_per_slot


KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def resolve_kv_dtype(name: str, model_dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """--kv-cache-dtype -> the pool's element type: auto keeps the model dtype."""
    if name == "auto":
        return model_dtype
    if name != "fp8_e4m3":
        raise ValueError(f"--kv-cache-dtype {name}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        # Triton has no e4m3fn (fp8e4nv) conversions before Ada/Hopper, so the kernels would not compile
        raise ValueError("--kv-cache-dtype fp8_e4m3: needs a GPU of compute capability 8.9 or newer "
                         "(Ada, Hopper); this one is older")
    return FP8_DTYPE


class KVPool:
    """Per-layer K and V buffers [num_slots + page_size, num_kv_heads, head_dim].

    Slots 0..page_size-1 are the dummy page: padded positions write there, so real slots are never
    clobbered. The allocator hands out slots page_size..num_slots+page_size-1 at most.

    With dtype float8_e4m3fn (--kv-cache-dtype fp8_e4m3) each layer has a k_scale and a v_scale
    (1.0 unless given, e.g. from a checkpoint's calibrated scales): writes store clamp(x / scale)
    as e4m3, readers multiply back by the scale (`kv_scales`).
    """

    is_mla = False

    def __init__(
        self,
        num_slots: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_scales: Sequence[tuple[float, float]] | None = None,
    ):
        self.size = num_slots
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_fp8 = dtype == FP8_DTYPE
        self.k_scales, self.v_scales = self._check_scales(kv_scales)
        shape = (num_slots + page_size, num_kv_heads, head_dim)
        self.k_buffers: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v_buffers: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]

    def _check_scales(self, kv_scales: Sequence[tuple[float, float]] | None) -> tuple[list[float], list[float]]:
        if kv_scales is None:
            return [1.0] * self.num_layers, [1.0] * self.num_layers
        if not self.is_fp8:
            raise ValueError(f"KV scales are for an fp8 KV cache; this one stores {self.dtype}")
        if len(kv_scales) != self.num_layers:
            raise ValueError(f"{len(kv_scales)} (k_scale, v_scale) pairs for {self.num_layers} layers")
        k_scales = [float(k) for k, _ in kv_scales]
        v_scales = [float(v) for _, v in kv_scales]
        bad = [s for s in k_scales + v_scales if not (0.0 < s < float("inf"))]
        if bad:
            raise ValueError(f"KV scales must be positive and finite, got {bad[0]}")
        return k_scales, v_scales

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def kv_scales(self, layer_id: int) -> tuple[float, float]:
        """(k_scale, v_scale) of a layer: a stored value times its scale is the real one (1.0 unless fp8)."""
        return self.k_scales[layer_id], self.v_scales[layer_id]

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, kv_heads, head_dim] (a flat [n, kv_heads*head_dim] is accepted too) at slots [n]."""
        shape = (-1, self.num_kv_heads, self.head_dim)
        k, v = k.reshape(shape), v.reshape(shape)
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        k_scale, v_scale = self.k_scales[layer_id], self.v_scales[layer_id]
        if (k.is_cuda and fused is not None and not torch.compiler.is_compiling()
                and fused.rows_are_contiguous(k) and fused.rows_are_contiguous(v)):
            # one launch, whole rows (index_put goes by element); quantises when the buffers are fp8
            fused.store_kv(k, v, k_buf, v_buf, slots, k_scale, v_scale)
            return
        if self.is_fp8:
            k_buf[slots] = per_tensor_quantize(k, k_scale)
            v_buf[slots] = per_tensor_quantize(v, v_scale)
            return
        k_buf[slots] = k.to(self.dtype)
        v_buf[slots] = v.to(self.dtype)

    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def bytes_per_page(self) -> int:
        return self.bytes_per_token() * self.page_size

    def layout(self) -> list[KVBuffer]:
        """Every buffer of every layer, for whoever addresses the pool by bytes (a transfer engine
        registers each once, then moves a request's pages as (buffer, offset, length))."""
        return [KVBuffer(layer, kind, bufs[layer])
                for layer in range(self.num_layers)
                for kind, bufs in (("k", self.k_buffers), ("v", self.v_buffers))]

    @staticmethod
    def bytes_per_token_for(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        # K and V, every layer (fp8: 1 byte an element; the per-layer scales are Python floats).
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


class MLAKVPool:
    """DeepSeek's latent KV cache: per layer one buffer [num_slots + page_size, 1, D], D =
    kv_lora_rank + qk_rope_head_dim (the RMS-normed compressed kv, then the rotated k_pe), which every
    attention head reads. Under TP every rank holds the whole latent.

    Slots 0..page_size-1 are the dummy page, as in KVPool. With dtype float8_e4m3fn each layer has one
    latent scale (1.0 unless given): writes store clamp(x / scale) as e4m3, readers multiply back.
    """

    is_mla = True
    num_kv_heads = 1

    def __init__(
        self,
        num_slots: int,
        page_size: int,
        num_layers: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        latent_scales: Sequence[float] | None = None,
    ):
        self.size = num_slots
        self.page_size = page_size
        self.num_layers = num_layers
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.head_dim = kv_lora_rank + qk_rope_head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_fp8 = dtype == FP8_DTYPE
        self.latent_scales = self._check_scales(latent_scales)
        shape = (num_slots + page_size, 1, self.head_dim)
        self.latent_buffers: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]

    def _check_scales(self, scales: Sequence[float] | None) -> list[float]:
        if scales is None:
            return [1.0] * self.num_layers
        if not self.is_fp8:
            raise ValueError(f"latent scales are for an fp8 KV cache; this one stores {self.dtype}")
        if len(scales) != self.num_layers:
            raise ValueError(f"{len(scales)} latent scales for {self.num_layers} layers")
        out = [float(s) for s in scales]
        bad = [s for s in out if not (0.0 < s < float("inf"))]
        if bad:
            raise ValueError(f"latent scales must be positive and finite, got {bad[0]}")
        return out

    def get_latent_buffer(self, layer_id: int) -> torch.Tensor:
        return self.latent_buffers[layer_id]

    def latent_scale(self, layer_id: int) -> float:
        """A stored value times this is the real one (1.0 unless fp8)."""
        return self.latent_scales[layer_id]

    def set_latent(self, layer_id: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        """Write latent [n, D] (or [n, 1, D]) at slots [n]."""
        latent = latent.reshape(-1, 1, self.head_dim)
        buf = self.latent_buffers[layer_id]
        if self.is_fp8:
            buf[slots] = per_tensor_quantize(latent, self.latent_scales[layer_id])
            return
        buf[slots] = latent.to(self.dtype)

    def bytes_per_token(self) -> int:
        return self.bytes_per_token_for(self.num_layers, self.kv_lora_rank, self.qk_rope_head_dim, self.dtype)

    def bytes_per_page(self) -> int:
        return self.bytes_per_token() * self.page_size

    def layout(self) -> list[KVBuffer]:
        """One "latent" buffer per layer (see KVPool.layout)."""
        return [KVBuffer(layer, "latent", buf) for layer, buf in enumerate(self.latent_buffers)]

    @staticmethod
    def bytes_per_token_for(num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype: torch.dtype) -> int:
        # one latent row per layer, no separate V: a third of Llama's K+V at the same head width, or less
        return num_layers * (kv_lora_rank + qk_rope_head_dim) * dtype.itemsize
