"""Reference attention over the paged KV pool, in plain torch.

Runs on CPU and CUDA. Extend attends each request's new tokens to its cached prefix plus the
causal part of the new tokens (scaled_dot_product_attention); decode gathers every request's KV
into one padded batch; in half precision it does grouped-query attention as two batched matmuls,
which on CPU is several times faster than SDPA for a single query.

MLA (DeepSeek) attends every head to the one shared latent row per token, in fp32: the reference the
Triton MLA kernels are checked against.

An fp8 pool (--kv-cache-dtype fp8_e4m3) is dequantised as it is gathered (x.float() * the layer's
scale, in q's dtype). Extend reads the new tokens back from the pool too, so every query sees the
stored (rounded) K/V, as decode steps and later requests sharing the prefix will.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from radixserve.attention.base import AttentionBackend, AttentionLayerSpec, MLALayerSpec
from radixserve.layers.quantization.fp8_utils import per_tensor_dequantize

if TYPE_CHECKING:
    from radixserve.cache.pools import KVPool, MLAKVPool
    from radixserve.model_executor.forward_batch import ForwardBatch


def _gathered(pool: KVPool | MLAKVPool, rows: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Gathered pool rows in the compute dtype: fp8 ones times their scale."""
    return per_tensor_dequantize(rows, scale, dtype) if pool.is_fp8 else rows.to(dtype)


class TorchNativeBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        rows = batch.req_to_token[batch.req_pool_indices]
        if batch.is_decode:
            max_len = int(batch.seq_lens_cpu.max())
            self._decode_slots = rows[:, :max_len]
            arange = torch.arange(max_len, device=batch.seq_lens.device)
            # [bs, 1, 1, max_len]: True where the key position exists.
            self._decode_mask = (arange[None, :] < batch.seq_lens[:, None])[:, None, None, :]
        else:
            self._extend_slots = [
                rows[i, : int(batch.seq_lens_cpu[i])] for i in range(len(batch.seq_lens_cpu))
            ]

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        pool = batch.kv_pool
        pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.k_buffers[layer.layer_id], pool.v_buffers[layer.layer_id]
        k_scale, v_scale = pool.kv_scales(layer.layer_id)
        out = torch.empty_like(q)
        start = 0
        for i, slots in enumerate(self._extend_slots):
            n_new = int(batch.extend_lens_cpu[i])
            n_prefix = slots.shape[0] - n_new
            qi = q[start : start + n_new].transpose(0, 1)  # [H, n_new, D]
            ki = _gathered(pool, k_buf[slots], k_scale, q.dtype).transpose(0, 1)  # [Hk, L, D]
            vi = _gathered(pool, v_buf[slots], v_scale, q.dtype).transpose(0, 1)
            # query j (absolute position n_prefix + j) sees keys 0..n_prefix + j
            mask = torch.ones(n_new, slots.shape[0], dtype=torch.bool, device=q.device).tril(n_prefix)
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=layer.scaling, enable_gqa=True
            )
            out[start : start + n_new] = oi.transpose(0, 1)
            start += n_new
        return out

    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec, batch: ForwardBatch
    ) -> torch.Tensor:
        pool = batch.kv_pool
        pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.k_buffers[layer.layer_id], pool.v_buffers[layer.layer_id]
        k_scale, v_scale = pool.kv_scales(layer.layer_id)
        bs, max_len = self._decode_slots.shape
        kv_heads, head_dim = k_buf.shape[1], k_buf.shape[2]
        group = layer.num_heads // kv_heads
        flat = self._decode_slots.reshape(-1)
        # index_select over flat slots is much cheaper than advanced indexing on CPU
        keys = _gathered(pool, k_buf.index_select(0, flat), k_scale, q.dtype).view(bs, max_len, kv_heads, head_dim)
        values = _gathered(pool, v_buf.index_select(0, flat), v_scale, q.dtype).view(bs, max_len, kv_heads, head_dim)
        if q.dtype == torch.float32:  # fp32: torch's fused kernel wins
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=self._decode_mask,
                scale=layer.scaling, enable_gqa=True,
            )
            return out.squeeze(2)
        # grouped-query attention as two batched matmuls: q [bs, Hk, group, D] x K^T [bs, Hk, D, L]
        scores = torch.matmul(q.view(bs, kv_heads, group, head_dim), keys.permute(0, 2, 3, 1)).float()
        scores.mul_(layer.scaling).masked_fill_(~self._decode_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [bs, Hk, group, D]
        return out.reshape(bs, layer.num_heads, head_dim)

    def _latents(self, latent: torch.Tensor, layer: MLALayerSpec, batch: ForwardBatch) -> tuple[torch.Tensor, float]:
        """Store this pass's latents, then (the layer's latent buffer [slots, D], its scale)."""
        pool = batch.kv_pool
        pool.set_latent(layer.layer_id, batch.out_cache_loc, latent)
        return pool.get_latent_buffer(layer.layer_id)[:, 0], pool.latent_scale(layer.layer_id)

    def forward_mla_extend(self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec,
                           batch: ForwardBatch) -> torch.Tensor:
        buf, scale = self._latents(latent, layer, batch)
        rank = layer.kv_lora_rank
        out = q.new_empty(q.shape[0], layer.num_heads, rank)
        start = 0
        for i, slots in enumerate(self._extend_slots):
            n_new = int(batch.extend_lens_cpu[i])
            n_prefix = slots.shape[0] - n_new
            keys = _gathered(batch.kv_pool, buf[slots], scale, torch.float32)  # [L, D], new tokens included
            scores = torch.matmul(q[start : start + n_new].float().transpose(0, 1), keys.t())  # [H, n_new, L]
            scores.mul_(layer.scaling)
            # query j (absolute position n_prefix + j) sees keys 0..n_prefix + j
            mask = torch.ones(n_new, slots.shape[0], dtype=torch.bool, device=q.device).tril(n_prefix)
            scores.masked_fill_(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start : start + n_new] = torch.matmul(probs, keys[:, :rank]).transpose(0, 1).to(q.dtype)
            start += n_new
        return out

    def forward_mla_decode(self, q: torch.Tensor, latent: torch.Tensor, layer: MLALayerSpec,
                           batch: ForwardBatch) -> torch.Tensor:
        buf, scale = self._latents(latent, layer, batch)
        bs, max_len = self._decode_slots.shape
        keys = _gathered(batch.kv_pool, buf.index_select(0, self._decode_slots.reshape(-1)), scale, torch.float32)
        keys = keys.view(bs, max_len, -1)
        scores = torch.matmul(q.float(), keys.transpose(1, 2))  # [bs, H, max_len]
        scores.mul_(layer.scaling).masked_fill_(~self._decode_mask[:, 0], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, keys[..., : layer.kv_lora_rank]).to(q.dtype)  # [bs, H, kv_lora_rank]
