"""TritonBackend against TorchNativeBackend on CUDA, in bf16 and fp16, at serving-sized shapes.

Tolerances: atol 2e-2 / rtol 2e-2 in half precision (both sides round P and the output to 8 or 11
mantissa bits, in different orders); atol 1e-4 in fp32 (the kernels use IEEE fp32 dots there).
Also prints decode timings (not asserted) for a Llama-3-8B head shape.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    print("skipping Triton attention GPU tests: CUDA is not available")
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

if CUDA:  # the kernels are built at import: only here, so a CPU run can still use the interpreter
    from radixserve.attention.base import AttentionLayerSpec
    from radixserve.attention.kernels import built_for_interpreter
    from radixserve.attention.torch_native import TorchNativeBackend
    from radixserve.attention.triton_backend import TritonBackend
    from radixserve.cache.pools import KVPool
    from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

    if built_for_interpreter():
        pytestmark = pytest.mark.skip(reason="kernels were imported under TRITON_INTERPRET=1 in this process")

HALF_TOL = 2e-2
DEV = "cuda"


def build(page_size, q_heads, kv_heads, head_dim, prefix_lens, extend_lens, dtype, seed=0):
    """Pool with random K/V, requests on shuffled pages, fresh q/k/v for the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pages_per_req = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_per_req) + 16
    order = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    table = torch.zeros(len(seq_lens) + 1, max(seq_lens), dtype=torch.int64)
    for i, (n, np_) in enumerate(zip(seq_lens, pages_per_req)):
        pages = torch.tensor([order.pop() for _ in range(np_)])
        table[i + 1, :n] = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
    table = table.to(DEV)
    pool = KVPool(num_pages * page_size, page_size, 1, kv_heads, head_dim, dtype, DEV)
    torch.manual_seed(seed)
    pool.k_buffers[0].normal_()
    pool.v_buffers[0].normal_()
    rows = torch.arange(1, len(seq_lens) + 1, device=DEV)
    new_slots = torch.cat([table[i + 1, p : p + e] for i, (p, e) in enumerate(zip(prefix_lens, extend_lens))])
    t = sum(extend_lens)
    q = torch.randn(t, q_heads, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(t, kv_heads, head_dim, device=DEV, dtype=dtype)
    v = torch.randn(t, kv_heads, head_dim, device=DEV, dtype=dtype)
    layer = AttentionLayerSpec(0, q_heads, kv_heads, head_dim, head_dim**-0.5)
    seq = torch.tensor(seq_lens)

    def batch(mode, backend):
        return ForwardBatch(
            mode=mode, input_ids=torch.zeros(t, dtype=torch.int64, device=DEV),
            positions=torch.zeros(t, dtype=torch.int64, device=DEV), req_pool_indices=rows,
            seq_lens=seq.to(DEV), seq_lens_cpu=seq, out_cache_loc=new_slots, req_to_token=table, kv_pool=pool,
            attn_backend=backend, extend_lens_cpu=torch.tensor(extend_lens), prefix_lens_cpu=torch.tensor(prefix_lens),
        )

    return batch, q, k, v, layer


def compare(mode, built, tol):
    batch_of, q, k, v, layer = built
    outs = []
    for backend in (TorchNativeBackend(), TritonBackend()):
        batch = batch_of(mode, backend)
        backend.init_forward_metadata(batch)
        outs.append(backend.forward(q, k, v, layer, batch))
    ref, got = outs
    print(f"  {mode.value} {q.dtype} q{tuple(q.shape)}: max |diff| {(got.float() - ref.float()).abs().max().item():.2e}")
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_large(dtype):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1024, 4097, (32,), generator=gen).tolist()
    built = build(16, 32, 8, 128, [n - 1 for n in seq_lens], [1] * 32, dtype)
    compare(ForwardMode.DECODE, built, HALF_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extend_large(dtype):
    prefix = [0, 1000, 2048, 17, 0, 3000, 511, 64]
    extend = [1024, 512, 1, 700, 33, 1096, 1024, 129]
    built = build(16, 32, 8, 128, prefix, extend, dtype, seed=2)
    compare(ForwardMode.EXTEND, built, HALF_TOL)


@pytest.mark.parametrize("shape", [(1, 4, 4, 64), (4, 6, 2, 80), (1, 24, 8, 96), (4, 8, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_shapes(shape, dtype):
    page_size, hq, hk, d = shape
    tol = HALF_TOL if dtype != torch.float32 else 1e-4
    seq_lens = [1, 7, 33, 300, 2500]
    compare(ForwardMode.DECODE, build(page_size, hq, hk, d, [n - 1 for n in seq_lens], [1] * 5, dtype), tol)
    compare(ForwardMode.EXTEND, build(page_size, hq, hk, d, [0, 5, 200, 0], [1, 7, 300, 129], dtype), tol)


def _time_ms(fn, iters=50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize("ctx", [1024, 4096])
def test_decode_timing(ctx):
    """Not an assertion: decode, bs 32, Llama-3-8B heads (32 q, 8 kv, head_dim 128), bf16."""
    bs = 32
    batch_of, q, k, v, layer = build(16, 32, 8, 128, [ctx - 1] * bs, [1] * bs, torch.bfloat16)
    kv_bytes = 2 * bs * ctx * 8 * 128 * 2
    for backend in (TorchNativeBackend(), TritonBackend()):
        batch = batch_of(ForwardMode.DECODE, backend)
        backend.init_forward_metadata(batch)
        ms = _time_ms(lambda b=backend, fb=batch: b.forward_decode(q, k, v, layer, fb))
        extra = f", {backend._decode.max_splits} splits" if isinstance(backend, TritonBackend) else ""
        print(f"  decode bs {bs} x {ctx} ctx, {type(backend).__name__}: {ms * 1e3:.1f} us/layer "
              f"({kv_bytes / ms / 1e6:.0f} GB/s of KV{extra})")
