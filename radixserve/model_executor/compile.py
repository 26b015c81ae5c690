"""torch.compile for small decode batches (--enable-torch-compile, --torch-compile-max-bs).

What is traced: the model's whole decode forward (embedding, rotary, every layer's norms,
projections and MLP, the final norm and the LM head) as one graph, with no graph breaks. What is
not: attention. The model calls `batch.attn_backend.forward(q, k, v, layer, batch)`; inside the
traced function the batch is a small stand-in whose backend emits the opaque custom op
`radixserve::attention(q, k, v, layer_id)`, and at run time that op calls the real backend with
the real ForwardBatch of the call in flight (kept in a module-level slot: a custom op takes only
tensors and plain values). So Dynamo never sees ForwardBatch, the KV pool or the backends'
per-batch metadata (Python ints, CPU tensors), and the model code needs no change.

Recompiles: the inputs go in as one [2, bs] tensor (input ids over positions), made in inference
mode so its guards never differ between calls, with the batch dimension marked dynamic. One graph
then serves every batch size from 2 up; size 1 is always specialised by Dynamo (and the model's
q/k reshape of a split view lays out differently at 1), so it gets a second graph: two compiles
in all, whatever --torch-compile-max-bs is. Dynamo's default cache limit (8 per function) leaves
room for them, so it is not raised. With CUDA graphs both compiles happen while the first buckets
are warmed up and every bucket's graph captures the compiled kernels; without them (or on CPU)
both are compiled at start-up, so no request stalls on a compile.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from radixserve.attention.base import AttentionLayerSpec
from radixserve.layers.logits import LogitsOutput
from radixserve.model_executor.cuda_graph import graph_batch_sizes
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixserve.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_BS = 32  # SGLang's default for --torch-compile-max-bs

# The ForwardBatch and layers of the compiled call in flight, read by the attention op.
_active: tuple[ForwardBatch, dict[int, AttentionLayerSpec]] | None = None


@torch.library.custom_op("radixserve::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]: the real backend on the real batch (which also
    writes this layer's new K/V into the pool, a side effect the graph does not see)."""
    assert _active is not None, "radixserve::attention called outside a compiled forward"
    batch, layers = _active
    # contiguous, as the fake below promises: the graph after the op is planned for that layout
    return batch.attn_backend.forward(q, k, v, layers[layer_id], batch).contiguous()


@attention_op.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
    return q.new_empty(q.shape)


class _OpBackend:
    """The attention backend the traced model sees: each call becomes one custom-op node."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayerSpec,
                batch: object) -> torch.Tensor:
        return attention_op(q, k, v, layer.layer_id)


_OP_BACKEND = _OpBackend()


class _TracedBatch:
    """What the model reads from a decode ForwardBatch, and nothing Dynamo would have to guard."""

    mode = ForwardMode.DECODE
    is_decode = True
    attn_backend = _OP_BACKEND

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.positions = positions


class CompiledDecode:
    """The model's decode forward under torch.compile, for batches of at most `max_bs` requests."""

    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        self.runner = runner
        self.max_bs = max(1, min(max_bs, runner.plan.max_running_requests))
        self.layers = {m.layer_id: m for m in runner.model.modules() if isinstance(m, AttentionLayerSpec)}
        model = runner.model

        def decode_logits(ids_pos: torch.Tensor) -> torch.Tensor:
            return model(_TracedBatch(ids_pos[0], ids_pos[1])).next_token_logits

        # default mode: max-autotune would benchmark every GEMM shape, minutes of device time
        self._fn = torch.compile(decode_logits, fullgraph=True)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs

    @torch.inference_mode()
    def __call__(self, batch: ForwardBatch) -> LogitsOutput:
        """Decode logits; the attention backend's metadata for this batch must be set already."""
        global _active
        ids_pos = torch.stack((batch.input_ids.long(), batch.positions.long()))
        if ids_pos.shape[1] > 1:
            torch._dynamo.mark_dynamic(ids_pos, 1)
        _active = (batch, self.layers)
        try:
            return LogitsOutput(self._fn(ids_pos))
        finally:
            _active = None

    def warm_up(self) -> None:
        """Compile both graphs now, on dummy batches (request row 0 and KV slot 0: the dummy page)."""
        for bs in sorted({1, min(2, self.max_bs)}):
            batch = dummy_decode_batch(self.runner, bs)
            self.runner.attn_backend.init_forward_metadata(batch)
            self(batch)

    def describe(self) -> str:
        if self.runner.use_cuda_graph:
            sizes = [s for s in graph_batch_sizes(self.runner.cuda_graph_max_bs) if s <= self.max_bs]
            return f"torch.compile: decode batch sizes {sizes} (CUDA-graph buckets) run the compiled model"
        return f"torch.compile: decode batch sizes 1-{self.max_bs} run the compiled model"


def dummy_decode_batch(runner: ModelRunner, bs: int) -> ForwardBatch:
    dev = runner.device
    zeros = torch.zeros(bs, dtype=torch.int64, device=dev)
    return ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=zeros, positions=zeros.clone(), req_pool_indices=zeros.clone(),
        seq_lens=torch.ones(bs, dtype=torch.int64, device=dev), seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
        out_cache_loc=zeros.clone(), req_to_token=runner.pools.req_to_token.req_to_token, kv_pool=runner.pools.kv,
        attn_backend=runner.attn_backend,
    )


def make_compiled_decode(runner: ModelRunner) -> CompiledDecode | None:
    """The compiled decode forward under --enable-torch-compile (else None), compiled now unless
    CUDA-graph capture is about to compile it."""
    args = runner.args
    if not args.enable_torch_compile:
        return None
    compiled = CompiledDecode(runner, args.torch_compile_max_bs or DEFAULT_MAX_BS)
    logger.info(compiled.describe())
    if not runner.use_cuda_graph:
        compiled.warm_up()
    return compiled
