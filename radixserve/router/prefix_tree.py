"""An approximate radix tree over request text (characters), shared by the workers of one role.

It records which worker(s) were sent each prefix, so the cache-aware policy can find the worker
most likely to still hold a request's prefix in its KV cache. It is approximate: the router never
hears what a worker evicts, so the tree bounds each worker's share by size and drops its least
recently used leaves (`evict`).

Invariant: a worker that holds a node holds all of that node's ancestors (a prefix of a text it
was sent). A node held by no worker is removed, so every node below the root has an owner.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


class _Node:
    __slots__ = ("edge", "parent", "children", "owners")

    def __init__(self, edge: str, parent: _Node | None) -> None:
        self.edge = edge  # the characters on the edge from the parent to this node
        self.parent = parent
        self.children: dict[str, _Node] = {}  # keyed by the first character of the child's edge
        self.owners: dict[str, int] = {}  # worker url -> last access (a logical clock)


def _common_len(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of `edge` and text[pos:], compared in C (no per-char loop)."""
    hi = min(len(edge), len(text) - pos)
    if text.startswith(edge[:hi], pos):
        return hi
    lo = 0  # text[pos:pos+lo] == edge[:lo]; it fails at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class PrefixMatch:
    matched: int  # chars of the text found in the tree (longest over all workers)
    per_worker: dict[str, int] = field(default_factory=dict)  # url -> chars of the text it holds


class PrefixTree:
    """Radix tree of texts with per-worker ownership, sizes and LRU eviction."""

    def __init__(self) -> None:
        self._root = _Node("", None)
        self._clock = itertools.count(1)
        self._sizes: dict[str, int] = {}  # url -> chars held (sum of edge lengths of its nodes)
        self._nodes: dict[str, set[_Node]] = {}  # url -> nodes it holds (eviction/removal only)

    # --- queries ---

    def size(self, url: str) -> int:
        return self._sizes.get(url, 0)

    def sizes(self) -> dict[str, int]:
        return dict(self._sizes)

    def workers(self) -> list[str]:
        return list(self._sizes)

    def match(self, text: str) -> PrefixMatch:
        """Walk the text down the tree; for each worker, how many leading chars of it the worker holds."""
        path: list[tuple[_Node, int]] = []  # nodes reached, with the chars matched through each
        node, pos, end = self._root, 0, len(text)
        while pos < end:
            child = node.children.get(text[pos])
            if child is None:
                break
            edge = child.edge
            if text.startswith(edge, pos):  # the common case: the whole edge matches
                pos += len(edge)
                path.append((child, pos))
                node = child
                continue
            pos += _common_len(edge, text, pos)
            path.append((child, pos))
            break
        # a worker's match ends at the deepest node it owns (it owns that node's ancestors too);
        # walk up from the bottom and stop once every worker in the tree has been seen
        per_worker: dict[str, int] = {}
        everyone = len(self._sizes)
        for child, depth in reversed(path):
            for url in child.owners:
                if url not in per_worker:
                    per_worker[url] = depth
            if len(per_worker) == everyone:
                break
        return PrefixMatch(matched=pos, per_worker=per_worker)

    # --- updates ---

    def insert(self, text: str, url: str) -> None:
        """Record that `url` was sent `text`: it now holds every prefix of it, accessed now."""
        now = next(self._clock)
        self._sizes.setdefault(url, 0)
        nodes = self._nodes.setdefault(url, set())
        sizes = self._sizes
        node, pos, end = self._root, 0, len(text)
        while pos < end:
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                node.children[text[pos]] = leaf
                leaf.owners[url] = now
                sizes[url] += len(leaf.edge)
                nodes.add(leaf)
                return
            edge = child.edge
            if text.startswith(edge, pos):
                pos += len(edge)
            else:
                # the text leaves (or ends) inside this edge: split so ownership stays exact
                n = _common_len(edge, text, pos)
                child = self._split(child, n)
                pos += n
            if url not in child.owners:
                sizes[url] += len(child.edge)
                nodes.add(child)
            child.owners[url] = now
            node = child

    def remove_worker(self, url: str) -> None:
        for node in self._nodes.pop(url, set()):
            self._disown(node, url)
        self._sizes.pop(url, None)

    def evict(self, max_size_per_worker: int) -> None:
        """Drop each worker's least recently used leaves until it holds at most max_size_per_worker chars."""
        for url in [u for u, s in self._sizes.items() if s > max_size_per_worker]:
            self._evict_worker(url, max_size_per_worker)

    # --- internals ---

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut node's edge after `at` chars; return the new upper node (same owners and times)."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.edge)
        upper = _Node(node.edge[:at], parent)
        upper.owners = dict(node.owners)
        parent.children[upper.edge[0]] = upper
        node.edge = node.edge[at:]
        node.parent = upper
        upper.children[node.edge[0]] = node
        for url in upper.owners:  # sizes are unchanged: the edge is only cut in two
            self._nodes[url].add(upper)
        return upper

    def _disown(self, node: _Node, url: str) -> None:
        """Remove url from node (its size is the caller's); drop the node once no one owns it."""
        del node.owners[url]
        if not node.owners and node.parent is not None:
            # no owner here means none below either (an owner of a child would own this node)
            del node.parent.children[node.edge[0]]
            node.parent = None

    def _is_leaf_of(self, node: _Node, url: str) -> bool:
        return not any(url in c.owners for c in node.children.values())

    def _evict_worker(self, url: str, bound: int) -> None:
        nodes = self._nodes[url]
        seq = itertools.count()  # tie-breaker so the heap never compares nodes
        heap = [(n.owners[url], next(seq), n) for n in nodes if self._is_leaf_of(n, url)]
        heapq.heapify(heap)
        while heap and self._sizes[url] > bound:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._sizes[url] -= len(node.edge)
            nodes.discard(node)
            self._disown(node, url)
            if parent is not None and parent.parent is not None and self._is_leaf_of(parent, url):
                heapq.heappush(heap, (parent.owners[url], next(seq), parent))
