"""Load-balancing policies: which of the available workers of one role takes a request.

Names and semantics follow SGLang's router (random, round_robin, power_of_two, cache_aware) plus
minimum_tokens (the least token load). One policy instance serves one role, so cache_aware keeps
one prefix tree for that role's workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from radixserve.router.prefix_tree import PrefixTree
from radixserve.router.worker import Worker


@dataclass
class RouteKey:
    text: str  # the request's text for cache-aware matching (prompt, or chat messages joined); may be ""
    tokens: int  # estimated tokens it brings (prompt + max new tokens), for minimum_tokens


@dataclass
class PolicyConfig:
    """SGLang router's flags and defaults."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2**26  # characters per worker in the tree


class Policy(Protocol):
    name: str

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        """workers: a non-empty list of candidates, all available."""
        ...

    def remove_worker(self, url: str) -> None:
        """Forget per-worker state."""
        ...

    def evict(self) -> None:
        """Periodic (every --eviction-interval-secs)."""
        ...


def _least_inflight(workers: list[Worker]) -> Worker:
    return min(workers, key=lambda w: w.inflight)  # min keeps the first on ties


class _Stateless:
    """Policies with no per-worker state."""

    def remove_worker(self, url: str) -> None:
        pass

    def evict(self) -> None:
        pass


class RandomPolicy(_Stateless):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        return self._rng.choice(workers)


class RoundRobinPolicy(_Stateless):
    """A counter modulo the candidate count: even over a fixed list, and needs no per-worker state
    as workers come and go."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        worker = workers[self._counter % len(workers)]
        self._counter += 1
        return worker


class PowerOfTwoPolicy(_Stateless):
    """Two distinct candidates at random; the one with fewer in-flight requests (the first on ties)."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(workers, 2)
        return b if b.inflight < a.inflight else a


class MinimumTokensPolicy(_Stateless):
    """The worker with the fewest tokens queued and running (ties: fewer in flight, then first)."""

    name = "minimum_tokens"

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        return min(workers, key=lambda w: (w.token_load, w.inflight))


class CacheAwarePolicy:
    """SGLang's cache_aware: when load is balanced, the worker holding the longest prefix of the
    text (if it covers more than cache_threshold of it), else the worker with the smallest tree;
    when imbalanced, the least loaded. The text is recorded for the chosen worker either way."""

    name = "cache_aware"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.tree = PrefixTree()

    def _imbalanced(self, workers: list[Worker]) -> bool:
        loads = [w.inflight for w in workers]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.config.balance_abs_threshold and hi > lo * self.config.balance_rel_threshold

    def select(self, workers: list[Worker], key: RouteKey) -> Worker:
        text = key.text
        if not text:
            return _least_inflight(workers)
        if self._imbalanced(workers):
            chosen = _least_inflight(workers)
        else:
            per_worker = self.tree.match(text).per_worker
            # only candidates count: a cache on a worker that can't take the request is no use
            best = max(workers, key=lambda w: (per_worker.get(w.url, 0), -w.inflight))
            if per_worker.get(best.url, 0) / len(text) > self.config.cache_threshold:
                chosen = best
            else:
                chosen = min(workers, key=lambda w: (self.tree.size(w.url), w.inflight))
        self.tree.insert(text, chosen.url)
        return chosen

    def remove_worker(self, url: str) -> None:
        self.tree.remove_worker(url)

    def evict(self) -> None:
        self.tree.evict(self.config.max_tree_size)


POLICY_NAMES = ("random", "round_robin", "power_of_two", "cache_aware", "minimum_tokens")


def make_policy(name: str, config: PolicyConfig | None = None) -> Policy:
    config = config or PolicyConfig()
    if name == "random":
        return RandomPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy()
    if name == "cache_aware":
        return CacheAwarePolicy(config)
    if name == "minimum_tokens":
        return MinimumTokensPolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
