"""RadixCache and ChunkCache, driven through the real pools."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from radixserve.cache import ChunkCache, KVAllocator, PrefixCache, RadixCache, ReqToTokenPool, TreeNode


def make_cache(page_size: int = 1, num_slots: int = 256, rows: int = 8, cls=RadixCache):
    pool = ReqToTokenPool(size=rows, max_context_len=128, device="cpu")
    alloc = KVAllocator(num_slots=num_slots, page_size=page_size, device="cpu")
    return cls(pool, alloc, page_size), pool, alloc


def fresh(alloc: KVAllocator, n: int) -> torch.Tensor:
    slots = alloc.alloc_for_sequence(0, 0, n)
    assert slots is not None
    return slots


def tree_slots(cache: RadixCache) -> list[int]:
    return [s for n in cache._nodes() for s in n.value.tolist()]


def path_indices(cache: RadixCache, node: TreeNode) -> list[int]:
    """Slots from the root down to node; asserts every edge is still attached."""
    parts = []
    while node is not cache.root:
        parent = node.parent
        assert parent is not None and parent.children[cache._child_key(node.key, 0)] is node
        parts.append(node.value.tolist())
        node = parent
    return [s for part in reversed(parts) for s in part]


def test_insert_match_and_split():
    cache, _, alloc = make_cache()
    slots = fresh(alloc, 5)
    assert cache.insert([1, 2, 3, 4, 5], slots) == 0
    assert cache.total_size() == 5 and cache.evictable_size() == 5

    m = cache.match_prefix([1, 2, 3])  # ends inside the edge: split
    assert m.indices.tolist() == slots[:3].tolist()
    assert m.last_node.key == [1, 2, 3]
    (lower,) = m.last_node.children.values()
    assert lower.key == [4, 5] and lower.value.tolist() == slots[3:].tolist()
    assert lower.parent is m.last_node and cache.total_size() == 5

    full = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert full.indices.tolist() == slots.tolist() and full.last_node is lower

    m2 = cache.match_prefix([1, 2, 7])  # mismatch inside the first edge
    assert m2.indices.tolist() == slots[:2].tolist() and m2.last_node.key == [1, 2]
    assert path_indices(cache, lower) == slots.tolist()

    assert cache.match_prefix([9, 9]).indices.numel() == 0
    assert cache.match_prefix([]).last_node is cache.root

    other = fresh(alloc, 5)
    assert cache.insert([1, 2, 3, 9, 9], other) == 3  # returns the already-present length
    alloc.free(other[:3])  # the caller's duplicates
    m3 = cache.match_prefix([1, 2, 3, 9, 9])
    assert m3.indices.tolist() == slots[:3].tolist() + other[3:].tolist()
    assert cache.insert([1, 2, 3, 4, 5], slots) == 5
    assert cache.total_size() == 7
    assert alloc.available_size() + cache.total_size() == alloc.total_tokens
    assert "len=" in cache.pretty_print()


def test_insert_copies_value():
    cache, pool, alloc = make_cache()
    pool.req_to_token[1, :3] = fresh(alloc, 3)
    cache.insert([5, 6, 7], pool.req_to_token[1, :3])
    expect = pool.req_to_token[1, :3].tolist()
    pool.req_to_token[1, :3] = 0  # the row gets reused; the tree must not see it
    assert cache.match_prefix([5, 6, 7]).indices.tolist() == expect


def test_lock_sizes():
    cache, _, alloc = make_cache()
    cache.insert([1, 2, 3, 4], fresh(alloc, 4))
    second = fresh(alloc, 5)
    assert cache.insert([1, 2, 8, 8, 8], second) == 2
    alloc.free(second[:2])
    assert cache.total_size() == 7
    m = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(m.last_node)
    assert cache.protected_size() == 4 and cache.evictable_size() == 3
    cache.inc_lock_ref(m.last_node)
    m2 = cache.match_prefix([1, 2, 8, 8, 8])
    cache.inc_lock_ref(m2.last_node)
    assert cache.protected_size() == 7 and cache.evictable_size() == 0
    cache.dec_lock_ref(m.last_node)
    assert cache.protected_size() == 7
    cache.dec_lock_ref(m.last_node)
    assert cache.protected_size() == 5 and cache.evictable_size() == 2
    cache.dec_lock_ref(m2.last_node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 7
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(m2.last_node)
    cache.inc_lock_ref(None)  # no-ops, like ChunkCache's nodes
    cache.dec_lock_ref(cache.root)


def test_eviction_lru_order():
    cache, _, alloc = make_cache()
    a, b, c = fresh(alloc, 3), fresh(alloc, 3), fresh(alloc, 3)
    cache.insert([1, 1, 1], a)
    cache.insert([2, 2, 2], b)
    cache.insert([3, 3, 3], c)
    cache.match_prefix([1, 1, 1])  # a is now the most recent
    free0 = alloc.available_size()
    assert cache.evict(2) == 3
    assert cache.match_prefix([2, 2, 2]).indices.numel() == 0  # b went first
    assert alloc.available_size() == free0 + 3
    assert cache.evict(1) == 3
    assert cache.match_prefix([3, 3, 3]).indices.numel() == 0
    assert cache.match_prefix([1, 1, 1]).indices.tolist() == a.tolist()
    assert cache.evict(0) == 0


def test_eviction_parent_becomes_leaf_and_locks_hold():
    cache, _, alloc = make_cache()
    s = fresh(alloc, 5)
    cache.insert([1, 2, 3], s[:3])
    cache.insert([1, 2, 3, 4, 5], s)
    t = fresh(alloc, 2)
    cache.insert([7, 7], t)
    cache.match_prefix([7, 7])
    assert cache.evict(5) == 5  # [4,5] then its parent [1,2,3]; [7,7] is newer
    assert cache.total_size() == 2

    cache.insert([1, 2, 3, 4, 5], fresh(alloc, 5))
    m = cache.match_prefix([1, 2, 3])
    cache.inc_lock_ref(m.last_node)
    assert cache.evict(100) == 4  # [4,5] and [7,7]; the locked [1,2,3] stays
    assert cache.total_size() == 3 == cache.protected_size()
    assert path_indices(cache, m.last_node) == m.indices.tolist()
    with pytest.raises(RuntimeError):
        cache.reset()  # locked
    cache.dec_lock_ref(m.last_node)
    cache.reset()
    assert alloc.available_size() == alloc.total_tokens and cache.total_size() == 0


def test_page_alignment():
    ps = 4
    cache, _, alloc = make_cache(page_size=ps)
    s = fresh(alloc, 10)
    assert cache.insert(list(range(10)), s) == 0
    assert cache.total_size() == 8  # the partial page is not inserted
    alloc.free(s[8:])
    assert cache.match_prefix(list(range(7))).indices.tolist() == s[:4].tolist()  # key truncated
    # mismatch inside the second page: only whole pages match, and the edge splits at the page
    m = cache.match_prefix([0, 1, 2, 3, 4, 5, 99, 7])
    assert m.indices.tolist() == s[:4].tolist() and m.last_node.key == [0, 1, 2, 3]
    # first page differs in its 3rd token: a separate child of the root
    t = fresh(alloc, 4)
    assert cache.insert([0, 1, 9, 9], t) == 0
    assert len(cache.root.children) == 2
    assert cache.match_prefix([0, 1, 9, 9, 5]).indices.tolist() == t.tolist()
    u = fresh(alloc, 8)
    assert cache.insert([0, 1, 2, 3, 8, 8, 8, 8], u) == 4
    alloc.free(u[:4])
    assert cache.total_size() == 16
    assert cache.evict(1) == 4
    assert alloc.available_size() + cache.total_size() == alloc.total_tokens
    cache.reset()
    assert alloc.available_size() == alloc.total_tokens


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_random_ops_keep_invariants(page_size):
    rng = random.Random(1234 + page_size)
    cache, _, alloc = make_cache(page_size=page_size, num_slots=160)
    keys: list[list[int]] = [[]]
    locks: list[tuple[TreeNode, list[int]]] = []

    def random_key() -> list[int]:
        base = rng.choice(keys)
        key = base[: rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(1, 12))]
        keys.append(key)
        return key

    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            key = random_key()
            n = len(key) // page_size * page_size
            slots = alloc.alloc_for_sequence(0, 0, n)
            if slots is None:
                cache.evict(n)
                slots = alloc.alloc_for_sequence(0, 0, n)
            if slots is not None:
                present = cache.insert(key, slots)
                assert present % page_size == 0
                alloc.free(slots[:present])
        elif op < 0.6:
            m = cache.match_prefix(rng.choice(keys))
            assert m.indices.numel() % page_size == 0
            cache.inc_lock_ref(m.last_node)
            locks.append((m.last_node, m.indices.tolist()))
        elif op < 0.75 and locks:
            node, _ = locks.pop(rng.randrange(len(locks)))
            cache.dec_lock_ref(node)
        else:
            want = rng.randint(1, 40)
            before = cache.evictable_size()
            freed = cache.evict(want)
            assert freed >= min(want, before) and cache.evictable_size() == before - freed

        # invariants
        slots_in_tree = tree_slots(cache)
        assert len(slots_in_tree) == len(set(slots_in_tree)) == cache.total_size()
        assert alloc.available_size() + cache.total_size() == alloc.total_tokens
        assert cache.evictable_size() + cache.protected_size() == cache.total_size()
        locked = [n for n in cache._nodes() if n.lock_ref > 0]
        assert cache.protected_size() == sum(len(n) for n in locked)
        tree_pages = {s // page_size for s in slots_in_tree}
        assert tree_pages.isdisjoint(alloc.free_page_ids().tolist())
        for node, indices in locks:
            assert node.lock_ref > 0 and path_indices(cache, node) == indices
        assert all(len(n) % page_size == 0 and len(n) > 0 for n in cache._nodes())

    for node, _ in locks:
        cache.dec_lock_ref(node)
    assert cache.protected_size() == 0
    cache.reset()
    assert alloc.available_size() == alloc.total_tokens


@dataclass
class FakeReq:
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: object = None
    kv_committed_len: int = 0


class MiniScheduler:
    """Just enough of a scheduler to drive a cache: admit, prefill chunks, decode, finish."""

    def __init__(self, cache: PrefixCache, pool: ReqToTokenPool, alloc: KVAllocator):
        self.cache, self.pool, self.alloc = cache, pool, alloc
        self.running: list[FakeReq] = []

    def admit(self, req: FakeReq) -> None:
        m = self.cache.match_prefix(req.origin_input_ids[:-1])  # leave a token to compute
        row = self.pool.alloc()
        assert row is not None
        n = m.indices.numel()
        self.pool.req_to_token[row, :n] = m.indices
        self.cache.inc_lock_ref(m.last_node)
        req.req_pool_idx, req.prefix_indices, req.last_node = row, m.indices, m.last_node
        req.kv_committed_len = n
        self.running.append(req)

    def extend(self, req: FakeReq, n: int) -> None:
        kv, row = req.kv_committed_len, req.req_pool_idx
        assert kv + n <= len(req.origin_input_ids) + len(req.output_ids)
        last = int(self.pool.req_to_token[row, kv - 1]) if kv else 0
        slots = self.alloc.alloc_for_sequence(kv, last, n)
        assert slots is not None
        self.pool.req_to_token[row, kv : kv + n] = slots
        req.kv_committed_len += n

    def chunk(self, req: FakeReq, n: int) -> None:
        self.extend(req, n)
        self.cache.cache_unfinished_req(req)
        k = req.kv_committed_len
        assert req.prefix_indices.tolist() == self.pool.req_to_token[req.req_pool_idx, :k].tolist()
        self.check()

    def decode(self, req: FakeReq, token: int) -> None:
        req.output_ids.append(token)
        self.extend(req, len(req.origin_input_ids) + len(req.output_ids) - 1 - req.kv_committed_len)

    def finish(self, req: FakeReq) -> None:
        self.running.remove(req)
        self.cache.cache_finished_req(req)
        assert req.req_pool_idx is None
        self.check()

    def check(self) -> None:
        """Every usable page is exactly one of: free, in the tree, owned by a running request."""
        ps = self.alloc.page_size
        tree = tree_slots(self.cache) if isinstance(self.cache, RadixCache) else []
        owned: list[int] = []
        for r in self.running:
            tree_len = r.prefix_indices.numel() // ps * ps if isinstance(self.cache, RadixCache) else 0
            row = self.pool.req_to_token[r.req_pool_idx]
            assert set(row[:tree_len].tolist()) <= set(tree)
            owned += sorted({s // ps for s in row[tree_len : r.kv_committed_len].tolist()})
        tree_pages = sorted({s // ps for s in tree})
        free = self.alloc.free_page_ids().tolist()
        everything = tree_pages + owned + free
        assert len(everything) == len(set(everything)) == self.alloc.num_pages
        assert self.cache.total_size() == len(tree) == len(set(tree))


@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_cache_requests_end_to_end(page_size):
    ps = page_size
    cache, pool, alloc = make_cache(page_size=ps, num_slots=256, rows=4)
    s = MiniScheduler(cache, pool, alloc)
    prompt = list(range(100, 118))  # 18 tokens

    a = FakeReq(prompt)
    s.admit(a)
    assert a.kv_committed_len == 0
    s.chunk(a, 7)
    assert cache.total_size() == 7 // ps * ps and cache.protected_size() == 7 // ps * ps
    s.chunk(a, 6)
    s.extend(a, 5)  # rest of the prompt
    for tok in (1, 2, 3):
        s.decode(a, tok)
    assert a.kv_committed_len == 20
    s.check()
    s.finish(a)
    assert cache.total_size() == 20 // ps * ps and cache.protected_size() == 0
    assert a.last_node is None

    # b shares 14 tokens with a's sequence; matches whole pages of them
    b = FakeReq(prompt[:14] + [7, 7, 7, 7, 7])
    s.admit(b)
    assert b.prefix_indices.numel() == 14 // ps * ps
    assert cache.protected_size() == 14 // ps * ps
    s.extend(b, len(b.origin_input_ids) - b.kv_committed_len)
    s.check()

    # c and d miss together on the same prompt: the second to finish frees its duplicates
    c, d = FakeReq([5] * 13), FakeReq([5] * 13)
    s.admit(c)
    s.admit(d)
    s.chunk(c, 6)
    s.chunk(d, 9)  # d's first 6//ps*ps slots duplicate c's: freed and replaced by the tree's
    assert d.prefix_indices[: 6 // ps * ps].tolist() == c.prefix_indices[: 6 // ps * ps].tolist()
    s.extend(c, 13 - c.kv_committed_len)
    s.extend(d, 13 - d.kv_committed_len)
    s.decode(d, 4)
    s.finish(c)
    s.finish(d)
    s.finish(b)
    assert cache.protected_size() == 0
    assert alloc.available_size() + cache.total_size() == alloc.total_tokens

    # a retracted request (finished early) gives everything back the same way
    e = FakeReq(list(range(300, 311)))
    s.admit(e)
    s.chunk(e, 5)
    s.finish(e)

    cache.reset()
    assert alloc.available_size() == alloc.total_tokens
    assert pool.available_size() == pool.size
    assert cache.total_size() == cache.evictable_size() == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_chunk_cache_requests_end_to_end(page_size):
    cache, pool, alloc = make_cache(page_size=page_size, num_slots=128, rows=4, cls=ChunkCache)
    s = MiniScheduler(cache, pool, alloc)
    a, b = FakeReq(list(range(15))), FakeReq(list(range(15)))
    s.admit(a)
    s.admit(b)
    assert a.prefix_indices.numel() == 0 and a.last_node is None
    s.chunk(a, 7)
    assert a.prefix_indices.numel() == 7  # ChunkCache keeps the unaligned tail too
    s.chunk(b, 9)
    s.extend(a, 8)
    s.decode(a, 1)
    s.decode(a, 2)
    s.extend(b, 6)
    s.finish(a)
    b_pages = -(-b.kv_committed_len // page_size)
    assert alloc.available_size() == alloc.total_tokens - b_pages * page_size  # a kept nothing
    s.finish(b)
    assert cache.evict(10) == 0 and cache.evictable_size() == cache.protected_size() == 0
    cache.reset()
    assert alloc.available_size() == alloc.total_tokens
    assert pool.available_size() == pool.size
