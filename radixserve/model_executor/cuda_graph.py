"""CUDA graphs for decode: one graph per batch-size bucket, replayed with the batch padded up to
the bucket. Padding rows read request row 0 (the dummy row) and write their KV to the dummy page,
so they never touch a real request's cache.

With --enable-torch-compile, buckets up to --torch-compile-max-bs capture the compiled forward
(model_executor/compile.py) instead of the plain model.

The attention backend must support capture: `init_cuda_graph_state(max_bs, ...)`,
`init_forward_metadata_capture(batch)` and `init_forward_metadata_replay(batch, bs)`, all of which
keep their device buffers at fixed addresses.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Buckets: every size up to 8, then steps of 8 up to 256, then of 16."""
    sizes = [1, 2, 3, 4, 5, 6, 7, 8] + list(range(16, 257, 8)) + list(range(272, 1025, 16))
    return [s for s in sizes if s <= max_bs] or [1]


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        n, dev = self.max_bs, self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        attn = runner.model.layers[0].self_attn.attn
        runner.attn_backend.init_cuda_graph_state(
            self.max_bs, attn.num_heads, attn.head_dim, attn.num_kv_heads, runner.context_len, dev
        )
        self.capture()

    def static_batch(self, bs: int) -> ForwardBatch:
        r = self.runner
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=torch.ones(bs, dtype=torch.int64), out_cache_loc=self.out_cache_loc[:bs],
            req_to_token=r.req_to_token_pool.req_to_token, kv_pool=r.kv_pool, attn_backend=r.attn_backend,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        model, backend = self.runner.model, self.runner.attn_backend
        compiled = getattr(self.runner, "compiled_decode", None)  # --enable-torch-compile
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
                batch = self.static_batch(bs)
                forward = compiled if compiled is not None and compiled.can_run(batch) else model
                backend.init_forward_metadata_capture(batch)
                for _ in range(2):  # warm up kernels (torch.compile, Triton autotuning, cuBLAS) outside capture
                    forward(batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = forward(batch).next_token_logits
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs], self.outputs[bs] = graph, logits
        torch.cuda.current_stream().wait_stream(stream)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        if padded != bs:  # padding rows: dummy request row, length 1, KV written to the dummy slot 0
            self.req_pool_indices[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
            self.out_cache_loc[bs:padded].zero_()
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.runner.attn_backend.init_forward_metadata_replay(self.static_batch(padded), bs)
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]
