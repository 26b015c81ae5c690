"""CUDA graphs for decode: one graph per batch-size bucket, replayed with the batch padded up to
the bucket. Padding rows read request row 0 (the dummy row) and write their KV to the dummy page,
so they never touch a real request's cache.

With --enable-torch-compile, buckets up to --torch-compile-max-bs capture the compiled forward
(model_executor/compile.py) instead of the plain model.

Each bucket's inputs live in one static int64 block [4, bucket] (request rows, positions, lengths,
new KV slots). A decode batch is staged straight into it (`stage_decode`: one host-to-device copy of
the padded rows), and the graph itself starts with the device work that turns those rows into the
step's inputs: the request-table write, the gather of each row's newest token (decode_inputs.py) and
the attention backend's per-step metadata. Replaying is then one copy and one launch on the host.

The attention backend must support capture: `init_cuda_graph_state(max_bs, ...)`,
`init_forward_metadata_capture(batch)` and `init_forward_metadata_replay(batch, bs)`, all of which
keep their device buffers at fixed addresses; the replay hook is captured inside the graph, so it
may only issue device ops.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import torch

from radixserve.model_executor.decode_inputs import write_decode_inputs
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from collections.abc import Callable

    from radixserve.layers.logits import LogitsOutput
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)
ROWS, POSITIONS, SEQ_LENS, SLOTS = range(4)  # the rows of a bucket's static input block
# a padding column's values, in that order: the dummy request row 0 at position 0 with length 1,
# writing its KV to the dummy slot 0
PADDING = (0, 0, 1, 0)


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
        dev = self.device
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.blocks = {  # per bucket, rows ROWS, POSITIONS, SEQ_LENS, SLOTS; every column padding at first
            bs: torch.tensor(PADDING, dtype=torch.int64, device=dev)[:, None].repeat(1, bs) for bs in self.sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        num_heads, head_dim, num_kv_heads = runner.attention_shape
        runner.attn_backend.init_cuda_graph_state(self.max_bs, num_heads, head_dim, num_kv_heads, runner.context_len, dev)
        self.capture()

    def bucket(self, bs: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, bs)]

    def static_batch(self, bucket: int, seq_lens_cpu: torch.Tensor | None = None) -> ForwardBatch:
        """The bucket's static inputs as a batch: of its first len(seq_lens_cpu) rows if given, else
        of all of them (for capture)."""
        r, block = self.runner, self.blocks[bucket]
        if seq_lens_cpu is None:
            seq_lens_cpu = torch.ones(bucket, dtype=torch.int64)
        bs = int(seq_lens_cpu.shape[0])
        return ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=self.input_ids[:bs], positions=block[POSITIONS, :bs],
            req_pool_indices=block[ROWS, :bs], seq_lens=block[SEQ_LENS, :bs],
            seq_lens_cpu=seq_lens_cpu, out_cache_loc=block[SLOTS, :bs],
            req_to_token=r.pools.req_to_token.req_to_token, kv_pool=r.pools.kv, attn_backend=r.attn_backend,
            graph_bucket=bucket,
        )

    def _step(self, forward: Callable[[ForwardBatch], LogitsOutput], batch: ForwardBatch) -> torch.Tensor:
        """What a replay runs: the inputs from the staged rows, the attention metadata, the model."""
        write_decode_inputs(batch.req_to_token, self.runner.pools.last_token, batch.req_pool_indices,
                            batch.positions, batch.out_cache_loc, batch.input_ids)
        self.runner.attn_backend.init_forward_metadata_replay(batch, batch.batch_size)
        return forward(batch).next_token_logits

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
                    self._step(forward, batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = self._step(forward, batch)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs], self.outputs[bs] = graph, logits
        torch.cuda.current_stream().wait_stream(stream)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def stage_decode(self, rows: list[int], seq_lens: list[int], slots: list[int]) -> ForwardBatch:
        """A decode batch of len(rows) <= max_bs requests, its rows copied (padded, in one pinned
        host-to-device copy) into the static block of its bucket. Call replay() with it next: a
        later stage_decode into the same bucket overwrites these inputs."""
        bs = len(rows)
        bucket = self.bucket(bs)
        pad = bucket - bs
        columns = (rows, [n - 1 for n in seq_lens], seq_lens, slots)  # in the order ROWS .. SLOTS
        host = torch.tensor([col + [fill] * pad for col, fill in zip(columns, PADDING)], dtype=torch.int64,
                            pin_memory=True)
        self.blocks[bucket].copy_(host, non_blocking=True)
        return self.static_batch(bucket, torch.tensor(seq_lens, dtype=torch.int64))

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.graph_bucket is not None

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bucket = batch.graph_bucket
        assert bucket is not None, "replay() takes a batch from stage_decode()"
        self.graphs[bucket].replay()
        return self.outputs[bucket][: batch.batch_size]
