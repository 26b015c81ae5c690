"""Radix tree prefix cache: shares the KV of common token prefixes across requests."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from radixserve.cache.allocator import KVAllocator
from radixserve.cache.base import CacheableRequest, MatchResult, PrefixCache
from radixserve.cache.pools import ReqToTokenPool

_node_ids = itertools.count()


@dataclass(eq=False)
class TreeNode:
    """An edge into this node labelled `key` (tokens), with `value` = their KV slots."""

    key: list[int]
    value: torch.Tensor = field(repr=False)
    parent: TreeNode | None = field(default=None, repr=False)
    children: dict[Any, TreeNode] = field(default_factory=dict, repr=False)
    lock_ref: int = 0
    last_access: int = 0
    id: int = field(default_factory=lambda: next(_node_ids))

    def __len__(self) -> int:
        return len(self.key)


class RadixCache(PrefixCache):
    """Radix tree over token ids. Keys are matched and inserted in whole pages only."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: KVAllocator, page_size: int):
        super().__init__(req_to_token_pool, allocator, page_size)
        self._clock = 0
        self.reset_tree()

    def reset_tree(self) -> None:
        self.root = TreeNode(key=[], value=self.empty_indices(), lock_ref=1)  # root is never evicted
        self._evictable = 0
        self._protected = 0

    # ---- lookup and insert -------------------------------------------------------------------

    def match_prefix(self, key: list[int]) -> MatchResult:
        key = self._page_aligned(key)
        now = self._tick()
        node, off, values = self.root, 0, []
        while off < len(key):
            child = node.children.get(self._child_key(key, off))
            if child is None:
                break
            child.last_access = now
            n = self._match_len(child.key, key, off)
            if n < len(child.key):
                node = self._split(child, n)  # the match ends inside this edge
                values.append(node.value)
                break
            values.append(child.value)
            node, off = child, off + n
        indices = torch.cat(values) if values else self.empty_indices()
        return MatchResult(indices=indices, last_node=node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert the page-aligned part of key with its slots; returns how many leading tokens were present.

        Slots of the already-present part stay the tree's; the caller still owns (and must free)
        its own copies of them. New slots are copied, so `value` may be a view of req_to_token.
        """
        key = self._page_aligned(key)
        if value.numel() < len(key):
            raise ValueError(f"insert: {value.numel()} slots for {len(key)} tokens")
        now = self._tick()
        node, off = self.root, 0
        while off < len(key):
            ck = self._child_key(key, off)
            child = node.children.get(ck)
            if child is None:
                leaf = TreeNode(
                    key=key[off:],
                    value=value[off : len(key)].to(torch.int64).clone(),
                    parent=node,
                    last_access=now,
                )
                node.children[ck] = leaf
                self._evictable += len(leaf)
                return off
            child.last_access = now
            n = self._match_len(child.key, key, off)
            if n < len(child.key):
                child = self._split(child, n)
            node, off = child, off + n
        return off

    # ---- locks -------------------------------------------------------------------------------

    def inc_lock_ref(self, node: TreeNode | None) -> None:
        """Lock node and its path to the root against eviction."""
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node)
                self._protected += len(node)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on unlocked node {node.id}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node)
                self._evictable += len(node)
            node = node.parent

    # ---- requests ----------------------------------------------------------------------------

    def cache_finished_req(self, req: CacheableRequest) -> None:
        if req.req_pool_idx is None:  # never got a row: nothing written, only a lock to drop
            self.dec_lock_ref(req.last_node)
            self._release_row(req)
            return
        _, tokens, slots = self._committed(req)
        aligned = len(tokens) // self.page_size * self.page_size
        present = self.insert(tokens[:aligned], slots[:aligned])
        to_free = []
        dup_start = self._tree_prefix_len(req)
        if present > dup_start:
            to_free.append(slots[dup_start:present])  # another request inserted these first
        if aligned < len(tokens):
            to_free.append(slots[aligned:])  # unaligned tail: its page is the request's alone
        if to_free:
            self.allocator.free(torch.cat(to_free))
        self.dec_lock_ref(req.last_node)
        self._release_row(req)

    def cache_unfinished_req(self, req: CacheableRequest) -> None:
        row, tokens, slots = self._committed(req)
        aligned = len(tokens) // self.page_size * self.page_size
        present = self.insert(tokens[:aligned], slots[:aligned])
        dup_start = self._tree_prefix_len(req)
        if present > dup_start:
            # Free our duplicates before overwriting the row with the tree's slots below.
            self.allocator.free(slots[dup_start:present])
        match = self.match_prefix(tokens[:aligned])
        assert match.indices.numel() == aligned, "just-inserted prefix must match fully"
        self.req_to_token_pool.req_to_token[row, :aligned] = match.indices
        # Lock the new path before unlocking the old one; they share a prefix.
        self.inc_lock_ref(match.last_node)
        self.dec_lock_ref(req.last_node)
        tail = slots[aligned:].clone()
        req.prefix_indices = torch.cat([match.indices, tail]) if tail.numel() else match.indices
        req.last_node = match.last_node

    # ---- eviction and sizes ------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Evict unlocked leaves, least recently used first, until >= num_tokens are freed."""
        if num_tokens <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed, victims = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            victims.append(node.value)
            freed += len(node)
            self._evictable -= len(node)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if victims:
            self.allocator.free(torch.cat(victims))
        return freed

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return sum(len(n) for n in self._nodes())

    def reset(self) -> None:
        """Drop the whole tree (flush_cache), freeing its slots. No request may hold a lock."""
        if self._protected:
            raise RuntimeError(f"reset with {self._protected} locked tokens in the radix cache")
        values = [n.value for n in self._nodes()]
        if values:
            self.allocator.free(torch.cat(values))
        self.reset_tree()

    def pretty_print(self) -> str:
        """Print (and return) the tree, one node per line, for debugging."""
        lines = [f"<root> total={self.total_size()} evictable={self._evictable} protected={self._protected}"]
        stack = [(c, 1) for c in reversed(list(self.root.children.values()))]
        while stack:
            node, depth = stack.pop()
            head = node.key[:8]
            more = "..." if len(node) > 8 else ""
            lines.append(
                f"{'  ' * depth}{head}{more} len={len(node)} lock={node.lock_ref} t={node.last_access}"
            )
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        text = "\n".join(lines)
        print(text)
        return text

    # ---- internals ---------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _page_aligned(self, key: list[int]) -> list[int]:
        key = list(key)
        return key[: len(key) // self.page_size * self.page_size]

    def _child_key(self, key: list[int], off: int) -> Any:
        if self.page_size == 1:
            return key[off]
        return tuple(key[off : off + self.page_size])

    def _match_len(self, node_key: list[int], key: list[int], off: int) -> int:
        """Matching tokens of node_key against key[off:], rounded down to whole pages."""
        n = min(len(node_key), len(key) - off)
        if node_key[:n] == key[off : off + n]:  # common case, compared in C
            return n
        i = 0
        while node_key[i] == key[off + i]:
            i += 1
        return i // self.page_size * self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split child's edge after n tokens; returns the new upper node (same lock and access time)."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child)
        upper = TreeNode(
            key=child.key[:n],
            value=child.value[:n],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        parent.children[self._child_key(child.key, 0)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key, 0)] = child
        return upper

    def _tree_prefix_len(self, req: CacheableRequest) -> int:
        # Tree-owned part of prefix_indices; for page_size > 1 it may end in an unaligned tail the
        # request owns, whose page is then freed along with the duplicates.
        return req.prefix_indices.numel() // self.page_size * self.page_size

    def _nodes(self) -> list[TreeNode]:
        """All nodes except the root (iterative: paths can be deeper than the recursion limit)."""
        out: list[TreeNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
