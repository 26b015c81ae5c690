"""TritonBackend against TorchNativeBackend on CPU, through the Triton interpreter.

fp32 throughout; outputs must agree within atol 1e-4 / rtol 1e-4 (both sides accumulate in fp32,
the difference is summation order). Small shapes only: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
    print(f"skipping Triton attention tests: triton is not importable ({exc})")
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

from radixserve.attention.base import AttentionLayerSpec
from radixserve.attention.kernels import built_for_interpreter, decode_attention, plan_max_splits
from radixserve.attention.kernels.extend_attention import ExtendConfig, extend_attention, tma_usable
from radixserve.attention.torch_native import TorchNativeBackend
from radixserve.attention.triton_backend import TritonBackend
from radixserve.cache.pools import KVPool
from radixserve.model_executor.forward_batch import ForwardBatch, ForwardMode

if not built_for_interpreter():  # e.g. tests/gpu imported them first, compiled for CUDA
    print("skipping Triton interpreter tests: the kernels were already built for a GPU in this process")
    pytest.skip("kernels already built for a GPU in this process; run this file on its own",
                allow_module_level=True)

ATOL = RTOL = 1e-4

# (page_size, q_heads, kv_heads, head_dim): GQA ratios 1, 3, 4 and a single KV head; D 64 and 80.
SHAPES = [
    (1, 4, 4, 64),
    (4, 6, 2, 80),
    (4, 8, 2, 64),
    (1, 4, 1, 80),
]


def scattered_table(seq_lens: list[int], page_size: int, gen: torch.Generator, width: int = 256):
    """req_to_token with each request on shuffled pages (never page 0, the dummy). Rows 1..bs."""
    pages_needed = sum(-(-n // page_size) for n in seq_lens)
    num_pages = pages_needed + 8  # some pages stay unused, so slots are not a dense range
    order = (torch.randperm(num_pages, generator=gen) + 1).tolist()  # page ids 1..num_pages
    table = torch.zeros(len(seq_lens) + 2, width, dtype=torch.int64)
    for i, n in enumerate(seq_lens):
        pages = [order.pop() for _ in range(-(-n // page_size))]
        slots = torch.tensor([p * page_size + o for p in pages for o in range(page_size)])[:n]
        table[i + 1, :n] = slots
    return table, num_pages * page_size


def make_case(page_size, q_heads, kv_heads, head_dim, prefix_lens, extend_lens, seed=0, layer_id=1):
    """A pool holding random prefix K/V, the table, and fresh q/k/v for the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    table, num_slots = scattered_table(seq_lens, page_size, gen)
    pool = KVPool(num_slots, page_size, 2, kv_heads, head_dim, torch.float32, "cpu")
    rows = torch.arange(1, len(seq_lens) + 1)
    for layer in range(2):  # prefix K/V, and junk everywhere else so a wrong slot shows
        pool.k_buffers[layer].copy_(torch.randn(pool.k_buffers[layer].shape, generator=gen))
        pool.v_buffers[layer].copy_(torch.randn(pool.v_buffers[layer].shape, generator=gen))
    new_slots = torch.cat([table[r, p : p + e] for r, p, e in zip(rows.tolist(), prefix_lens, extend_lens)])
    t = int(sum(extend_lens))
    q = torch.randn(t, q_heads, head_dim, generator=gen)
    k = torch.randn(t, kv_heads, head_dim, generator=gen)
    v = torch.randn(t, kv_heads, head_dim, generator=gen)
    layer = AttentionLayerSpec(layer_id, q_heads, kv_heads, head_dim, head_dim**-0.5)
    return pool, table, rows, torch.tensor(seq_lens), new_slots, q, k, v, layer


def make_batch(mode, pool, table, rows, seq_lens, new_slots, backend, prefix_lens=None, extend_lens=None):
    t = new_slots.shape[0]
    return ForwardBatch(
        mode=mode, input_ids=torch.zeros(t, dtype=torch.int64), positions=torch.zeros(t, dtype=torch.int64),
        req_pool_indices=rows, seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), out_cache_loc=new_slots,
        req_to_token=table, kv_pool=pool, attn_backend=backend,
        extend_lens_cpu=None if extend_lens is None else torch.tensor(extend_lens),
        prefix_lens_cpu=None if prefix_lens is None else torch.tensor(prefix_lens),
    )


def run_both(mode, case, prefix_lens=None, extend_lens=None, triton_backend=None):
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = case
    outs = []
    for backend in (TorchNativeBackend(), triton_backend or TritonBackend()):
        batch = make_batch(mode, pool, table, rows, seq_lens, new_slots, backend, prefix_lens, extend_lens)
        backend.init_forward_metadata(batch)
        # Through the layer, as a model calls it: flat [T, H*D] in and out.
        out = layer(q.flatten(1), k.flatten(1), v.flatten(1), batch)
        outs.append(out.view_as(q))
    return outs


