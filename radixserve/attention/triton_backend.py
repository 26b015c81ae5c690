"""Attention backend running the Triton kernels over the paged KV pool.

Per batch, init_forward_metadata computes everything the layers share: device index tensors (one
host-to-device copy for extend, one small device op for decode), the longest lengths as Python ints
taken from the CPU copies (so no layer ever syncs with the device), and the decode split plan. The
device tensors are views into persistent buffers filled in place, which is what CUDA-graph capture
needs: their addresses stay put once the buffers have grown to the largest batch.

An fp8 pool (--kv-cache-dtype fp8_e4m3) changes only what the kernels are handed: the e4m3 buffers and
the layer's (k_scale, v_scale), plain floats a captured graph keeps as constants. The metadata and
the decode workspace (fp32) do not depend on the pool's dtype.

MLA (DeepSeek's latent attention, forward_mla_decode/extend) reads one latent buffer per layer from an
MLAKVPool. Its decode plans its own splits (an MLA split must be longer, since its workspace output
is kv_lora_rank wide for every head; kernels/mla_decode.py) the first time a layer of the batch asks,
and fills its own per-request split counts; the CUDA-graph replay hook refills those too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixserve.attention.base import AttentionBackend, AttentionLayerSpec
from radixserve.attention.kernels.decode_attention import (
    MIN_SPLIT_TOKENS,
    DecodeWorkspace,
    decode_attention,
    fill_num_splits,
    num_sms,
    plan_max_splits,
)
from radixserve.attention.kernels.extend_attention import extend_attention
from radixserve.attention.kernels.mla_decode import mla_decode, plan_mla_splits
from radixserve.attention.kernels.mla_extend import mla_extend

if TYPE_CHECKING:
    from radixserve.attention.base import MLALayerSpec
    from radixserve.model_executor.forward_batch import ForwardBatch


@dataclass
class ExtendMetadata:
    prefix_lens: torch.Tensor  # [bs] int64, device
    extend_lens: torch.Tensor  # [bs] int64, device
    extend_start_loc: torch.Tensor  # [bs] int64, device: offset of each request's first new token
    max_extend_len: int


@dataclass
class DecodeMetadata:
    bs: int
    max_len: int
    max_splits: int
    num_splits: torch.Tensor  # [bs] int32, device
    workspace: DecodeWorkspace | None = None  # built by the first layer, once q_heads is known
    mla: MLADecodePlan | None = None  # MLA's own split plan and workspace, built by its first layer


@dataclass
class MLADecodePlan:
    max_splits: int  # the grid's split dimension
    min_split_tokens: int  # what fill_num_splits was (and, on replay, is again) given
    workspace: DecodeWorkspace  # acc [bs, heads, max_splits, kv_lora_rank]; num_splits its own buffer


class _BufferPool:
    """Named device buffers that only grow; callers get views of the leading elements."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            # Grow geometrically so a slowly rising batch size reallocates rarely.
            cap = max(numel, 2 * buf.numel() if buf is not None else 0, 64)
            buf = torch.empty(cap, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:numel]


