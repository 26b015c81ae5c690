"""KVAllocator, ReqToTokenPool and KVPool."""

from __future__ import annotations

import pytest
import torch

from radixserve.cache import KVAllocator, KVPool, RadixCache, ReqToTokenPool


def pages_of(slots: torch.Tensor, page_size: int) -> set[int]:
    return set((slots // page_size).tolist())


# ---- KVAllocator, page_size 1 ---------------------------------------------------------------------


def test_alloc_free_page_size_1():
    a = KVAllocator(num_slots=16, page_size=1, device="cpu")
    assert a.total_tokens == 16 and a.available_size() == 16
    s = a.alloc_for_sequence(0, 0, 5)
    assert s.dtype == torch.int64 and s.tolist() == [1, 2, 3, 4, 5]
    assert a.available_size() == 11
    t = a.alloc_for_sequence(5, 5, 3)
    assert set(t.tolist()).isdisjoint(s.tolist())
    a.free(s)
    assert a.available_size() == 13
    a.free(t)
    assert a.available_size() == 16
    # freed slots are reused
    assert sorted(a.alloc_for_sequence(0, 0, 16).tolist()) == list(range(1, 17))
    assert a.available_size() == 0


def test_dummy_page_never_handed_out():
    for ps in (1, 4):
        a = KVAllocator(num_slots=32, page_size=ps, device="cpu")
        got = a.alloc_for_sequence(0, 0, a.total_tokens)
        assert got is not None and got.numel() == 32
        assert got.min().item() >= ps  # nothing in page 0
        assert len(set(got.tolist())) == 32
        assert a.alloc_for_sequence(0, 0, 1) is None


def test_out_of_pages_returns_none_without_leaking():
    a = KVAllocator(num_slots=8, page_size=1, device="cpu")
    a.alloc_for_sequence(0, 0, 6)
    assert a.alloc_for_sequence(0, 0, 3) is None
    assert a.available_size() == 2

    b = KVAllocator(num_slots=16, page_size=4, device="cpu")
    s = b.alloc_for_sequence(0, 0, 6)  # 2 pages, last one half used
    assert b.available_size() == 8
    # continuing needs 2 slots of the last page + 3 whole pages (> 2 free): nothing taken
    assert b.alloc_for_sequence(6, int(s[-1]), 2 + 9) is None
    assert b.available_size() == 8


def test_double_free_raises():
    a = KVAllocator(num_slots=8, page_size=1, device="cpu")
    s = a.alloc_for_sequence(0, 0, 3)
    a.free(s)
    with pytest.raises(ValueError):
        a.free(s[:1])
    with pytest.raises(ValueError):
        a.free(torch.tensor([0]))  # dummy page
    b = KVAllocator(num_slots=16, page_size=4, device="cpu")
    t = b.alloc_for_sequence(0, 0, 8)
    b.free(t[:4])
    with pytest.raises(ValueError):
        b.free(t[:1])  # page already free
    assert b.available_size() == 12


# ---- KVAllocator, page_size > 1 -------------------------------------------------------------------


def test_page_filling_continues_in_last_page():
    ps = 4
    a = KVAllocator(num_slots=64, page_size=ps, device="cpu")
    s = a.alloc_for_sequence(0, 0, 6)
    assert s.tolist() == [4, 5, 6, 7, 8, 9]  # pages 1 and 2, page 2 partly used
    assert a.available_size() == 64 - 8
    assert a.pages_needed(6, 2) == 0
    t = a.alloc_for_sequence(6, int(s[-1]), 2)
    assert t.tolist() == [10, 11] and a.available_size() == 64 - 8
    assert a.pages_needed(8, 5) == 2
    u = a.alloc_for_sequence(8, int(t[-1]), 5)
    assert u.numel() == 5 and len(pages_of(u, ps)) == 2
    assert (u[1:4] - u[0]).tolist() == [1, 2, 3]  # first new page is contiguous
    assert a.available_size() == 64 - 16
    # partial fill then new pages
    assert a.pages_needed(13, 7) == 1
    v = a.alloc_for_sequence(13, int(u[-1]), 7)
    assert v[:3].tolist() == [int(u[-1]) + 1, int(u[-1]) + 2, int(u[-1]) + 3]
    assert len(pages_of(v[3:], ps)) == 1
    everything = torch.cat([s, t, u, v])
    assert len(set(everything.tolist())) == everything.numel()
    a.free(everything)
    assert a.available_size() == 64


def test_bad_last_slot_raises_and_allocates_nothing():
    a = KVAllocator(num_slots=32, page_size=4, device="cpu")
    s = a.alloc_for_sequence(0, 0, 3)
    before = a.available_size()
    with pytest.raises(ValueError):
        a.alloc_for_sequence(3, int(s[-1]) + 1, 2)  # slot offset doesn't match position 2
    with pytest.raises(ValueError):
        a.alloc_for_sequence(3, 30, 2)  # page not owned (free)
    assert a.available_size() == before


def test_alloc_decode_matches_per_sequence():
    ps = 4
    a = KVAllocator(num_slots=64, page_size=ps, device="cpu")
    x = a.alloc_for_sequence(0, 0, 4)  # full page: next token needs a new page
    y = a.alloc_for_sequence(0, 0, 5)  # half page: continues
    out = a.alloc_decode([4, 5, 0], [int(x[-1]), int(y[-1]), 0])
    assert out[1].item() == int(y[-1]) + 1
    assert out[0].item() % ps == 0 and out[2].item() % ps == 0
    assert len(pages_of(out, ps) | pages_of(x, ps) | pages_of(y, ps)) == 5
    assert a.available_size() == 64 - 5 * ps
    tiny = KVAllocator(num_slots=4, page_size=1, device="cpu")
    assert tiny.alloc_decode([1] * 5, [0] * 5) is None and tiny.available_size() == 4
    assert tiny.alloc_decode([3, 7], [0, 0]).numel() == 2


def test_clear_restores_everything():
    a = KVAllocator(num_slots=20, page_size=4, device="cpu")
    a.alloc_for_sequence(0, 0, 11)
    a.clear()
    assert a.available_size() == a.total_tokens == 20
    assert sorted(a.free_page_ids().tolist()) == [1, 2, 3, 4, 5]


def test_random_alloc_free_no_overlap():
    gen = torch.Generator().manual_seed(0)
    ps = 4
    a = KVAllocator(num_slots=256, page_size=ps, device="cpu")
    seqs: list[list[int]] = []
    for _ in range(400):
        if seqs and torch.rand(1, generator=gen).item() < 0.3:
            seq = seqs.pop(int(torch.randint(len(seqs), (1,), generator=gen)))
            a.free(torch.tensor(seq))
        elif seqs and torch.rand(1, generator=gen).item() < 0.5:
            seq = seqs[int(torch.randint(len(seqs), (1,), generator=gen))]
            got = a.alloc_for_sequence(len(seq), seq[-1], int(torch.randint(1, 9, (1,), generator=gen)))
            if got is not None:
                seq.extend(got.tolist())
        else:
            got = a.alloc_for_sequence(0, 0, int(torch.randint(1, 12, (1,), generator=gen)))
            if got is not None:
                seqs.append(got.tolist())
        used_pages = [p for seq in seqs for p in {s // ps for s in seq}]
        assert len(used_pages) == len(set(used_pages))
        assert a.available_size() + len(used_pages) * ps == a.total_tokens
        assert set(used_pages).isdisjoint(a.free_page_ids().tolist())
    for seq in seqs:
        a.free(torch.tensor(seq))
    assert a.available_size() == a.total_tokens


# ---- ReqToTokenPool ----------------------------------------------------------------------------


def test_req_to_token_pool_alloc_free_exhaustion():
    p = ReqToTokenPool(size=3, max_context_len=16, device="cpu")
    assert p.req_to_token.shape == (4, 16) and p.req_to_token.dtype == torch.int64
    assert int(p.req_to_token.abs().sum()) == 0
    rows = [p.alloc() for _ in range(3)]
    assert sorted(rows) == [1, 2, 3]  # row 0 is the dummy
    assert p.alloc() is None and p.available_size() == 0
    p.free(rows[1])
    assert p.available_size() == 1
    assert p.alloc() == rows[1]
    for r in rows:
        p.free(r)
    with pytest.raises(ValueError):
        p.free(rows[0])
    with pytest.raises(ValueError):
        p.free(0)
    assert p.available_size() == 3


# ---- KVPool ------------------------------------------------------------------------------------


def test_kv_pool_shapes_and_set_kv():
    pool = KVPool(
        num_slots=8, page_size=2, num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16, device="cpu"
    )
    assert len(pool.k_buffers) == 3 and pool.k_buffers[0].shape == (10, 2, 4)
    assert pool.v_buffers[2].dtype == torch.float16
    k = torch.randn(3, 2, 4)
    v = torch.randn(3, 2, 4)
    slots = torch.tensor([2, 5, 9])
    pool.set_kv(1, slots, k, v)
    assert torch.equal(pool.k_buffers[1][slots], k.half())
    assert torch.equal(pool.v_buffers[1][slots], v.half())
    assert int(pool.k_buffers[0].abs().sum()) == 0
    assert pool.bytes_per_token() == 2 * 3 * 2 * 4 * 2
    assert KVPool.bytes_per_token_for(24, 8, 128, torch.bfloat16) == 2 * 24 * 8 * 128 * 2


def test_alloc_decode_bad_last_slot_raises():
    a = KVAllocator(num_slots=16, page_size=4, device="cpu")
    x = a.alloc_for_sequence(0, 0, 3)
    with pytest.raises(ValueError):
        a.alloc_decode([3], [999])
    with pytest.raises(ValueError):
        a.alloc_decode([3], [int(x[-1]) + 1])
    assert a.available_size() == 12


def test_cache_page_size_must_match_allocator():
    pool = ReqToTokenPool(2, 8, "cpu")
    with pytest.raises(ValueError):
        RadixCache(pool, KVAllocator(16, 4, "cpu"), 1)