# ---- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("min_split_tokens", [256, 8])  # one split per request; several, uneven
def test_decode_matches_torch_native(shape, min_split_tokens):
    page_size, hq, hk, d = shape
    seq_lens = [1, 7, 33, 70, 2]
    case = make_case(page_size, hq, hk, d, [n - 1 for n in seq_lens], [1] * len(seq_lens))
    ref, got = run_both(ForwardMode.DECODE, case, triton_backend=TritonBackend(min_split_tokens))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_decode_one_token_per_split_and_no_workspace():
    """The wrapper alone: no workspace, no length hint, and splits as short as one token."""
    case = make_case(4, 8, 2, 96, [4, 0, 40], [1, 1, 1], seed=3)
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = case
    ref, got_backend = run_both(ForwardMode.DECODE, case, triton_backend=TritonBackend(min_split_tokens=1))
    torch.testing.assert_close(got_backend, ref, atol=ATOL, rtol=RTOL)
    out = torch.empty_like(q)
    k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
    decode_attention(q, k_buf, v_buf, table, rows, seq_lens, out, layer.scaling, max_len_hint=None)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_split_plan():
    # bounded by length (min_split_tokens a split), by occupancy (4 programs per SM), and by 64
    assert plan_max_splits(1024, 32, 8, 132, min_split_tokens=256) == 3
    assert plan_max_splits(4096, 1, 8, 132, min_split_tokens=256) == 16
    assert plan_max_splits(100, 1, 8, 132, min_split_tokens=256) == 1
    assert plan_max_splits(1 << 20, 1, 1, 132, min_split_tokens=256) == 64
    assert plan_max_splits(0, 0, 8, 132) == 1
    # the default (64-token splits) gives a batch-1 decode enough programs at short contexts
    assert plan_max_splits(256, 1, 8, 132) == 4
    assert plan_max_splits(100, 1, 8, 132) == 2
    assert plan_max_splits(1024, 32, 8, 132) == 3


# ---- extend -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_extend_without_prefix(shape):
    page_size, hq, hk, d = shape
    prefix, extend = [0, 0, 0], [1, 7, 33]
    case = make_case(page_size, hq, hk, d, prefix, extend, seed=1)
    ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_extend_with_prefix(shape):
    page_size, hq, hk, d = shape
    # prefixes that end mid-page, a single new token, and one request with no prefix
    prefix, extend = [5, 17, 0, 64], [7, 1, 9, 33]
    case = make_case(page_size, hq, hk, d, prefix, extend, seed=2)
    ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_extend_longer_than_one_query_block():
    prefix, extend = [3, 0], [150, 20]  # 150 new tokens span two BLOCK_M tiles
    case = make_case(4, 4, 2, 64, prefix, extend, seed=4)
    ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_long_prefix_and_many_blocks(page_size):
    """Unmasked key blocks before the diagonal and masked ones along it, for prefixes that are and
    are not multiples of the key block (64), with several query blocks per request."""
    prefix, extend = [130, 0, 64, 63], [100, 129, 65, 2]
    case = make_case(page_size, 4, 1, 64, prefix, extend, seed=5)
    ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


TILE_CONFIGS = [
    ExtendConfig(16, 16, 4, 2),            # key block = query block
    ExtendConfig(16, 32, 4, 1),            # key block wider than the query block
    ExtendConfig(32, 16, 4, 2, pack=2),    # two query heads per tile
    ExtendConfig(32, 16, 4, 2, pack=4),    # four (or as many as divide the group)
    ExtendConfig(16, 16, 4, 2, pack=16),   # a tile of one token x 16 heads (capped by the group)
    ExtendConfig(16, 32, 4, 2, tma=True),  # the new tokens' K/V through tensor descriptors
    ExtendConfig(32, 16, 4, 2, pack=4, tma=True),
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (12, 2)])
def test_extend_tile_configs(cfg, heads):
    """Every tile shape and head packing gives the same attention, with prefixes that do and do not
    fill a key block, several query blocks per request, and k/v read as strided views (as the model's
    fused qkv projection hands them over)."""
    hq, hk = heads
    prefix, extend = [0, 37, 16, 5], [45, 20, 33, 1]
    case = make_case(4, hq, hk, 32, prefix, extend, seed=7)
    ref, _ = run_both(ForwardMode.EXTEND, case, prefix, extend)  # also writes the new K/V into the pool
    pool, table, rows, seq_lens, new_slots, q, k, v, layer = case
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)  # [T, (hq + 2 hk) * D]
    q_v, k_v, v_v = qkv.split([hq * 32, hk * 32, hk * 32], dim=1)
    k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
    assert tma_usable(q_v.view_as(q), k_v.view_as(k), v_v.view_as(v))  # so the tma configs take that path
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor(extend).cumsum(0) - torch.tensor(extend)
    extend_attention(
        q_v.view_as(q), k_v.view_as(k), v_v.view_as(v), k_buf, v_buf, table, rows, torch.tensor(prefix),
        torch.tensor(extend), starts, out, layer.scaling, max(extend), config=cfg,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_tma_only_for_layouts_it_can_read():
    x = torch.randn(5, 2, 64)
    assert tma_usable(x, x, x)
    odd = torch.randn(5, 2, 80)  # a tile of the next power of two would cross into the next head
    assert not tma_usable(odd, odd, odd)
    head_major = torch.randn(2, 5, 64).transpose(0, 1)  # a token's heads are not one row
    assert not tma_usable(head_major, head_major, head_major)


def test_backend_reuses_buffers_across_batches():
    """Metadata buffers are reused in place; a smaller batch after a larger one stays correct."""
    backend = TritonBackend(min_split_tokens=8)
    for seed, seq_lens in enumerate([[40, 3, 17, 9], [5, 60]]):
        case = make_case(1, 4, 2, 64, [n - 1 for n in seq_lens], [1] * len(seq_lens), seed=10 + seed)
        ref, got = run_both(ForwardMode.DECODE, case, triton_backend=backend)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    for seed, (prefix, extend) in enumerate([([4, 0, 9], [5, 30, 2]), ([12], [6])]):
        case = make_case(4, 4, 2, 64, prefix, extend, seed=20 + seed)
        ref, got = run_both(ForwardMode.EXTEND, case, prefix, extend, triton_backend=backend)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
