"""ForwardBatch: everything one forward pass needs, as device tensors (plus a few CPU copies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.attention.base import AttentionBackend
    from radixserve.cache.pools import KVPool


class ForwardMode(Enum):
    EXTEND = "extend"  # prefill (possibly one chunk of it), on top of a cached prefix
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    req_pool_indices: torch.Tensor  # [bs] int64 rows of req_to_token
    seq_lens: torch.Tensor  # [bs] int64, tokens in KV after this pass
    seq_lens_cpu: torch.Tensor
    out_cache_loc: torch.Tensor  # [T] int64 KV slots for the new tokens
    req_to_token: torch.Tensor
    kv_pool: KVPool
    attn_backend: AttentionBackend
    extend_lens_cpu: torch.Tensor | None = None  # [bs] new tokens per request (extend only)
    prefix_lens_cpu: torch.Tensor | None = None
    # Logits: positions (indices into the T tokens) whose logits are wanted, in request order.
    logits_indices: torch.Tensor | None = None
    # Prompt logprobs: for request i, its extend positions [a, b) and the next input token of each.
    prompt_logprob_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (req index, a, b)
    prompt_next_ids: torch.Tensor | None = None  # [T] next input token per position, -1 unknown
    # Decode staged in a CUDA graph's static inputs (CudaGraphRunner.stage_decode): the graph of this
    # bucket runs the batch, and its table write and input gather happen inside that graph.
    graph_bucket: int | None = None

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens_cpu.shape[0])