class TritonBackend(AttentionBackend):
    def __init__(self, min_split_tokens: int = MIN_SPLIT_TOKENS) -> None:
        self.min_split_tokens = min_split_tokens
        self._buffers = _BufferPool()
        self._num_sms: int | None = None
        self._extend: ExtendMetadata | None = None
        self._decode: DecodeMetadata | None = None
        self._graph_splits: dict[int, int] = {}  # captured batch size -> its fixed max_splits

    # ---- CUDA graphs ------------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, num_heads: int, head_dim: int, num_kv_heads: int,
                              context_len: int, device: torch.device) -> None:
        """Grow every buffer to its largest size now, so that views taken at capture keep their
        addresses for every later replay."""
        self._num_sms = num_sms(device)
        # An MLA model passes head_dim = kv_lora_rank and num_kv_heads = 1; its own plan is sized here
        # too (a non-MLA model just gets a workspace that is a little larger than it needs, if at all).
        worst = max(bs * max(self._plan(context_len, bs, num_kv_heads),
                             plan_mla_splits(context_len, bs, num_heads, self._num_sms, self.min_split_tokens)[0])
                    for bs in range(1, max_bs + 1))
        self._buffers.get("num_splits", max_bs, torch.int32, device)
        self._buffers.get("mla_num_splits", max_bs, torch.int32, device)
        self._buffers.get("decode_ws", worst * num_heads * (head_dim + 1), torch.float32, device)

    def _plan(self, max_len: int, bs: int, num_kv_heads: int) -> int:
        return plan_max_splits(max_len, bs, num_kv_heads, self._num_sms, self.min_split_tokens)

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        """Decode metadata for a graph bucket: the split grid is planned for the longest possible
        context, since the graph is replayed for any lengths."""
        bs = batch.batch_size
        max_len = batch.req_to_token.shape[1]
        max_splits = self._plan(max_len, bs, batch.kv_pool.num_kv_heads)
        self._graph_splits[bs] = max_splits
        num_splits = self._buffers.get("num_splits", bs, torch.int32, batch.seq_lens.device)
        fill_num_splits(num_splits, batch.seq_lens, max_splits, self.min_split_tokens)
        self._decode = DecodeMetadata(bs, max_len, max_splits, num_splits)

    def init_forward_metadata_replay(self, batch: ForwardBatch, real_bs: int) -> None:
        """Refill, in place, what the captured kernels read: the per-request split counts."""
        bs = batch.batch_size
        num_splits = self._buffers.get("num_splits", bs, torch.int32, batch.seq_lens.device)
        fill_num_splits(num_splits, batch.seq_lens, self._graph_splits[bs], self.min_split_tokens)
        meta = self._decode  # during capture: this bucket's; its MLA plan exists after the first warm-up
        if meta is not None and meta.bs == bs and meta.mla is not None:
            mla = meta.mla
            fill_num_splits(mla.workspace.num_splits, batch.seq_lens, mla.max_splits, mla.min_split_tokens)

    # ---- metadata -------------------------------------------------------------------------------

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            self._decode = self._decode_metadata(batch)
        else:
            self._extend = self._extend_metadata(batch)

    def _extend_metadata(self, batch: ForwardBatch) -> ExtendMetadata:
        assert batch.extend_lens_cpu is not None and batch.prefix_lens_cpu is not None
        extend_lens = batch.extend_lens_cpu.to(torch.int64)
        starts = torch.cumsum(extend_lens, 0) - extend_lens
        host = torch.stack([batch.prefix_lens_cpu.to(torch.int64), extend_lens, starts])  # [3, bs]
        dev = self._buffers.get("extend", host.numel(), torch.int64, batch.seq_lens.device).view(3, -1)
        dev.copy_(host, non_blocking=True)  # one copy for all three
        max_extend_len = int(extend_lens.max()) if extend_lens.numel() else 0
        return ExtendMetadata(dev[0], dev[1], dev[2], max_extend_len)

    def _decode_metadata(self, batch: ForwardBatch) -> DecodeMetadata:
        device = batch.seq_lens.device
        bs = batch.batch_size
        max_len = int(batch.seq_lens_cpu.max()) if bs else 0
        if self._num_sms is None:
            self._num_sms = num_sms(device)
        # (CUDA graphs use init_forward_metadata_capture/replay instead: a grid fixed per bucket.)
        max_splits = self._plan(max_len, bs, batch.kv_pool.num_kv_heads)
        num_splits = self._buffers.get("num_splits", bs, torch.int32, device)
        fill_num_splits(num_splits, batch.seq_lens, max_splits, self.min_split_tokens)
        return DecodeMetadata(bs, max_len, max_splits, num_splits)

    def _decode_workspace(self, meta: DecodeMetadata, num_heads: int, head_dim: int,
                          device: torch.device) -> DecodeWorkspace:
        ws = meta.workspace
        if ws is not None and ws.acc.shape[1] == num_heads and ws.acc.shape[3] == head_dim:
            return ws
        n_acc = meta.bs * num_heads * meta.max_splits * head_dim
        n_lse = meta.bs * num_heads * meta.max_splits
        flat = self._buffers.get("decode_ws", n_acc + n_lse, torch.float32, device)
        meta.workspace = DecodeWorkspace(
            meta.max_splits, meta.num_splits,
            flat[:n_acc].view(meta.bs, num_heads, meta.max_splits, head_dim),
            flat[n_acc:].view(meta.bs, num_heads, meta.max_splits),
        )
        return meta.workspace

    def _mla_workspace(self, meta: DecodeMetadata, num_heads: int, kv_lora_rank: int,
                       seq_lens: torch.Tensor) -> DecodeWorkspace:
        """The MLA split plan of this batch, made by its first MLA layer: the grid's splits for the
        longest request (for a graph bucket: the table width) and each request's count, on the device."""
        plan = meta.mla
        if plan is not None and plan.workspace.acc.shape[1] == num_heads and plan.workspace.acc.shape[3] == kv_lora_rank:
            return plan.workspace
        device = seq_lens.device
        if self._num_sms is None:
            self._num_sms = num_sms(device)
        max_splits, min_split = plan_mla_splits(meta.max_len, meta.bs, num_heads, self._num_sms, self.min_split_tokens)
        num_splits = self._buffers.get("mla_num_splits", meta.bs, torch.int32, device)
        fill_num_splits(num_splits, seq_lens, max_splits, min_split)
        n_acc = meta.bs * num_heads * max_splits * kv_lora_rank
        n_lse = meta.bs * num_heads * max_splits
        flat = self._buffers.get("decode_ws", n_acc + n_lse, torch.float32, device)
        ws = DecodeWorkspace(
            max_splits, num_splits,
            flat[:n_acc].view(meta.bs, num_heads, max_splits, kv_lora_rank),
            flat[n_acc:].view(meta.bs, num_heads, max_splits),
        )
        meta.mla = MLADecodePlan(max_splits, min_split, ws)
        return ws

    # ---- forward --------------------------------------------------------------------------------

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        meta = self._extend
        assert meta is not None, "init_forward_metadata was not called for this extend batch"
        pool = batch.kv_pool
        # The new tokens' K/V go into the pool for later steps; this kernel reads them from k/v directly
        # and only the cached prefix through req_to_token (an fp8 pool: the new ones from the pool too).
        pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = pool.kv_scales(layer.layer_id)
        out = q.new_empty(q.shape)
        return extend_attention(
            q, k, v, k_buf, v_buf, batch.req_to_token, batch.req_pool_indices,
            meta.prefix_lens, meta.extend_lens, meta.extend_start_loc, out, layer.scaling, meta.max_extend_len,
            k_scale=k_scale, v_scale=v_scale,
        )

    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        meta = self._decode
        assert meta is not None, "init_forward_metadata was not called for this decode batch"
        pool = batch.kv_pool
        pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = pool.kv_scales(layer.layer_id)
        out = q.new_empty(q.shape)
        ws = self._decode_workspace(meta, q.shape[1], q.shape[2], q.device)
        return decode_attention(
            q, k_buf, v_buf, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, out,
            layer.scaling, meta.max_len, ws, k_scale, v_scale,
        )

    # ---- MLA (DeepSeek latent attention; the interface is in attention/base.py) ---------------------

    @staticmethod
    def _mla_inputs(q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec, batch: ForwardBatch):
        """Write the new latents into the pool (first: every key is then read back from it), and return
        q with a contiguous head dimension, the layer's latent buffer and its scale."""
        width = layer.kv_lora_rank + layer.qk_rope_head_dim
        if q.dim() != 3 or q.shape[1:] != (layer.num_heads, width) or latent.shape != (q.shape[0], width):
            raise ValueError(f"MLA layer {layer.layer_id}: q must be [T, {layer.num_heads}, {width}] and latent "
                             f"[T, {width}], got {tuple(q.shape)} and {tuple(latent.shape)}")
        pool = batch.kv_pool
        pool.set_latent(layer.layer_id, batch.out_cache_loc, latent)
        q = q if q.stride(2) == 1 else q.contiguous()
        return q, pool.get_latent_buffer(layer.layer_id), pool.latent_scale(layer.layer_id)

    def forward_mla_extend(
        self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        meta = self._extend
        assert meta is not None, "init_forward_metadata was not called for this extend batch"
        q, buf, scale = self._mla_inputs(q, latent, layer, batch)
        out = q.new_empty(q.shape[0], q.shape[1], layer.kv_lora_rank)
        return mla_extend(
            q, buf, batch.req_to_token, batch.req_pool_indices, meta.prefix_lens, meta.extend_lens,
            meta.extend_start_loc, out, layer.scaling, layer.kv_lora_rank, meta.max_extend_len, latent_scale=scale,
        )

    def forward_mla_decode(
        self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        meta = self._decode
        assert meta is not None, "init_forward_metadata was not called for this decode batch"
        q, buf, scale = self._mla_inputs(q, latent, layer, batch)
        out = q.new_empty(q.shape[0], q.shape[1], layer.kv_lora_rank)
        ws = self._mla_workspace(meta, q.shape[1], layer.kv_lora_rank, batch.seq_lens)
        return mla_decode(
            q, buf, batch.req_to_token, batch.req_pool_indices, batch.seq_lens, out, layer.scaling,
            layer.kv_lora_rank, workspace=ws, latent_scale=scale,
        )
