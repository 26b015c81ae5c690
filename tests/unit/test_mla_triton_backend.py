"""TritonBackend.forward_mla_extend / forward_mla_decode on the CPU through the Triton interpreter.

The backend runs over a real MLAKVPool (junk-filled first) and MLALayerSpec. Each step
is checked against the MLA formula over the pool's contents after the step (the reference in
test_mla_kernels.py), and the pool is checked to hold the step's latents: together these show the
latents were written before the kernels read them. fp32 (1e-4); an fp8 pool with scale 0.05 is
compared against the formula over its stored e4m3 values (the same 1e-4).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported


import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
    print(f"skipping MLA backend tests: triton is not importable ({exc})")
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

from radixserve.attention.base import MLALayerSpec
from radixserve.attention.kernels import built_for_interpreter, plan_mla_splits
from radixserve.attention.kernels.decode_attention import num_sms
from radixserve.attention.triton_backend import TritonBackend
from radixserve.cache.pools import MLAKVPool
from radixserve.layers.quantization.fp8_utils import FP8_DTYPE, per_tensor_quantize
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from tests.unit.test_mla_kernels import mla_reference, scattered_table

if not built_for_interpreter():
    print("skipping Triton interpreter tests: the kernels were already built for a GPU in this process")
    pytest.skip("kernels already built for a GPU in this process; run this file on its own",
                allow_module_level=True)

HEADS, RANK, ROPE, PAGE = 3, 48, 8, 4
WIDTH = RANK + ROPE


def junk_pool(num_slots: int, dtype: torch.dtype, scale: float, seed: int) -> MLAKVPool:
    """A real MLAKVPool (two layers) with junk everywhere at first, so a latent read before it was
    written (or from a wrong slot) shows."""
    fp8 = dtype == FP8_DTYPE
    pool = MLAKVPool(num_slots, PAGE, 2, RANK, ROPE, dtype, "cpu", latent_scales=[scale, scale] if fp8 else None)
    gen = torch.Generator().manual_seed(seed)
    for buf in pool.latent_buffers:
        junk = torch.randn(buf.shape, generator=gen)
        buf.copy_(per_tensor_quantize(junk, scale) if fp8 else junk.to(dtype))
    return pool


def layer_spec(layer_id: int = 1) -> MLALayerSpec:
    return MLALayerSpec(layer_id, HEADS, RANK, ROPE, WIDTH**-0.5)


class Requests:
    """A few requests on scattered pages, stepped through prefill chunks and decode steps."""

    def __init__(self, final_lens: list[int], pool_dtype: torch.dtype, scale: float = 1.0, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.table, num_slots = scattered_table(final_lens, PAGE, self.gen)
        self.pool = junk_pool(num_slots, pool_dtype, scale, seed=seed + 1)
        self.rows = torch.arange(1, len(final_lens) + 1)
        self.lens = [0] * len(final_lens)

    def batch(self, new_tokens: list[int], backend: TritonBackend) -> ForwardBatch:
        """The next step: new_tokens[i] tokens for request i (all 1: a decode step)."""
        decode = all(n == 1 for n in new_tokens) and min(self.lens) > 0
        prefix = list(self.lens)
        self.lens = [p + n for p, n in zip(prefix, new_tokens)]
        slots = torch.cat([self.table[r, p:n] for r, p, n in zip(self.rows.tolist(), prefix, self.lens)])
        seq_lens = torch.tensor(self.lens)
        t = slots.shape[0]
        return ForwardBatch(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            input_ids=torch.zeros(t, dtype=torch.int64), positions=torch.zeros(t, dtype=torch.int64),
            req_pool_indices=self.rows, seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), out_cache_loc=slots,
            req_to_token=self.table, kv_pool=self.pool, attn_backend=backend,
            extend_lens_cpu=None if decode else torch.tensor(new_tokens),
            prefix_lens_cpu=None if decode else torch.tensor(prefix),
        )

    def step(self, backend: TritonBackend, new_tokens: list[int], layer: MLALayerSpec, q_dtype=torch.float32):
        batch = self.batch(new_tokens, backend)
        backend.init_forward_metadata(batch)
        t = batch.out_cache_loc.shape[0]
        q = torch.randn(t, HEADS, WIDTH, generator=self.gen).to(q_dtype)
        latent = torch.randn(t, WIDTH, generator=self.gen)
        forward = backend.forward_mla_decode if batch.is_decode else backend.forward_mla_extend
        out = forward(q, latent, layer, batch)
        return batch, q, latent, out

    def check(self, batch, q, latent, out, layer, tol=1e-4):
        buf = self.pool.get_latent_buffer(layer.layer_id)
        scale = self.pool.latent_scale(layer.layer_id)
        stored = buf[batch.out_cache_loc, 0].float() * scale
        assert torch.allclose(stored, latent, rtol=0.07, atol=1e-6 + 0.02 * scale)  # e4m3: 3 mantissa bits
        new = torch.tensor([int(n) - int(p) for n, p in zip(batch.seq_lens, self._prefix(batch))])
        meta = dict(req_pool_indices=self.rows, prefix_lens=torch.tensor(self._prefix(batch)), extend_lens=new,
                    extend_start_loc=torch.cumsum(new, 0) - new)
        ref = mla_reference(q, buf, scale, self.table, meta, RANK, layer.scaling)
        assert out.shape == (q.shape[0], HEADS, RANK) and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)

    @staticmethod
    def _prefix(batch: ForwardBatch) -> list[int]:
        if batch.is_decode:
            return (batch.seq_lens - 1).tolist()
        return batch.prefix_lens_cpu.tolist()


@pytest.mark.parametrize("pool_dtype,scale", [(torch.float32, 1.0), (FP8_DTYPE, 0.05)], ids=["fp32", "fp8"])
def test_prefill_chunk_then_decode(pool_dtype, scale):
    """A first chunk (no prefix), a second chunk on it, then decode steps with several splits."""
    reqs = Requests([30, 9, 44], pool_dtype, scale)
    backend = TritonBackend(min_split_tokens=8)
    layer = layer_spec()
    for new_tokens in ([20, 5, 1], [6, 1, 40]):
        reqs.check(*reqs.step(backend, new_tokens, layer), layer)
    for _ in range(3):
        batch, *rest = reqs.step(backend, [1, 1, 1], layer)
        reqs.check(batch, *rest, layer)
    assert backend._decode.mla.max_splits > 1  # the decode did split
    assert backend._decode.mla.workspace.num_splits.tolist() == [4, 2, 6]  # ceil(len / 8)


def test_decode_graph_capture_then_replay_refills_splits():
    """The CUDA-graph protocol on the CPU: state sized up front, a bucket's metadata captured once, the
    replay hook refilling the MLA split counts in place; buffers keep their addresses."""
    reqs = Requests([30, 9], torch.float32)
    backend = TritonBackend(min_split_tokens=8)
    layer = layer_spec()
    width = reqs.table.shape[1]
    backend.init_cuda_graph_state(4, HEADS, RANK, 1, width, torch.device("cpu"))
    reqs.check(*reqs.step(backend, [20, 5], layer), layer)  # prefill first

    batch = reqs.batch([1, 1], backend)
    backend.init_forward_metadata_capture(batch)
    q = torch.randn(2, HEADS, WIDTH, generator=reqs.gen)
    latent = torch.randn(2, WIDTH, generator=reqs.gen)
    backend.init_forward_metadata_replay(batch, 2)
    out = backend.forward_mla_decode(q, latent, layer, batch)  # warm-up: makes the MLA plan
    reqs.check(batch, q, latent, out, layer)
    plan = backend._decode.mla
    # planned for the whole table, as a captured graph must be (the batch's own lengths would give 3)
    assert plan.max_splits == plan_mla_splits(width, 2, HEADS, num_sms(torch.device("cpu")), 8)[0] == 8
    addresses = (plan.workspace.acc.data_ptr(), plan.workspace.num_splits.data_ptr())

    # "replay": the static inputs move on by one token, the hook refills the counts in place
    reqs.lens = [n + 1 for n in reqs.lens]
    batch.seq_lens += 1
    batch.out_cache_loc.copy_(torch.stack([reqs.table[r, n - 1] for r, n in zip(reqs.rows.tolist(), reqs.lens)]))
    backend.init_forward_metadata_replay(batch, 2)
    assert plan.workspace.num_splits.tolist() == [3, 1]  # ceil(22 / 8), ceil(7 / 8)
    out = backend.forward_mla_decode(q, latent, layer, batch)
    reqs.check(batch, q, latent, out, layer)
    assert backend._decode.mla is plan
    assert (plan.workspace.acc.data_ptr(), plan.workspace.num_splits.data_ptr()) == addresses


def test_wrong_widths_are_refused():
    reqs = Requests([8], torch.float32)
    backend = TritonBackend()
    batch = reqs.batch([8], backend)
    backend.init_forward_metadata(batch)
    with pytest.raises(ValueError, match="q must be"):
        backend.forward_mla_extend(torch.randn(8, HEADS, WIDTH + 1), torch.randn(8, WIDTH + 1), layer_spec(), batch)
