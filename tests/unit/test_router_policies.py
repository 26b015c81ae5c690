"""Router load-balancing policies and the cache-aware prefix tree."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from radixserve.router.policies import (
    CacheAwarePolicy,
    MinimumTokensPolicy,
    PolicyConfig,
    PowerOfTwoPolicy,
    RouteKey,
    make_policy,
)
from radixserve.router.prefix_tree import PrefixTree
from radixserve.router.worker import Worker


def _workers(n: int) -> list[Worker]:
    return [Worker(url=f"http://w{i}:8000") for i in range(n)]


def _key(text: str = "", tokens: int = 0) -> RouteKey:
    return RouteKey(text=text, tokens=tokens)


def _rand_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghij ") for _ in range(n))


def _check_sizes(tree: PrefixTree) -> None:
    """Each worker's recorded size equals the sum of the edges it owns, walking the tree."""
    sizes: Counter[str] = Counter()
    stack = [tree._root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            assert child.owners, "a node no one owns must be removed"
            assert set(child.owners) <= set(node.owners) or node is tree._root
            for url in child.owners:
                sizes[url] += len(child.edge)
            stack.append(child)
    for url in tree.workers():
        assert tree.size(url) == sizes[url], url
    assert set(sizes) <= set(tree.workers())


# --- prefix tree ---


def test_tree_match_insert_and_splits_mid_edge():
    tree = PrefixTree()
    tree.insert("hello world", "A")
    assert tree.match("hello world").per_worker == {"A": 11}
    assert tree.match("hello there").matched == 6  # "hello " then a split inside the edge
    tree.insert("hello there", "B")
    m = tree.match("hello there!")
    assert m.matched == 11 and m.per_worker == {"A": 6, "B": 11}
    # a text ending inside an edge: the worker owns exactly that prefix
    tree.insert("hel", "C")
    assert tree.size("C") == 3
    assert tree.match("hello world").per_worker == {"A": 11, "B": 6, "C": 3}
    assert tree.match("help").per_worker == {"A": 3, "B": 3, "C": 3}
    assert tree.match("xyz").matched == 0 and tree.match("").per_worker == {}
    assert tree.size("A") == 11 and tree.size("B") == 11
    _check_sizes(tree)


def test_tree_unicode():
    tree = PrefixTree()
    tree.insert("日本語のテキスト🙂です", "A")
    tree.insert("日本語の文章", "B")
    m = tree.match("日本語のテキスト🙂")
    assert m.per_worker == {"A": 9, "B": 4}
    assert tree.size("A") == len("日本語のテキスト🙂です") and tree.size("B") == 6
    assert tree.match("🙂").matched == 0
    _check_sizes(tree)


def test_tree_reinsert_does_not_grow_and_remove_worker():
    tree = PrefixTree()
    tree.insert("abcdef", "A")
    tree.insert("abcdef", "A")
    tree.insert("abc", "A")
    assert tree.size("A") == 6
    tree.insert("abcxyz", "B")
    tree.remove_worker("A")
    assert "A" not in tree.workers() and tree.size("A") == 0
    assert tree.match("abcdef").per_worker == {"B": 3}
    tree.remove_worker("B")
    assert tree.match("abcxyz").matched == 0 and not tree._root.children
    tree.remove_worker("never-seen")


def test_tree_evict_lru_leaves():
    tree = PrefixTree()
    tree.insert("shared-prefix/old", "A")
    tree.insert("shared-prefix/new", "A")
    tree.insert("other", "A")
    tree.insert("shared-prefix/old", "B")
    assert tree.size("A") == 14 + 3 + 3 + 5  # "shared-prefix/" + "old" + "new" + "other"
    tree.evict(23)  # drops A's least recently used leaf: "old" (3 chars)
    assert tree.size("A") == 22
    assert tree.match("shared-prefix/old").per_worker == {"A": 14, "B": 17}
    assert tree.match("shared-prefix/new").per_worker["A"] == 17
    # then "new", then the now-bare "shared-prefix/" (an LRU leaf), keeping "other"
    tree.evict(17)
    assert tree.size("A") == 5 and tree.match("other").per_worker == {"A": 5}
    assert tree.size("B") == 17  # within the bound: untouched by A's eviction
    assert tree.match("shared-prefix/old").per_worker == {"B": 17}
    _check_sizes(tree)


def test_tree_random_against_brute_force():
    rng = random.Random(0)
    tree = PrefixTree()
    held: dict[str, set[str]] = {"A": set(), "B": set(), "C": set()}
    for _ in range(400):
        url = rng.choice(list(held))
        base = rng.choice(["", "sys prompt: ", "sys prompt: user 1 says ", "日本語 "])
        text = base + _rand_text(rng, rng.randint(0, 12))
        tree.insert(text, url)
        held[url].add(text)
        probe = base + _rand_text(rng, rng.randint(0, 12))
        per = tree.match(probe).per_worker
        for u, texts in held.items():
            want = max((len(_lcp(probe, t)) for t in texts), default=0)
            assert per.get(u, 0) == want
    for u, texts in held.items():  # size = chars of the union of all prefixes = distinct prefixes
        assert tree.size(u) == len({t[:i] for t in texts for i in range(1, len(t) + 1)})
    _check_sizes(tree)
    tree.evict(30)
    assert all(tree.size(u) <= 30 for u in held)
    _check_sizes(tree)


def _lcp(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def test_tree_is_fast_on_long_texts():
    rng = random.Random(1)
    tree = PrefixTree()
    system = _rand_text(rng, 20_000)
    texts = [system + f"{rng.getrandbits(8000):02000x}" for _ in range(2000)]  # 2000 hex chars each
    start = time.perf_counter()
    for i, text in enumerate(texts):
        tree.match(text)
        tree.insert(text, f"w{i % 4}")
    assert time.perf_counter() - start < 5.0
    # the shared prompt counted once; suffixes share only a few leading chars
    assert 20_000 + 500 * 1990 < tree.size("w0") <= 20_000 + 500 * 2000


# --- simple policies ---


def test_make_policy_names():
    for name in ("random", "round_robin", "power_of_two", "cache_aware", "minimum_tokens"):
        assert make_policy(name, PolicyConfig()).name == name
    with pytest.raises(ValueError):
        make_policy("nope", PolicyConfig())


def test_random_picks_candidates():
    ws = _workers(3)
    policy = make_policy("random", PolicyConfig())
    picked = Counter(policy.select(ws, _key()).url for _ in range(300))
    assert set(picked) == {w.url for w in ws}


def test_round_robin_cycles_evenly():
    ws = _workers(4)
    policy = make_policy("round_robin", PolicyConfig())
    picks = [policy.select(ws, _key()).url for _ in range(40)]
    assert Counter(picks) == {w.url: 10 for w in ws}
    assert picks[:4] == [w.url for w in ws]
    # a worker going away keeps the rest cycling
    picks = [policy.select(ws[:3], _key()).url for _ in range(30)]
    assert Counter(picks) == {w.url: 10 for w in ws[:3]}


def test_power_of_two_never_picks_the_busier():
    ws = _workers(2)
    ws[0].inflight, ws[1].inflight = 5, 1
    policy = PowerOfTwoPolicy(random.Random(0))
    assert all(policy.select(ws, _key()) is ws[1] for _ in range(50))
    ws = _workers(5)
    for i, w in enumerate(ws):
        w.inflight = i
    picks = Counter(policy.select(ws, _key()).url for _ in range(500))
    assert ws[4].url not in picks  # the busiest loses every pairing
    assert picks[ws[0].url] > picks[ws[3].url]
    assert policy.select(ws[2:3], _key()) is ws[2]


def test_minimum_tokens_balances_tokens_not_requests():
    a, b = _workers(2)
    a.started(50_000)  # one huge request
    for _ in range(20):
        b.started(100)  # many tiny ones
    policy = MinimumTokensPolicy()
    assert policy.select([a, b], _key(tokens=10)) is b
    # the worker's report replaces the router's count
    b.report(80_000)
    assert policy.select([a, b], _key(tokens=10)) is a
    # ties: fewer in flight, then the first
    c, d = _workers(2)
    c.inflight = 2
    assert policy.select([c, d], _key()) is d
    assert policy.select(_workers(2), _key()).url == "http://w0:8000"


# --- cache_aware ---


def test_cache_aware_same_prefix_goes_to_same_worker():
    ws = _workers(4)
    policy = CacheAwarePolicy(PolicyConfig())
    rng = random.Random(2)
    docs = [_rand_text(rng, 2000) for _ in range(4)]
    first = [policy.select(ws, _key(d + " question 0")) for d in docs]
    # unrelated texts spread: each lands on the worker with the smallest tree
    assert len({w.url for w in first}) == 4
    for i in range(1, 20):
        for d, w in zip(docs, first):
            assert policy.select(ws, _key(d + f" question {i}")) is w


def test_cache_aware_short_match_below_threshold_spreads():
    ws = _workers(2)
    policy = CacheAwarePolicy(PolicyConfig(cache_threshold=0.5))
    a = policy.select(ws, _key("abcd" + "x" * 96))
    # shares 4 of 100 chars: below threshold, goes to the emptier tree
    b = policy.select(ws, _key("abcd" + "y" * 96))
    assert a is not b


def test_cache_aware_match_ties_prefer_fewer_inflight():
    ws = _workers(2)
    policy = CacheAwarePolicy(PolicyConfig())
    policy.tree.insert("same text", ws[0].url)
    policy.tree.insert("same text", ws[1].url)
    ws[0].inflight = 3
    assert policy.select(ws, _key("same text and more")) is ws[1]


def test_cache_aware_falls_back_to_least_loaded_when_imbalanced():
    ws = _workers(3)
    cfg = PolicyConfig(balance_abs_threshold=8, balance_rel_threshold=1.5)
    policy = CacheAwarePolicy(cfg)
    text = "long shared system prompt " * 20
    home = policy.select(ws, _key(text + "1"))
    home.inflight = 20
    others = [w for w in ws if w is not home]
    others[0].inflight, others[1].inflight = 5, 3
    # 20 - 3 > 8 and 20 > 3 * 1.5: imbalanced, the cache is ignored
    chosen = policy.select(ws, _key(text + "2"))
    assert chosen is others[1]
    # ... and the text was recorded for it
    assert policy.tree.match(text + "2").per_worker[chosen.url] == len(text) + 1
    # within the thresholds the cache wins again (20 - 14 <= 8)
    others[0].inflight = others[1].inflight = 14
    assert policy.select(ws, _key(text + "3")) in (home, chosen)
    assert policy.select([home, others[0]], _key(text + "4")) is home


def test_cache_aware_empty_text_is_least_inflight():
    ws = _workers(3)
    ws[0].inflight, ws[1].inflight, ws[2].inflight = 4, 1, 2
    policy = make_policy("cache_aware", PolicyConfig())
    assert policy.select(ws, _key("")) is ws[1]


def test_cache_aware_only_candidates_and_forgets_removed_worker():
    ws = _workers(2)
    policy = CacheAwarePolicy(PolicyConfig())
    text = "a prompt long enough to matter " * 10
    home = policy.select(ws, _key(text))
    other = ws[1] if home is ws[0] else ws[0]
    # a candidate subset without the cache holder: the other one, and unseen workers are fine
    new = Worker(url="http://new:8000")
    assert policy.select([other, new], _key(text)) in (other, new)
    policy.remove_worker(home.url)
    assert home.url not in policy.tree.workers()
    assert policy.tree.match(text).per_worker.get(home.url) is None


def test_cache_aware_eviction_bounds_tree_size():
    ws = _workers(2)
    cfg = PolicyConfig(max_tree_size=5000)
    policy = CacheAwarePolicy(cfg)
    rng = random.Random(3)
    for _ in range(100):
        policy.select(ws, _key(_rand_text(rng, 500)))
    assert max(policy.tree.sizes().values()) > 5000
    policy.evict()
    assert all(size <= 5000 for size in policy.tree.sizes().values())
    _check_sizes(policy.tree)
    # the most recent texts survive
    recent = _rand_text(rng, 500)
    w = policy.select(ws, _key(recent))
    policy.evict()
    assert policy.tree.match(recent).per_worker.get(w.url) == 500
